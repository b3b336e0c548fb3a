"""One reaper pass, called directly against the embedded Valkey."""

from __future__ import annotations

import time

import pytest
import redis

from shared.celery_app import make_celery, queue_name
from shared.messages import EntailTask, JobStatus, ScanCounts
from shared.reaper import Reaper
from shared.store import JobStore, ScanStore
from tests.conftest import INPROC_MODEL
from tests.helpers import broker_messages

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def reaper(inproc_settings, jobs: JobStore, scans: ScanStore, rdb: redis.Redis) -> Reaper:
    rdb.delete(jobs.keys.reaper_lock())
    return Reaper(inproc_settings, jobs, scans, make_celery(inproc_settings))


def overdue(rdb: redis.Redis, jobs: JobStore, job_id: str) -> None:
    rdb.zadd(jobs.keys.job_deadlines(), {job_id: time.time() - 1})


def test_overdue_jobs_are_sent_again_from_their_record(reaper, jobs, rdb):
    queued = jobs.create_or_join("r1", b"img", "a lost message", "a premise").job_id
    running = jobs.create_or_join("r2", b"img", "a dead worker", None, scan_id="s9").job_id
    jobs.start(running, "r2")
    live = jobs.create_or_join("r3", b"img", "on time", None).job_id
    overdue(rdb, jobs, queued)
    overdue(rdb, jobs, running)
    assert reaper.run_once() == {"resent": 2, "poisoned": 0, "scans_resent": 0}
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


def test_one_reaper_acts_per_period(reaper, inproc_settings, jobs, scans):
    other = Reaper(inproc_settings, jobs, scans, reaper.celery)
    assert reaper.run_once() is not None
    assert other.run_once() is None


def test_poison_and_never_started_jobs_fail_and_free_their_key(reaper, inproc_settings, jobs, rdb):
    poison = jobs.create_or_join("r4", b"img", "t", None).job_id
    for _ in range(inproc_settings.max_attempts):
        overdue(rdb, jobs, poison)
        jobs.start(poison, "r4")
    overdue(rdb, jobs, poison)
    orphan = jobs.create_or_join("r5", b"img", "t", None).job_id
    rdb.hset(jobs.keys.job(orphan), "dispatches", str(inproc_settings.max_dispatches))
    overdue(rdb, jobs, orphan)
    assert reaper.run_once() == {"resent": 0, "poisoned": 2, "scans_resent": 0}
    assert "gave up after 3 attempts" in (jobs.get(poison).error or "")  # type: ignore[union-attr]
    assert "no worker took this job" in (jobs.get(orphan).error or "")  # type: ignore[union-attr]
    assert not rdb.exists(jobs.keys.inflight("r4"), jobs.keys.inflight("r5"))
    assert jobs.backlog() == (0, 0, None)


def test_vanished_and_finished_jobs_are_forgotten(reaper, jobs, rdb):
    rdb.zadd(jobs.keys.job_deadlines(), {"gone": time.time() - 1})
    assert reaper.run_once() == {"resent": 0, "poisoned": 0, "scans_resent": 0, "forgotten": 1}
    assert rdb.zscore(jobs.keys.job_deadlines(), "gone") is None


def test_a_quiet_scan_gets_its_next_slice(reaper, scans, rdb):
    scans.create("quiet", 3, "/m.jsonl", None)
    rdb.zadd(scans.keys.scan_deadlines(), {"quiet": time.time() - 1})
    assert reaper.run_once() == {"resent": 0, "poisoned": 0, "scans_resent": 1}
    assert rdb.zscore(scans.keys.scan_deadlines(), "quiet") > time.time() + 100
    scans.finish("quiet", ScanCounts())
    assert rdb.zscore(scans.keys.scan_deadlines(), "quiet") is None
