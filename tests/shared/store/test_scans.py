"""``ScanStore`` against a real Valkey: every transition of a scan."""

from __future__ import annotations

import time

import pytest

from shared import wiring
from shared.models import ScanCounts, ScanStatus
from shared.store import ScanStore, summarize

pytestmark = pytest.mark.usefixtures("clean_inproc")


def test_scan_lifecycle(scans: ScanStore, inproc_settings):
    scans.create("s1", 10, "/m.jsonl", "http://cb")
    assert scans.status("s1") == ScanStatus.QUEUED
    scans.start("s1")
    scans.publish_counts("s1", ScanCounts(read=4, done=3, cached=1, failed=1))
    summary = scans.summary("s1")
    assert summary is not None and summary.status == ScanStatus.RUNNING
    assert (summary.done, summary.failed, summary.cached, summary.total) == (3, 1, 1, 10)
    assert summary.callback_url == "http://cb"
    token = scans.lock("s1", 5)
    assert token and scans.lock("s1", 5) is None
    scans.unlock("s1", "not-mine")
    assert scans.lock("s1", 5) is None
    scans.unlock("s1", token)
    assert scans.lock("s1", 5) is not None
    scans.finish("s1", ScanCounts(read=10, done=9, failed=1))
    final = scans.summary("s1")
    assert final is not None and final.status == ScanStatus.SUCCEEDED and final.eta_s == 0.0


def test_cancel_only_unfinished_scans(scans: ScanStore, on_loop):
    scans.create("a", 1, "/m", None)
    scans.create("b", 1, "/m", None)
    scans.finish("b", ScanCounts(read=1, done=1))

    async def go(stores: wiring.Stores) -> tuple:
        return (
            await stores.scans.acancel("a"),
            await stores.scans.acancel("b"),
            await stores.scans.acancel("missing"),
        )

    a, b, missing = on_loop(go)
    assert a.status == ScanStatus.CANCELLED and b.status == ScanStatus.SUCCEEDED
    assert missing is None


def test_summary_rate_and_eta():
    now = time.time()
    s = summarize(
        "x",
        {
            "status": "running",
            "total": "100",
            "done": "40",
            "failed": "10",
            "started_at": str(now - 10),
        },
    )
    assert s.rate_rows_per_s == pytest.approx(5.0, rel=0.05)
    assert s.eta_s == pytest.approx(10.0, rel=0.05)
    assert summarize("y", {"status": "queued"}).eta_s == 0.0
