"""Leases held for as long as the work runs: a job whose preparation (waiting for the
bulk preparation slot, decoding its image) outlasts its lease is not sent again, nor
started by a second worker, and is computed once. The worker's code called directly
on the tiny checkpoint, against the embedded Valkey, with a lease of 0.6 s and a reaper
pass every 0.2 s in the same process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared.models import JobStatus
from shared.store import StartAction
from shared.wire import EntailTask
from tests.helpers import batch_stats, settled, small_jpeg
from tests.worker.test_jobs import queued as queued_job
from worker import jobs as worker_jobs
from worker.jobs import Handled, run_chunk, run_job
from worker.leases import Leases
from worker.runtime import Runtime

pytestmark = pytest.mark.usefixtures("clean_inproc")

LEASE_S = 0.6
SLOW_S = 3 * LEASE_S  # how long preparation takes: three leases


@pytest.fixture(scope="module")
def rt(inproc_settings) -> Iterator[Runtime]:
    settings = inproc_settings.model_copy(update={"lease_s": LEASE_S, "reaper_interval_s": 0.2})
    runtime = Runtime.start(settings)
    yield runtime
    runtime.stop()
    runtime.redis.close()


def queued(rt: Runtime, seed: int, scan_id: str | None = None) -> EntailTask:
    return queued_job(rt, small_jpeg(seed=seed), f"slow to prepare {seed}", scan_id)


def in_thread(work: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)
    thread.start()
    return thread, out


def second_worker_tries(rt: Runtime, msgs: list[EntailTask]) -> list[StartAction]:
    """What another worker, given the same messages (the reaper's, or a redelivery),
    would be told once the first leases would have run out without renewal."""
    time.sleep(2 * LEASE_S)
    return [rt.jobs.start(m.job_id, m.key).action for m in msgs]


def items_scored(rt: Runtime) -> int:
    return settled(lambda: batch_stats(rt.settings), settle_s=0.2).get("items", 0)


def test_a_group_whose_decoding_outlasts_its_lease_is_computed_once(rt, monkeypatch):
    msgs = [queued(rt, seed=810 + i) for i in range(3)]
    prepare = rt.entailer.prepare

    def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        time.sleep(SLOW_S / len(msgs))  # the group's images take three leases in all
        return prepare(*args, **kwargs)

    monkeypatch.setattr(rt.entailer, "prepare", slow_prepare)
    before = items_scored(rt)
    thread, out = in_thread(lambda: worker_jobs.run_many(rt, msgs, 0))
    assert second_worker_tries(rt, msgs) == [StartAction.BUSY] * 3
    thread.join(timeout=30)
    outcomes: list[Handled] = out[0]
    assert [o.kind for o in outcomes] == ["scored"] * 3
    for msg in msgs:
        record = rt.jobs.record(msg.job_id)
        assert record["status"] == JobStatus.SUCCEEDED
        assert record["attempts"] == "1" and "dispatches" not in record, record
    assert items_scored(rt) == before + 3  # computed once


def test_a_chunk_waiting_for_the_preparation_slot_keeps_its_leases(rt):
    msgs = [queued(rt, seed=820 + i, scan_id="slow-scan") for i in range(4)]
    slots = 0
    while worker_jobs.BULK_PREPARE.acquire(blocking=False):  # every slot busy elsewhere
        slots += 1
    try:
        before = items_scored(rt)
        thread, out = in_thread(lambda: run_chunk(rt, msgs))
        assert second_worker_tries(rt, msgs) == [StartAction.BUSY] * 4
        time.sleep(LEASE_S)
    finally:
        for _ in range(slots):
            worker_jobs.BULK_PREPARE.release()
    thread.join(timeout=30)
    assert out == [{"scored": 4, "cached": 0, "skipped": 0, "retried": 0}]
    for msg in msgs:
        record = rt.jobs.record(msg.job_id)
        assert record["attempts"] == "1" and "dispatches" not in record, record
    assert items_scored(rt) == before + 4


def test_a_job_alone_holds_its_lease_while_it_prepares(rt, monkeypatch):
    msg = queued(rt, seed=830)
    prepare = rt.entailer.prepare

    def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        time.sleep(SLOW_S)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(rt.entailer, "prepare", slow_prepare)
    thread, out = in_thread(lambda: run_job(rt, msg))
    assert second_worker_tries(rt, [msg]) == [StartAction.BUSY]
    thread.join(timeout=30)
    assert out[0].kind == "scored"
    assert rt.jobs.record(msg.job_id)["attempts"] == "1"


def test_a_hold_past_the_hard_limit_is_let_go(rt):
    msg = queued(rt, seed=840)
    assert rt.jobs.start(msg.job_id, msg.key).action == StartAction.RUN
    leases = Leases(rt.jobs, LEASE_S, max_hold_s=2 * LEASE_S)
    try:
        held = leases.hold([msg.job_id])
        assert leases.held() == [msg.job_id]
        time.sleep(4 * LEASE_S)  # a stuck thread: renewed at first, then let go
        assert leases.held() == []
        assert held.held() == [msg.job_id]  # the thread still thinks it holds it
    finally:
        leases.stop()
