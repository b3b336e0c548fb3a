"""One reaper pass, called directly against the embedded Valkey."""

from __future__ import annotations

import json
import time

import pytest
import redis

from shared.celery_app import make_celery
from shared.models import JobStatus, ScanCounts
from shared.store import JobStore
from shared.submit import BulkItem, submit_bulk
from shared.wire import EntailTask, queue_name
from tests.conftest import INPROC_MODEL
from tests.helpers import broker_messages, run_async, submit_job
from worker.reaper import LOST_CONFIRM_S, Reaper

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def reaper(inproc_settings, stores, rdb: redis.Redis) -> Reaper:
    rdb.delete(stores.jobs.keys.reaper_lock())
    return Reaper(inproc_settings, stores, make_celery(inproc_settings))


def overdue(rdb: redis.Redis, jobs: JobStore, job_id: str) -> None:
    rdb.zadd(jobs.keys.job_deadlines(), {job_id: time.time() - 1})


def test_overdue_jobs_are_sent_again_from_their_record(reaper, jobs, rdb):
    queued = jobs.create_or_join("r1", b"img", "a lost message", "a premise").job_id
    running = jobs.create_or_join("r2", b"img", "a dead worker", None, scan_id="s9").job_id
    jobs.start(running, "r2")
    live = jobs.create_or_join("r3", b"img", "on time", None).job_id
    overdue(rdb, jobs, queued)
    overdue(rdb, jobs, running)
    assert reaper.run_once() == {"resent": 2, "poisoned": 0, "scans_resent": 0, "lost": 0}
    sent = [
        EntailTask.model_validate(m["kwargs"]["msg"])
        for m in broker_messages(rdb, queue_name(*INPROC_MODEL))
    ]
    bulk = [
        EntailTask.model_validate(m["kwargs"]["msg"])
        for m in broker_messages(rdb, queue_name(*INPROC_MODEL, bulk=True))
    ]
    assert [(m.job_id, m.text, m.premise) for m in sent] == [
        (queued, "a lost message", "a premise")
    ]
    assert [(m.job_id, m.scan_id) for m in bulk] == [(running, "s9")]
    for job_id in (queued, running):
        record = jobs.record(job_id)
        assert record["status"] == JobStatus.QUEUED and record["dispatches"] == "1"
        assert rdb.zscore(jobs.keys.job_deadlines(), job_id) > time.time() + 100
    assert live not in {m.job_id for m in sent}
    stats = rdb.hgetall(jobs.keys.reaper_stats())
    assert stats[b"resent"] == b"2" and float(stats[b"last_run"]) > time.time() - 5


def test_one_reaper_acts_per_period(reaper, inproc_settings, stores):
    other = Reaper(inproc_settings, stores, reaper.celery)
    assert reaper.run_once() is not None
    assert other.run_once() is None


def test_poison_and_never_started_jobs_fail_and_free_their_key(
    reaper, inproc_settings, jobs, reads, rdb
):
    poison = jobs.create_or_join("r4", b"img", "t", None).job_id
    for _ in range(inproc_settings.max_attempts):
        overdue(rdb, jobs, poison)
        jobs.start(poison, "r4")
    overdue(rdb, jobs, poison)
    orphan = jobs.create_or_join("r5", b"img", "t", None).job_id
    rdb.hset(jobs.keys.job(orphan), "dispatches", str(inproc_settings.max_dispatches))
    overdue(rdb, jobs, orphan)
    assert reaper.run_once() == {"resent": 0, "poisoned": 2, "scans_resent": 0, "lost": 0}
    assert "gave up after 3 attempts" in (reads.get(poison).error or "")  # type: ignore[union-attr]
    assert "no worker took this job" in (reads.get(orphan).error or "")  # type: ignore[union-attr]
    assert not rdb.exists(jobs.keys.inflight("r4"), jobs.keys.inflight("r5"))
    assert run_async(inproc_settings, lambda st: st.reads.abacklog()) == (0, 0, None)


def test_vanished_and_finished_jobs_are_forgotten(reaper, jobs, rdb):
    rdb.zadd(jobs.keys.job_deadlines(), {"gone": time.time() - 1})
    assert reaper.run_once() == {
        "resent": 0,
        "poisoned": 0,
        "scans_resent": 0,
        "lost": 0,
        "forgotten": 1,
    }
    assert rdb.zscore(jobs.keys.job_deadlines(), "gone") is None


def test_a_quiet_scan_gets_its_next_slice(reaper, scans, rdb):
    scans.create("quiet", 3, "/m.jsonl", None)
    rdb.zadd(scans.keys.scan_deadlines(), {"quiet": time.time() - 1})
    assert reaper.run_once() == {"resent": 0, "poisoned": 0, "scans_resent": 1, "lost": 0}
    assert rdb.zscore(scans.keys.scan_deadlines(), "quiet") > time.time() + 100
    scans.finish("quiet", ScanCounts())
    assert rdb.zscore(scans.keys.scan_deadlines(), "quiet") is None


# -- lost messages: taken off a queue by a worker that died before recording them ------


