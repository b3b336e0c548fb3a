"""Items/s of our OFA runtime by batch size vs ModelScope's ``OFAModel`` one item at a time.

Real OFA-Large shape (ResNet-152, 12+12 layers, d_model 1024, 480x480 images) with
random weights: the cost is the same as with trained ones. Both models hold the same
weights; the baseline scores each item as ModelScope's traverse inference does (encoder
once, the three answers teacher-forced in one decoder call), one item per call, fp32.

    python -m tests.benchmarks.bench_runtime --out tests/benchmarks/results/runtime-cpu.md
    python -m tests.benchmarks.bench_runtime --device cuda --dtype bfloat16 --out ...gpu.md

Peak memory: process RSS high-water mark (CPU, reset between runs through
/proc/self/clear_refs) or ``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tests.helpers import photo
from worker.ofa.checkpoint import Checkpoint
from worker.ofa.config import TaskConfig
from worker.ofa.entail import Entailer, Prepared
from worker.ofa.model import OFAModel
from worker.ofa.preprocess import VOCAB_DIR, TextEncoder, normalise
from worker.ofa.tiny import LARGE, randomise, reference_state_dict

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


def build(args: argparse.Namespace) -> tuple[Entailer, dict[str, torch.Tensor]]:
    task = TaskConfig(patch_image_size=480, prompt_type="prev_output", max_src_length=80)
    model = OFAModel(LARGE)
    randomise(model, seed=0)
    state = reference_state_dict(model, seed=0)
    text = TextEncoder(VOCAB_DIR / "vocab.json", VOCAB_DIR / "merges.txt", task)
    ckpt = Checkpoint(Path("random-large"), LARGE, task, text, None, model.eval())
    ent = Entailer(ckpt, device=args.device, dtype=args.dtype)
    return ent, state


def reference_rate(
    state, items: list[Prepared], device: torch.device, answers, task: TaskConfig
) -> float:
    from tests import reference as R

    ref = R.RefModel(R.RefConfig(**LARGE.to_dict()))
    ref.load_state_dict(state, strict=True)
    ref = ref.eval().to(device)
    answer_ids = [torch.tensor(t) for t in answers.tokens]
    with torch.inference_mode():

        def one(item: Prepared) -> None:
            src = torch.tensor(item.source, device=device)[None]
            img = normalise(torch.from_numpy(item.pixels)[None], task).to(device)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--baseline-items", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="batches timed per batch size")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    ent, state = build(args)
    device = ent.device
    pool = [ent.prepare(photo(p), t) for p, t in zip(PHOTOS, TEXTS, strict=True)]
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        batch = [pool[i % len(pool)] for i in range(bs)]
        ent.answer_log_probs(batch[: min(bs, 2)])  # warm-up
        peak_reset(device)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.rounds):
            ent.answer_log_probs(batch)
        sync(device)
        elapsed = time.perf_counter() - start
        rows.append(
            {"batch": bs, "items_per_s": bs * args.rounds / elapsed, "peak_mib": peak_mib(device)}
        )
        print(json.dumps(rows[-1]), flush=True)

    task = ent.task
    ours_model = ent.model.cpu()
    del ours_model, ent
    peak_reset(device)
    base_items = [pool[i % len(pool)] for i in range(args.baseline_items)]
    from worker.ofa.entail import Answers

    answers = Answers.build(
        None,
        TextEncoder(VOCAB_DIR / "vocab.json", VOCAB_DIR / "merges.txt", TaskConfig()).encode,
        "-",
    )
    base = reference_rate(state, base_items, device, answers, task)
    base_peak = peak_mib(device)
    print(json.dumps({"reference_items_per_s": base, "peak_mib": base_peak}), flush=True)

    hw = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    lines = [
        f"# Runtime benchmark ({device.type}, {args.dtype})",
        "",
        f"Command: `python -m tests.benchmarks.bench_runtime --device {args.device} "
        f"--dtype {args.dtype} --batch-sizes {args.batch_sizes} --baseline-items "
        f"{args.baseline_items} --rounds {args.rounds}`",
        f"Hardware: {hw}; torch {torch.__version__}; OFA-Large shape, random weights, "
        "480x480 images, prev_output prompts.",
        "",
        "| runner | batch | items/s | x reference | peak memory (MiB) |",
        "|---|---|---|---|---|",
        f"| ModelScope OFAModel, one item per call, fp32 | 1 | {base:.3f} | 1.00 "
        f"| {base_peak:.0f} |",
    ]
    for r in rows:
        lines.append(
            f"| ours ({args.dtype}) | {r['batch']} | {r['items_per_s']:.3f} | "
            f"{r['items_per_s'] / base:.2f} | {r['peak_mib']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
