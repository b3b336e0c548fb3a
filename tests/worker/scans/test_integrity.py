"""A scan's verdicts are stored only under the image they were computed on, and a
chunk holds a bounded amount of image data: the in-process coordinator against a real
HTTP server on 127.0.0.1, the embedded Valkey and the tiny checkpoint."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from typing import ClassVar

import pytest

from shared import wiring
from shared.celery_app import make_celery
from shared.keys import payload_name, verdict_key
from shared.models import RowState, ScanStatus, Verdict
from shared.scans.folder import ScanFolder
from shared.scans.results import ResultsDB
from shared.settings import Settings
from shared.store import JobReads, JobStore, ScanStore
from tests.conftest import INPROC_MODEL
from tests.helpers import small_jpeg
from tests.worker.scans.test_coordinator import drain_bulk_queue
from worker.runtime import Runtime
from worker.scans import coordinator as coordinator_module
from worker.scans.coordinator import Coordinator
from worker.scans.resolver import RowResolver

pytestmark = pytest.mark.usefixtures("clean_inproc")


class Images(http.server.BaseHTTPRequestHandler):
    """``/img``: one image with an ETag, answering conditional requests as ``mode``
    says: "honest" (304 only for the current ETag), "flip" (304 for the current ETag,
    then the image changes: it changed between the revalidation and the fetch), "lie"
    (304 to every conditional request, whatever the image now is). ``/big/...``: one
    large image under any name, no validators."""

    body: ClassVar[bytes] = b""
    etag: ClassVar[str] = '"0"'
    mode: ClassVar[str] = "honest"
    then: ClassVar[tuple[bytes, str] | None] = None
    big: ClassVar[bytes] = b""
    log: ClassVar[list[tuple[str, int]]] = []  # (conditional or plain, status)

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/big/"):
            self._send(200, Images.big)
            return
        asked = self.headers.get("If-None-Match")
        kind = "conditional" if asked else "plain"
        if asked and (Images.mode == "lie" or asked == Images.etag):
            Images.log.append((kind, 304))
            self.send_response(304)
            self.send_header("ETag", asked)
            self.end_headers()
            if Images.mode == "flip" and Images.then is not None:
                (Images.body, Images.etag), Images.then = Images.then, None
            return
        Images.log.append((kind, 200))
        self._send(200, Images.body, Images.etag)

    def _send(self, status: int, body: bytes, etag: str | None = None) -> None:
        self.send_response(status)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def rt(inproc_settings) -> Iterator[Runtime]:
    runtime = Runtime.start(inproc_settings)
    yield runtime
    runtime.stop()
    runtime.redis.close()


def coordinator(settings: Settings, jobs: JobStore, scans: ScanStore, inproc_redis) -> Coordinator:
    """The in-process coordinator, allowed to fetch from 127.0.0.1 (the test's server)."""
    settings = settings.model_copy(update={"url_allow_hosts": ["127.0.0.1"]})
    resolver = RowResolver(settings, jobs.keys, inproc_redis.cache, wiring.url_policy(settings))
    stores = wiring.stores(settings, sync=inproc_redis)
    return Coordinator(settings, stores, resolver, make_celery(settings))


def start_scan(settings: Settings, scans: ScanStore, scan_id: str, rows: list[dict]) -> ScanFolder:
    folder = ScanFolder(settings.scans_path, scan_id)
    folder.create()
    folder.manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scans.create(scan_id, len(rows), str(folder.manifest), None)
    return folder


def run_scan(coord: Coordinator, rt: Runtime, rdb, folder: ScanFolder) -> dict[str, dict]:
    """The scan run to its end (coordinator slices, the bulk queue's jobs run in this
    process between them): each row's state, error and verdict (with its key)."""
    for _ in range(20):
        if coord.run(folder.scan_id) == "done":
            break
        drain_bulk_queue(rt, rdb)
    summary = coord.scans.summary(folder.scan_id)
    assert summary is not None and summary.status == ScanStatus.SUCCEEDED
    db = ResultsDB(folder.results, readonly=True)
    try:
        return {
            item_id: {
                "state": state,
                "error": error,
                "verdict": json.loads(verdict) if verdict else None,
            }
            for _, item_id, state, _, verdict, error in db.iter_results()
        }
    finally:
        db.close()


def cached_probabilities(reads: JobReads, key: str) -> dict[str, float] | None:
    got = reads.cached_many([key]).get(key)
    return None if got is None else Verdict.model_validate_json(got).probabilities.model_dump()


@pytest.mark.parametrize("mode", ["flip", "lie"])
def test_a_url_whose_image_changes_under_a_304_never_poisons_the_cache(
    mode, image_host, rt, jobs, scans, rdb, inproc_settings, inproc_redis
):
    """Scan one remembers image A's digest for the URL. Then the URL serves B while a
    revalidation is answered 304 (B arrived between the revalidation and the fetch, or
    the server lies): the second scan's row is a miss under A's digest, so the image
    is fetched again, and B comes back. B's verdict is stored under B's key, and the
    row carries it; nothing of B's is stored under A's digest; A's verdict is A's."""
    a, b = small_jpeg(seed=601), small_jpeg(seed=602)
    first, second = "a small square picture", "a noisy picture of nothing"
    Images.body, Images.etag, Images.mode, Images.then, Images.log = a, '"a"', "honest", None, []
    url = f"{image_host}/img"
    coord = coordinator(inproc_settings, jobs, scans, inproc_redis)

    one = start_scan(
        inproc_settings, scans, f"scan-{mode}-1", [{"id": "1", "image_url": url, "text": first}]
    )
    assert run_scan(coord, rt, rdb, one)["1"]["state"] == RowState.DONE
    key_a1 = verdict_key(*INPROC_MODEL, a, first, None)
    direct_a1 = rt.entailer.predict(a, first).probabilities
    assert cached_probabilities(coord.reads, key_a1) == pytest.approx(direct_a1, abs=1e-6)

    if mode == "flip":
        Images.mode, Images.then = "flip", (b, '"b"')
    else:
        Images.mode, Images.body, Images.etag = "lie", b, '"b"'
    Images.log = []
    two = start_scan(
        inproc_settings, scans, f"scan-{mode}-2", [{"id": "2", "image_url": url, "text": second}]
    )
    row = run_scan(coord, rt, rdb, two)["2"]
    # What the server did: the revalidation said "unchanged", the fetch brought B.
    assert Images.log == [("conditional", 304), ("plain", 200)]

    key_a2 = verdict_key(*INPROC_MODEL, a, second, None)
    key_b2 = verdict_key(*INPROC_MODEL, b, second, None)
    direct_a2 = rt.entailer.predict(a, second).probabilities
    direct_b2 = rt.entailer.predict(b, second).probabilities
    assert direct_a2 != pytest.approx(direct_b2, abs=1e-6)  # the checks can tell them apart
    # Nothing under A's digest for this text (no one scored A with it) ...
    assert cached_probabilities(coord.reads, key_a2) is None
    # ... B's verdict under B's key, and the row has it.
    assert cached_probabilities(coord.reads, key_b2) == pytest.approx(direct_b2, abs=1e-6)
    assert row["state"] == RowState.DONE, row
    assert row["verdict"]["key"] == key_b2
    assert row["verdict"]["probabilities"] == pytest.approx(direct_b2, abs=1e-6)
    # A's verdict is still A's; the URL is remembered with B's digest now.
    assert cached_probabilities(coord.reads, key_a1) == pytest.approx(direct_a1, abs=1e-6)
    meta = inproc_redis.cache.hgetall(jobs.keys.url_meta(hashlib.sha256(url.encode()).hexdigest()))
    assert meta[b"sha256"].decode() == hashlib.sha256(b).hexdigest()
    assert meta[b"etag"] == b'"b"'


class _CountingHeld(coordinator_module._Held):
    made: ClassVar[list[coordinator_module._Held]] = []

    def __init__(self, limit: int, most: int) -> None:
        super().__init__(limit, most)
        _CountingHeld.made.append(self)


@pytest.mark.parametrize("bounded", [True, False])
def test_a_chunk_holds_a_bounded_amount_of_image_data(
    bounded, image_host, jobs, scans, rdb, inproc_settings, inproc_redis, monkeypatch
):
    """Forty ~300 KB images fetched in one chunk: with a 1 MiB bound the coordinator
    never holds more than that (its own count) and its Python allocations peak far
    below the chunk's 12 MB of images; with the bound out of the way (the control)
    they do not, so the measurement can tell. Every row still becomes a job whose payload
    is its image."""
    image = small_jpeg(seed=611, size=700)
    rows = 40
    Images.big = image
    limit = 1024**2 if bounded else 1024**3
    settings = inproc_settings.model_copy(
        update={
            "max_upload_bytes": 512 * 1024,
            "scan_chunk_image_bytes": limit,
            "scan_chunk_rows": rows,
            "scan_window": 64,
        }
    )
    coord = coordinator(settings, jobs, scans, inproc_redis)
    manifest = [
        {"id": str(i), "image_url": f"{image_host}/big/{i}.jpg", "text": f"row {i}"}
        for i in range(rows)
    ]
    folder = start_scan(settings, scans, f"scan-held-{bounded}", manifest)
    _CountingHeld.made = []
    monkeypatch.setattr(coordinator_module, "_Held", _CountingHeld)
    tracemalloc.start()
    try:
        assert coord.run(folder.scan_id) == "more"  # every row a job waiting for a worker
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = rows * len(image)
    assert total > 11_000_000
    assert len(_CountingHeld.made) == 1
    held = _CountingHeld.made[0]
    assert held.bytes == 0  # everything handed to the jobs at the end
    if bounded:
        assert held.peak <= limit
        assert peak < total / 2, (peak, total)  # measured: ~3.7 MB of 11.9
    else:
        assert held.peak >= total
        assert peak > total, (peak, total)  # measured: ~24 MB
    db = ResultsDB(folder.results, readonly=True)
    try:
        pending = db.pending()
    finally:
        db.close()
    assert len(pending) == rows
    job_ids = {key: rdb.get(jobs.keys.inflight(key)).decode() for key in pending}
    payloads = Counter(jobs.payloads.get(payload_name(k, j)) == image for k, j in job_ids.items())
    assert payloads == Counter({True: rows})


def test_a_changed_url_whose_new_image_is_cached_takes_that_verdict(
    image_host, rt, jobs, scans, rdb, inproc_settings, inproc_redis
):
    """The URL now serves B, whose verdict for this text is already cached: the row,
    keyed anew by B's bytes, is a hit (looked up again), and no job is made."""
    from shared.wire import queue_name
    from tests.helpers import VERDICT, broker_messages

    a, b = small_jpeg(seed=621), small_jpeg(seed=622)
    text = "a picture that changed"
    url = f"{image_host}/img"
    meta_key = jobs.keys.url_meta(hashlib.sha256(url.encode()).hexdigest())
    inproc_redis.cache.hset(
        meta_key, mapping={"sha256": hashlib.sha256(a).hexdigest(), "etag": '"a"'}
    )
    key_b = verdict_key(*INPROC_MODEL, b, text, None)
    done = jobs.create_or_join(key_b, b, text, None).job_id
    jobs.succeed(done, key_b, VERDICT, cached=False)
    Images.body, Images.etag, Images.mode, Images.then, Images.log = b, '"b"', "lie", None, []
    coord = coordinator(inproc_settings, jobs, scans, inproc_redis)
    folder = start_scan(
        inproc_settings, scans, "scan-rekeyed-hit", [{"id": "1", "image_url": url, "text": text}]
    )
    assert coord.run(folder.scan_id) == "done"
    assert broker_messages(rdb, queue_name(*INPROC_MODEL, bulk=True)) == []
    assert Images.log == [("conditional", 304), ("plain", 200)]
    row = run_scan(coord, rt, rdb, folder)["1"]
    assert row["state"] == RowState.DONE and row["verdict"]["label"] == VERDICT.label
    assert coord.reads.cached_many([verdict_key(*INPROC_MODEL, a, text, None)]) == {}
