"""The scan lock held for as long as a slice runs: a chunk of URL rows whose image host
answers slowly enough to outlast the lock keeps one coordinator, and every row's state
stays right. Two in-process coordinators race for one scan against the embedded Valkey
and a real, slow HTTP server; the lock's time to live is cut to one second."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest

from shared import wiring
from shared.celery_app import make_celery
from shared.keys import verdict_key
from shared.models import RowState, ScanStatus
from shared.scans.folder import ScanFolder
from shared.scans.results import ResultsDB
from shared.settings import Settings
from shared.store import ScanStore
from tests.conftest import INPROC_MODEL
from tests.helpers import VERDICT, small_jpeg
from worker.scans.coordinator import Coordinator
from worker.scans.resolver import RowResolver

pytestmark = pytest.mark.usefixtures("clean_inproc")

LOCK_TTL_S = 1
SLOW_S = 3.0 * LOCK_TTL_S  # each image answers after three of the lock's lives
ROWS = 4


class SlowImages(http.server.BaseHTTPRequestHandler):
    """``/img/{n}``: image ``n``, answered after ``SLOW_S``; each request counted."""

    hits: ClassVar[dict[str, int]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with SlowImages.lock:
            SlowImages.hits[self.path] = SlowImages.hits.get(self.path, 0) + 1
        time.sleep(SLOW_S)
        body = small_jpeg(seed=900 + int(self.path.rsplit("/", 1)[1]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def slow_host() -> Iterator[str]:
    SlowImages.hits = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def settings(inproc_settings) -> Settings:
    """Fetching from the test's host allowed; a lease short enough that a running
    scan's deadline (two slices and a lease) passes within one slow chunk too."""
    return inproc_settings.model_copy(
        update={"url_allow_hosts": ["127.0.0.1"], "url_timeout_s": 4 * SLOW_S, "lease_s": 0.5}
    )


@pytest.fixture
def scans(settings, inproc_redis) -> ScanStore:
    return wiring.stores(settings, sync=inproc_redis).scans


def coordinator(settings, jobs, scans, inproc_redis) -> Coordinator:
    resolver = RowResolver(settings, jobs.keys, inproc_redis.cache, wiring.url_policy(settings))
    coord = Coordinator(
        settings, wiring.stores(settings, sync=inproc_redis), resolver, make_celery(settings)
    )
    coord.lock_ttl_s = LOCK_TTL_S
    return coord


def slow_scan(settings, scans, jobs, host: str, scan_id: str) -> ScanFolder:
    """A scan of ``ROWS`` URL rows whose verdicts are cached: each row is done once its
    image is fetched (the key needs the bytes)."""
    rows = []
    for n in range(ROWS):
        text = f"slow row {n}"
        key = verdict_key(*INPROC_MODEL, small_jpeg(seed=900 + n), text, None)
        jobs.sync.cache.set(jobs.keys.verdict(key), VERDICT.model_dump_json())
        rows.append({"id": f"r{n}", "image": f"{host}/img/{n}", "text": text})
    folder = ScanFolder(settings.scans_path, scan_id)
    folder.create()
    folder.manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scans.create(scan_id, ROWS, str(folder.manifest), None)
    return folder


def run_in_thread(coord: Coordinator, scan_id: str) -> tuple[threading.Thread, list[str]]:
    out: list[str] = []
    thread = threading.Thread(target=lambda: out.append(coord.run(scan_id)), daemon=True)
    thread.start()
    return thread, out


def test_a_slow_chunk_keeps_its_coordinator_and_every_row(
    settings, jobs, scans, inproc_redis, slow_host, rdb
):
    first = coordinator(settings, jobs, scans, inproc_redis)
    second = coordinator(settings, jobs, scans, inproc_redis)
    folder = slow_scan(settings, scans, jobs, slow_host, "slow-lock")
    thread, out = run_in_thread(first, folder.scan_id)
    tries = []
    deadline = time.monotonic() + SLOW_S - 0.3
    time.sleep(LOCK_TTL_S + 0.3)  # the lock would have run out by now
    while time.monotonic() < deadline:  # a second coordinator keeps trying (a reaper's
        tries.append(second.run(folder.scan_id))  # slice, or a redelivered one)
        # The scan's deadline moves with the lock: the reaper never sees it overdue.
        assert folder.scan_id not in scans.overdue()
        time.sleep(0.3)
    thread.join(timeout=30)
    assert tries and set(tries) == {"busy"}, tries
    assert out in (["more"], ["done"])  # the chunk outlasted the slice: "more" is due
    if out == ["more"]:  # the next slice (its own message in service) finishes it
        assert first.run(folder.scan_id) == "done"
    assert SlowImages.hits == {f"/img/{n}": 1 for n in range(ROWS)}  # fetched by one
    summary = scans.summary(folder.scan_id)
    assert summary is not None and summary.status == ScanStatus.SUCCEEDED
    assert (summary.done, summary.cached, summary.failed) == (ROWS, ROWS, 0)
    db = ResultsDB(folder.results, readonly=True)
    try:
        states = {item_id: state for _, item_id, state, *_ in db.iter_results()}
    finally:
        db.close()
    assert states == {f"r{n}": RowState.DONE for n in range(ROWS)}


def test_a_slice_that_lost_its_lock_writes_nothing(
    settings, jobs, scans, inproc_redis, slow_host, rdb
):
    coord = coordinator(settings, jobs, scans, inproc_redis)
    folder = slow_scan(settings, scans, jobs, slow_host, "lost-lock")
    thread, out = run_in_thread(coord, folder.scan_id)
    time.sleep(0.5)
    # As if this process had been frozen past the lock's life and another coordinator
    # had taken the scan: the lock now carries another's token.
    rdb.set(jobs.keys.scan_lock(folder.scan_id), "another-coordinator", ex=60)
    thread.join(timeout=30)
    assert out == ["lost"]
    assert rdb.get(jobs.keys.scan_lock(folder.scan_id)) == b"another-coordinator"
    db = ResultsDB(folder.results, readonly=True)
    try:
        assert db.cursor_position()[0] == 0  # no row recorded by the slice that lost it
    finally:
        db.close()