@pytest.fixture
def quick(inproc_settings, stores, rdb: redis.Redis) -> Reaper:
    """A reaper that counts a message lost as soon as it is missing (no grace)."""
    rdb.delete(stores.jobs.keys.reaper_lock())
    settings = inproc_settings.model_copy(update={"lost_message_grace_s": 0.0})
    return Reaper(settings, stores, make_celery(settings))


def next_turn(reaper: Reaper, rdb: redis.Redis) -> dict[str, int] | None:
    rdb.delete(reaper.jobs.keys.reaper_lock())
    return reaper.run_once()


def test_a_message_a_dead_worker_took_is_sent_again_at_once(quick, jobs, rdb):
    queue = queue_name(*INPROC_MODEL)
    lost, _ = submit_job(quick.settings, quick.celery, "l1", b"img", "taken and lost", None)
    waiting, _ = submit_job(quick.settings, quick.celery, "l2", b"img", "still queued", None)
    # A worker's BRPOP takes the oldest message; the worker dies before kombu records it.
    taken = json.loads(rdb.rpop(queue))
    assert taken["headers"]["id"] == lost
    started = time.monotonic()
    assert next_turn(quick, rdb) == {"resent": 1, "poisoned": 0, "scans_resent": 0, "lost": 1}
    assert time.monotonic() - started >= LOST_CONFIRM_S  # looked at twice
    sent = [m["kwargs"]["msg"]["job_id"] for m in broker_messages(rdb, queue)]
    assert sorted(sent) == sorted([lost, waiting])  # sent again; the queued one left alone
    record = jobs.record(lost)
    assert record["status"] == JobStatus.QUEUED and record["dispatches"] == "1"
    assert record["dispatch_attempts"] == "0" and float(record["dispatched_at"]) > time.time() - 5
    assert "dispatches" not in jobs.record(waiting)
    # Its new message is on the queue: nothing is lost any more.
    assert next_turn(quick, rdb)["lost"] == 0  # type: ignore[index]


def test_messages_a_live_worker_holds_and_jobs_put_back_are_not_lost(quick, jobs, rdb):
    queue = queue_name(*INPROC_MODEL)
    held, _ = submit_job(quick.settings, quick.celery, "l3", b"img", "held by a worker", None)
    put_back, _ = submit_job(
        quick.settings, quick.celery, "l4", b"img", "started, then put back", None
    )
    with quick.celery.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        message = simple.get(timeout=2)  # taken through kombu: in its unacked hash
        assert message.headers["id"] == held
        rdb.rpop(queue)  # the other job's message: taken, started, acknowledged ...
        assert jobs.start(put_back, "l4").action == "run"
        jobs.release(put_back)  # ... and put back to queued after a transient error
        assert next_turn(quick, rdb)["lost"] == 0  # type: ignore[index]
        message.ack()
        simple.close()
    assert jobs.record(put_back)["status"] == JobStatus.QUEUED
    assert "dispatches" not in jobs.record(put_back)


def test_a_lost_scan_chunk_is_sent_again_job_by_job(quick, jobs, rdb):
    bulk = queue_name(*INPROC_MODEL, bulk=True)
    items = [BulkItem(f"c{i}", b"img", f"row {i}", None) for i in range(5)]
    first = submit_bulk(jobs, quick.celery, "scan-a", items[:3], chunk=32)
    second = submit_bulk(jobs, quick.celery, "scan-a", items[3:], chunk=32)
    assert next_turn(quick, rdb)["lost"] == 0  # type: ignore[index]  # both chunks queued
    rdb.rpop(bulk)  # the first chunk, taken by a worker that died
    assert next_turn(quick, rdb)["lost"] == 3  # type: ignore[index]
    singles = [m for m in broker_messages(rdb, bulk) if "job_id" in m["kwargs"]["msg"]]
    assert sorted(m["kwargs"]["msg"]["job_id"] for m in singles) == sorted(first)
    assert all(jobs.record(j).get("dispatches") is None for j in second)


def test_a_long_queue_is_read_only_at_its_old_end(quick, reaping, rdb):
    queue = queue_name(*INPROC_MODEL)
    ids = [
        submit_job(quick.settings, quick.celery, f"w{i}", b"img", f"n {i}", None)[0]
        for i in range(4)
    ]
    lost = ids[0]
    rdb.rpop(queue)  # the oldest, taken and lost
    got = reaping.lost_messages(
        lambda r: queue_name(r["model"], r["revision"]), quick.unacked_key, 0.0, window=1
    )
    # Read one message deep, the queue of three: the lost job was sent before the
    # earliest message read, the two newer ones may be further along the queue.
    assert [job_id for job_id, _ in got] == [lost]


def test_the_reaper_sweeps_orphaned_payloads(quick, jobs):
    """A payload written but never recorded (the submitter crashed in between) is
    removed by the reaper once past the grace; an unfinished job's stays."""
    import uuid

    from shared.keys import payload_name

    live = jobs.create_or_join("sw1", b"live", "t", None).job_id
    orphan = payload_name("sw2", uuid.uuid4().hex)
    jobs.payloads.put(orphan, b"orphan")
    time.sleep(0.01)
    assert quick.sweep_payloads(grace_s=0, force=True) >= 1
    assert jobs.payloads.get(orphan) is None
    assert jobs.payloads.get(payload_name("sw1", live)) == b"live"
