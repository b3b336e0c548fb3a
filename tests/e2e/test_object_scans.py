"""Scans from and to object storage end to end: a real API and coordinator process
against a real S3-compatible server (moto's) and the embedded Valkey (a database of
its own, so no other test's coordinator takes these scans): a 100,000-row manifest
streamed from a bucket with both processes' peak memory measured, the results written
back as Parquet and read with pyarrow, a coordinator killed mid-scan whose successor
reads on from the manifest's cursor (a ranged GET, not the object from its start), and
object URLs outside the key's buckets refused with nothing stored."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pyarrow.parquet as pq
import pytest
import redis

from shared import wiring
from shared.keys import image_digest, verdict_key
from shared.objects import ObjectStorage
from shared.scans.results import ResultsDB
from shared.settings import Settings
from shared.store.apikeys import Scope
from tests.helpers import (
    API_KEY,
    MODEL,
    PREFIX,
    VERDICT,
    WorkerProcess,
    scan_finished,
    small_jpeg,
    start_api,
)
from tests.objstore import AWS_ENV, MotoServer
from worker.scans.outputs import RESULTS_SCHEMA

BUCKET = "e2e-scans"
OTHER = "e2e-other-tenant"
ROWS = 100_000
TEXT = "a row whose verdict is cached"


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def stack(
    service_env: dict, moto: MotoServer, valkey: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    moto.create_bucket(BUCKET)
    moto.create_bucket(OTHER)
    tmp = tmp_path_factory.mktemp("object-scans")
    redis_url = valkey.rsplit("/", 1)[0] + "/6"
    env = {
        **service_env,
        **AWS_ENV,
        "OFA_REDIS_URL": redis_url,
        "OFA_S3_ENDPOINT_URL": moto.endpoint,
        "OFA_S3_ALLOW_HTTP": "true",
        "OFA_OBJECT_BUCKETS": f"s3://{BUCKET}",
        "OFA_DATA_DIR": str(tmp / "data"),
        "OFA_MAX_MANIFEST_BYTES": str(512 * 1024 * 1024),
        "OFA_SCAN_SLICE_S": "5",
        "OFA_SCAN_CHUNK_ROWS": "1000",
        "OFA_SCAN_WINDOW": "256",
    }
    rdb = redis.Redis.from_url(redis_url)
    rdb.flushdb()
    coordinator = WorkerProcess(env, rdb, tmp, command="coordinator")
    coordinator.start()
    api_proc, base = start_api(env, tmp / "api.log")
    settings = Settings(
        redis_url=redis_url,
        key_prefix=PREFIX,
        model=MODEL[0],
        model_revision=MODEL[1],
        data_dir=tmp / "data",
    )
    sync = wiring.sync_redis(settings)
    storage = ObjectStorage(s3_endpoint_url=moto.endpoint, s3_allow_http=True, timeout_s=10)
    client = httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=60)
    env_patch = pytest.MonkeyPatch()
    for name, value in AWS_ENV.items():  # this process's client signs as the services do
        env_patch.setenv(name, value)
    try:
        yield SimpleNamespace(
            env=env,
            rdb=rdb,
            coordinator=coordinator,
            api=api_proc,
            client=client,
            stores=wiring.stores(settings, sync=sync),
            storage=storage,
            scans_dir=tmp / "data" / "scans",
        )
    finally:
        env_patch.undo()
        client.close()
        api_proc.terminate()
        api_proc.wait(timeout=10)
        coordinator.stop()
        sync.close()
        rdb.flushdb()


def wait_written(stack: SimpleNamespace, scan_id: str, started: float | None = None) -> dict:
    """The scan's summary once it has ended and its results' write has been tried."""
    started = started or time.monotonic()
    doc: dict = {}
    while time.monotonic() - started < 240:
        doc = stack.client.get(f"/v1/scans/{scan_id}").json()
        if doc["status"] in ("succeeded", "failed") and doc["results_written"] is not None:
            return doc
        time.sleep(0.2)
    raise AssertionError((doc, stack.coordinator.log()))


def nothing_stored(stack: SimpleNamespace) -> None:
    names = [k.decode() for k in stack.rdb.scan_iter(f"{PREFIX}*")]
    assert not [n for n in names if ":scan" in n or "idempot" in n], names
    assert not stack.scans_dir.exists() or not any(stack.scans_dir.iterdir())


def test_object_urls_outside_the_keys_buckets_are_refused_with_nothing_stored(stack):
    stack.storage.put(f"s3://{OTHER}/m.jsonl", b'{"id": 1, "image": "a.jpg", "text": "t"}\n')
    stack.storage.put(f"s3://{BUCKET}/b/m.jsonl", b'{"id": 1, "image": "a.jpg", "text": "t"}\n')
    post = stack.client.post
    idem = {"Idempotency-Key": "refused-1"}
    resp = post("/v1/scans", json={"manifest_url": f"s3://{OTHER}/m.jsonl"}, headers=idem)
    assert resp.status_code == 403, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    resp = post(
        "/v1/scans",
        json={"manifest_url": f"s3://{BUCKET}/b/m.jsonl", "results_url": f"s3://{OTHER}/r"},
        headers=idem,
    )
    assert resp.status_code == 403, resp.text
    # A key whose own list narrows the global one to a prefix.
    token = stack.stores.apikeys.create(
        "tenant-a", frozenset({Scope.SCANS}), 0, 10, [f"s3://{BUCKET}/a/"]
    )
    resp = post(
        "/v1/scans",
        json={"manifest_url": f"s3://{BUCKET}/b/m.jsonl"},
        headers={"X-API-Key": token, **idem},
    )
    assert resp.status_code == 403, resp.text
    resp = post("/v1/scans", json={"manifest_url": f"s3://{BUCKET}/missing.jsonl"})
    assert resp.status_code == 422 and "no object" in resp.json()["detail"]
    resp = post("/v1/scans", json={"manifest_url": f"s3://{BUCKET}/b/m.csv"})
    assert resp.status_code in (400, 422), resp.text
    nothing_stored(stack)


@pytest.mark.slow
def test_a_100k_row_manifest_streams_from_a_bucket_in_bounded_memory(stack):
    image = small_jpeg(seed=950)
    sha = image_digest(image).hex()
    key = verdict_key(*MODEL, image, TEXT, None)
    jobs = stack.stores.jobs
    jobs.succeed(jobs.create_or_join(key, image, TEXT, None).job_id, key, VERDICT, cached=False)
    pad = "x" * 400  # ~0.5 KB a row: a 50 MB manifest, more than the bound below

    def lines(rows: int = ROWS) -> Iterator[bytes]:
        for start in range(0, rows, 5000):
            yield "".join(
                json.dumps(
                    {
                        "id": f"r{i}",
                        "image": f"s3://{BUCKET}/img.jpg",
                        "sha256": sha,
                        "text": TEXT,
                        "note": pad,
                    }
                )
                + "\n"
                for i in range(start, min(rows, start + 5000))
            ).encode()

    # A small scan first, so the baseline includes what any scan makes a process
    # allocate once (the store's client, the first chunk's objects, a Parquet writer).
    warm = f"s3://{BUCKET}/warm/manifest.jsonl"
    stack.storage.write_stream(warm, lines(5000))
    body = {"manifest_url": warm, "results_url": f"s3://{BUCKET}/warm/results.parquet"}
    warm_id = stack.client.post("/v1/scans", json=body).json()["scan_id"]
    wait_written(stack, warm_id)

    manifest = f"s3://{BUCKET}/big/manifest.jsonl"
    stack.storage.write_stream(manifest, lines())
    size = stack.storage.head(manifest).size
    assert size > 45 * 1024 * 1024
    api_before = peak_rss_mb(stack.api.pid)
    coord_before = peak_rss_mb(stack.coordinator.proc.pid)

    out = f"s3://{BUCKET}/big/results.parquet"
    started = time.monotonic()
    resp = stack.client.post("/v1/scans", json={"manifest_url": manifest, "results_url": out})
    assert resp.status_code == 202, resp.text
    scan_id = resp.json()["scan_id"]
    doc = wait_written(stack, scan_id, started)
    assert doc["status"] == "succeeded", (doc, stack.coordinator.log())
    assert (doc["total"], doc["cached"], doc["total_known"]) == (ROWS, ROWS, True)
    assert doc["results_written"] and doc["results_url"] == out and doc["manifest_url"] == manifest

    api_growth = peak_rss_mb(stack.api.pid) - api_before
    coord_growth = peak_rss_mb(stack.coordinator.proc.pid) - coord_before
    # Neither holds the manifest (50 MB), nor anything near it.
    assert api_growth < 20, api_growth
    assert coord_growth < 40, coord_growth

    local = stack.scans_dir / "read-back.parquet"
    local.write_bytes(stack.storage.get(out))
    table = pq.read_table(local)
    assert table.schema.equals(RESULTS_SCHEMA) and table.num_rows == ROWS
    assert table.column("id")[ROWS - 1].as_py() == f"r{ROWS - 1}"
    assert set(table.column("label").to_pylist()) == {VERDICT.label}
    local.unlink()


def cached_manifest(stack: SimpleNamespace, url: str, rows: int, seed: int) -> None:
    """Write a ``rows``-row manifest at ``url`` whose rows all have one verdict, cached
    beforehand: each row costs the coordinator a cache lookup, no image and no job."""
    image = small_jpeg(seed=seed)
    sha = image_digest(image).hex()
    key = verdict_key(*MODEL, image, TEXT, None)
    jobs = stack.stores.jobs
    jobs.succeed(jobs.create_or_join(key, image, TEXT, None).job_id, key, VERDICT, cached=False)

    def lines() -> Iterator[bytes]:
        for start in range(0, rows, 5000):
            yield "".join(
                json.dumps(
                    {"id": f"r{i}", "image": f"s3://{BUCKET}/img.jpg", "sha256": sha, "text": TEXT}
                )
                + "\n"
                for i in range(start, min(rows, start + 5000))
            ).encode()

    stack.storage.write_stream(url, lines())


@pytest.mark.slow
def test_a_coordinator_killed_mid_scan_reads_on_from_the_manifests_cursor(stack, moto):
    rows = 100_000  # several slices' worth even on a fast machine
    manifest = f"s3://{BUCKET}/resume/manifest.jsonl"
    path = f"/{BUCKET}/resume/manifest.jsonl"
    cached_manifest(stack, manifest, rows, seed=951)
    size = stack.storage.head(manifest).size
    # Short slices, so that the scan spans several and a kill lands mid-scan.
    quick = {"OFA_SCAN_SLICE_S": "0.25", "OFA_SCAN_CHUNK_ROWS": "500"}
    coordinator = stack.coordinator
    coordinator.stop()
    coordinator.start(**quick)
    try:
        moto.record(True)
        resp = stack.client.post("/v1/scans", json={"manifest_url": manifest})
        assert resp.status_code == 202, resp.text
        scan_id = resp.json()["scan_id"]
        # Each slice opens one stream: killed once the second slice has opened its own.
        deadline = time.monotonic() + 60
        while len(moto.recorded("GET", path)) < 2:
            assert time.monotonic() < deadline, coordinator.log()
            time.sleep(0.05)
        coordinator.kill()  # SIGKILL: no slice ends, nothing is released
        killed = moto.recorded("GET", path)
        assert "range" not in killed[0]["headers"]  # the first slice read from the start

        partial = stack.client.get(f"/v1/scans/{scan_id}").json()
        assert partial["status"] == "running", partial
        db = ResultsDB(stack.scans_dir / scan_id / "results.db", readonly=True)
        try:
            next_idx, offset = db.cursor_position()
        finally:
            db.close()
        assert 0 < next_idx < rows and 0 < offset < size, (next_idx, offset, size)

        moto.record(True)  # from here on: what the new coordinator reads
        coordinator.start(**quick)  # as its supervisor would restart it
        doc = scan_finished(stack.client, scan_id, time.monotonic() + 180, coordinator.log)
        assert (doc["total"], doc["done"], doc["cached"], doc["failed"]) == (rows, rows, rows, 0)
        assert doc["total_known"] is True

        # The successor's first read starts where the recorded rows end, and no read
        # starts at the object's beginning: the first `offset` bytes were served once.
        reads = [r["headers"].get("range") for r in moto.recorded("GET", path)]
        assert reads and reads[0] == f"bytes={offset}-", reads
        assert all(r is not None and int(r[6:].split("-")[0]) >= offset for r in reads), reads

        # Every row has exactly one result, in manifest order.
        text = stack.client.get(f"/v1/scans/{scan_id}/results").text
        out = [json.loads(line) for line in text.splitlines()]
        assert [r["id"] for r in out] == [f"r{i}" for i in range(rows)]
        assert {r["label"] for r in out} == {VERDICT.label}
    finally:
        moto.record(False)
        coordinator.stop()
        coordinator.start()  # the module's settings for the tests after this one
