"""Scans and object storage, the coordinator and the resolver called directly against a
real S3-compatible server (moto's, ``tests/objstore.py``): a manifest streamed from a
bucket and resumed from its cursor by a new coordinator, a manifest replaced mid-scan,
images by ``s3://`` URL revalidated by ETag, a bucket outside the allow-list refused,
and results written back as JSONL, CSV and Parquet."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import Iterator

import httpx
import pyarrow.parquet as pq
import pytest

from shared import wiring
from shared.celery_app import make_celery
from shared.keys import image_digest, verdict_key, verdict_key_for_digest
from shared.models import ScanStatus
from shared.objects import ObjectStorage, ObjectUrl
from shared.scans.folder import ScanFolder
from shared.scans.manifest import Row
from tests.conftest import INPROC_MODEL
from tests.helpers import VERDICT, small_jpeg
from tests.objstore import AWS_ENV, MotoServer
from worker.scans.coordinator import Coordinator
from worker.scans.outputs import RESULTS_SCHEMA
from worker.scans.resolver import RowResolver

pytestmark = pytest.mark.usefixtures("clean_inproc")


class Recording(ObjectStorage):
    """The real client, noting where each manifest stream starts and what each image
    read answered (bytes, or None: unchanged)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.stream_starts: list[int] = []
        self.image_reads: list[bool] = []  # True: bytes came back

    def read_stream(self, url, max_bytes, *, start=0, **kwargs):  # type: ignore[no-untyped-def]
        self.stream_starts.append(start)
        return super().read_stream(url, max_bytes, start=start, **kwargs)

    async def aread_bytes(self, url, max_bytes, if_none_match=None):  # type: ignore[no-untyped-def]
        got = await super().aread_bytes(url, max_bytes, if_none_match)
        self.image_reads.append(got[0] is not None)
        return got


@pytest.fixture
def bucket(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    name = f"scans-{uuid.uuid4().hex[:10]}"
    moto.create_bucket(name)
    return name


@pytest.fixture
def settings(inproc_settings, moto: MotoServer, bucket: str, tmp_path):
    return inproc_settings.model_copy(
        update={
            "s3_endpoint_url": moto.endpoint,
            "s3_allow_http": True,
            "object_timeout_s": 5.0,
            "object_buckets": [f"s3://{bucket}/allowed/"],
            "data_dir": tmp_path / "data",
            "scan_slice_s": 1e-6,  # one chunk of rows a slice
            "scan_chunk_rows": 5,
        }
    )


@pytest.fixture
def scans(settings, inproc_redis):
    """The scan store on these settings (their scan folders)."""
    return wiring.stores(settings, sync=inproc_redis).scans


@pytest.fixture
def storage(settings) -> Recording:
    return Recording(s3_endpoint_url=settings.s3_endpoint_url, s3_allow_http=True, timeout_s=5)


@pytest.fixture
def coord_of(settings, jobs, inproc_redis, storage) -> Iterator:
    def make() -> Coordinator:
        resolver = RowResolver(
            settings, jobs.keys, inproc_redis.cache, wiring.url_policy(settings), storage
        )
        stores = wiring.stores(settings, sync=inproc_redis)
        return Coordinator(settings, stores, resolver, make_celery(settings))

    yield make


def cached(jobs, image: bytes, text: str) -> None:
    key = verdict_key(*INPROC_MODEL, image, text, None)
    job_id = jobs.create_or_join(key, image, text, None).job_id
    jobs.succeed(job_id, key, VERDICT, cached=False)


def object_scan(scans, storage: ObjectStorage, url: str, **extra: str) -> str:
    """A scan of the manifest object at ``url``, recorded as the API records one."""
    meta = storage.head(url)
    scan_id = uuid.uuid4().hex
    ScanFolder(scans.settings.scans_path, scan_id).create()
    fields = {
        "manifest_etag": meta.etag or "",
        "manifest_size": str(meta.size),
        "total_known": "0",
        **extra,
    }
    scans.create(scan_id, 0, url, None, extra=fields)
    return scan_id


def run_to_end(coord: Coordinator, scan_id: str, slices: int = 200) -> int:
    for n in range(1, slices + 1):
        if coord.run(scan_id) == "done":
            return n
    raise AssertionError("the scan did not finish")


def test_a_manifest_streams_from_a_bucket_and_resumes_from_its_cursor(
    coord_of, settings, storage, jobs, scans, bucket
):
    image = small_jpeg(seed=901)
    sha = image_digest(image).hex()
    cached(jobs, image, "a cached row")
    rows = [
        {
            "id": f"r{i}",
            "image": f"s3://{bucket}/allowed/img.jpg",
            "sha256": sha,
            "text": "a cached row",
        }
        for i in range(60)
    ]
    url = f"s3://{bucket}/allowed/manifest.jsonl"
    storage.put(url, "".join(json.dumps(r) + "\n" for r in rows).encode())
    scan_id = object_scan(scans, storage, url)

    first = coord_of()
    assert first.run(scan_id) == "more"  # one chunk, then the next slice
    summary = scans.summary(scan_id)
    assert summary is not None and not summary.total_known and 0 < summary.total < 60
    read_so_far = summary.read
    assert storage.stream_starts == [0]
    # A new coordinator (the first killed after its slice recorded its rows) goes on
    # from the cursor: a stream opened past the start, never at 0 again.
    slices = run_to_end(coord_of(), scan_id)
    assert slices >= 1 and storage.stream_starts[0] == 0
    assert all(start > 0 for start in storage.stream_starts[1:]), storage.stream_starts
    db_rows = ScanFolder(settings.scans_path, scan_id).results
    assert db_rows.exists()
    summary = scans.summary(scan_id)
    assert summary is not None and summary.status == ScanStatus.SUCCEEDED
    assert summary.total_known and (summary.total, summary.cached) == (60, 60)
    assert summary.manifest_url == url and read_so_far < 60
    assert storage.image_reads == []  # sha256 given and cached: no image read


def test_a_manifest_replaced_mid_scan_fails_the_scan(coord_of, storage, jobs, scans, bucket):
    image = small_jpeg(seed=902)
    cached(jobs, image, "row")
    line = {
        "image": f"s3://{bucket}/allowed/x.jpg",
        "sha256": image_digest(image).hex(),
        "text": "row",
    }
    url = f"s3://{bucket}/allowed/replaced.jsonl"
    storage.put(url, "".join(json.dumps({"id": i, **line}) + "\n" for i in range(40)).encode())
    scan_id = object_scan(scans, storage, url)
    coord = coord_of()
    assert coord.run(scan_id) == "more"
    storage.put(url, b'{"id": "other", "image": "x.jpg", "text": "another manifest"}\n')
    assert run_to_end(coord, scan_id) == 1
    summary = scans.summary(scan_id)
    assert summary is not None and summary.status == ScanStatus.FAILED
    assert summary.error is not None and "replaced mid-scan" in summary.error


def test_images_by_s3_url_are_revalidated_by_etag(settings, storage, jobs, inproc_redis, bucket):
    resolver = RowResolver(
        settings, jobs.keys, inproc_redis.cache, wiring.url_policy(settings), storage
    )
    first, second = small_jpeg(seed=903), small_jpeg(seed=904)
    url = f"s3://{bucket}/allowed/photo.jpg"
    storage.put(url, first)
    row = Row(0, "a", {"id": "a", "image": url, "text": "a photo"})

    async def fetched():  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient() as client:
            return await resolver.fetch(resolver.read(row), client)

    got = asyncio.run(fetched())
    assert got.error is None and got.image == first and storage.image_reads == [True]
    assert got.key == verdict_key_for_digest(*INPROC_MODEL, image_digest(first), "a photo", None)
    again = asyncio.run(fetched())  # unchanged: If-None-Match answered "not modified"
    assert again.error is None and again.image is None and again.digest == image_digest(first)
    assert storage.image_reads == [True, False]
    storage.put(url, second)  # a new ETag: read again, keyed by the new bytes
    changed = asyncio.run(fetched())
    assert changed.image == second and changed.digest == image_digest(second)
    assert storage.image_reads == [True, False, True]

    async def job_image():  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient() as client:
            again = await resolver.fetch(resolver.read(row), client)
            return await resolver.image_for_job(again, client)

    assert asyncio.run(job_image()) == second  # a miss's job gets the bytes it is keyed by


def test_an_image_bucket_outside_the_lists_is_the_rows_error(
    settings, storage, jobs, inproc_redis, bucket
):
    resolver = RowResolver(
        settings, jobs.keys, inproc_redis.cache, wiring.url_policy(settings), storage
    )
    outside = Row(0, "a", {"id": "a", "image": f"s3://{bucket}/private/p.jpg", "text": "t"})
    assert "not allowed" in (resolver.read(outside).error or "")
    # Within the global list, but not within the scan owner's own list.
    inside = Row(1, "b", {"id": "b", "image": f"s3://{bucket}/allowed/p.jpg", "text": "t"})
    assert resolver.read(inside).error is None
    narrowed = resolver.read(inside, buckets=[f"s3://{bucket}/allowed/tenant-a/"])
    assert "not allowed" in (narrowed.error or "")
    assert storage.image_reads == []


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_results_are_written_back_when_the_scan_ends(
    coord_of, settings, storage, jobs, scans, bucket, tmp_path, fmt
):
    image = small_jpeg(seed=905)
    cached(jobs, image, "kept")
    rows = [
        {
            "id": f"ok{i}",
            "image": f"s3://{bucket}/allowed/i.jpg",
            "sha256": image_digest(image).hex(),
            "text": "kept",
        }
        for i in range(12)
    ] + [{"id": "bad", "image": f"s3://{bucket}/allowed/i.jpg"}]  # no text: an error
    url = f"s3://{bucket}/allowed/m-{fmt}.jsonl"
    storage.put(url, "".join(json.dumps(r) + "\n" for r in rows).encode())
    out = f"s3://{bucket}/allowed/out/results.{fmt}"
    scan_id = object_scan(scans, storage, url, results_url=out, results_format=fmt)
    run_to_end(coord_of(), scan_id)
    summary = scans.summary(scan_id)
    assert summary is not None and summary.status == ScanStatus.SUCCEEDED
    assert summary.results_written and summary.results_url == out
    assert summary.results_error is None and summary.results_format == fmt
    data = storage.get(out)
    if fmt == "jsonl":
        docs = [json.loads(line) for line in data.decode().splitlines()]
        assert [d["id"] for d in docs] == [r["id"] for r in rows]
        assert docs[0]["label"] == VERDICT.label and docs[0]["cached"]
        assert "missing text" in docs[-1]["error"]
    elif fmt == "csv":
        table = list(csv.DictReader(io.StringIO(data.decode())))
        assert [t["id"] for t in table] == [r["id"] for r in rows]
        assert table[0]["label"] == VERDICT.label and table[0]["cached"] == "1"
    else:
        (tmp_path / "r.parquet").write_bytes(data)
        table = pq.read_table(tmp_path / "r.parquet")
        assert table.schema.equals(RESULTS_SCHEMA)
        got = table.to_pylist()
        assert [g["id"] for g in got] == [r["id"] for r in rows]
        assert got[0]["label"] == VERDICT.label and got[0]["cached"] is True
        assert got[0]["p_entailment"] == pytest.approx(VERDICT.probabilities.entailment)
        assert got[-1]["label"] is None and "missing text" in got[-1]["error"]
    assert not ScanFolder(settings.scans_path, scan_id).results_upload.exists()


def test_a_results_bucket_the_service_cannot_write_is_reported(
    coord_of, storage, jobs, scans, bucket
):
    image = small_jpeg(seed=906)
    cached(jobs, image, "x")
    url = f"s3://{bucket}/allowed/m.jsonl"
    line = {
        "id": "a",
        "image": "s3://x-y-z/a.jpg",
        "sha256": image_digest(image).hex(),
        "text": "x",
    }
    storage.put(url, (json.dumps(line) + "\n").encode())
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out.jsonl"
    scan_id = object_scan(scans, storage, url, results_url=missing, results_format="jsonl")
    run_to_end(coord_of(), scan_id)
    summary = scans.summary(scan_id)
    assert summary is not None and summary.status == ScanStatus.SUCCEEDED
    assert summary.results_written is False and summary.results_error
    assert ObjectUrl.parse(missing).bucket in summary.results_error


def test_a_row_by_s3_url_makes_a_job_that_references_the_object(
    coord_of, settings, storage, jobs, scans, bucket
):
    """A miss whose image is an object is not copied into the payload store: its job
    names the object, and the worker reads it from there (checked against the key)."""
    from types import SimpleNamespace

    from shared.keys import payload_name
    from shared.store import decode_hash
    from shared.wire import EntailTask
    from worker.jobs import image_or_fail, read_payload

    image = small_jpeg(seed=931)
    image_url = f"s3://{bucket}/allowed/ref.jpg"
    storage.put(image_url, image)
    rows = [
        {"id": "with-sha", "image": image_url, "sha256": image_digest(image).hex(), "text": "a"},
        {"id": "without", "image": image_url, "text": "b"},
    ]
    url = f"s3://{bucket}/allowed/ref-manifest.jsonl"
    storage.put(url, "".join(json.dumps(r) + "\n" for r in rows).encode())
    scan_id = object_scan(scans, storage, url)
    coord_of().run(scan_id)
    keys = [verdict_key(*INPROC_MODEL, image, text, None) for text in ("a", "b")]
    rdb = jobs.sync.durable
    payloads = wiring.payload_store(settings)
    rt = SimpleNamespace(
        settings=settings,
        objects=storage,
        jobs=SimpleNamespace(payloads=payloads),
        model_tag=settings.model_tag,
    )
    for key, text in zip(keys, ("a", "b"), strict=True):
        job_id = rdb.get(jobs.keys.inflight(key)).decode()
        record = decode_hash(rdb.hgetall(jobs.keys.job(job_id)))
        assert record["payload"] == image_url and record["size"] == "0"
        assert payloads.get(payload_name(key, job_id)) is None  # nothing copied
        msg = EntailTask(
            job_id=job_id, key=key, model=INPROC_MODEL[0], revision=INPROC_MODEL[1], text=text
        )
        got = read_payload(rt, msg, record["payload"])  # type: ignore[arg-type]
        assert image_or_fail(rt, msg, got) == image  # type: ignore[arg-type]
    assert not list(settings.payloads_path.glob("*/*"))
