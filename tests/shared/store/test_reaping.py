"""The reaper's view of jobs (``shared/store/reaping.py``) on the test Valkey: overdue
jobs in order, forgetting, messages lost between a queue and kombu's unacked hash, and
claiming a lost job once. (The reaper acting on them: ``tests/worker/test_reaper.py``.)"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from shared.celery_app import make_celery
from shared.wire import queue_name
from tests.conftest import INPROC_MODEL
from tests.helpers import submit_job

pytestmark = pytest.mark.usefixtures("clean_inproc")


def by_queue(record: dict[str, str]) -> str:
    return queue_name(record["model"], record["revision"])


@pytest.fixture
def unacked_key(rdb: redis.Redis):
    key = f"unacked.reaping.{uuid.uuid4().hex[:8]}"
    yield key
    rdb.delete(key)


def test_overdue_jobs_come_most_overdue_first_up_to_the_limit(jobs, reaping, rdb):
    ids = [jobs.create_or_join(f"o{i}", b"img", f"overdue {i}", None).job_id for i in range(3)]
    now = time.time()
    rdb.zadd(jobs.keys.job_deadlines(), {ids[0]: now - 1, ids[1]: now - 30, ids[2]: now + 60})
    assert reaping.overdue() == [ids[1], ids[0]]  # the one not due yet is left
    assert reaping.overdue(limit=1) == [ids[1]]


def test_forget_drops_a_job_from_both_indexes(jobs, reaping, rdb):
    job_id = jobs.create_or_join("f1", b"img", "forgotten", None).job_id
    rdb.zadd(jobs.keys.job_pending(), {job_id: time.time()})
    rdb.zadd(jobs.keys.job_deadlines(), {job_id: time.time() - 1})
    reaping.forget(job_id)
    assert rdb.zscore(jobs.keys.job_deadlines(), job_id) is None
    assert rdb.zscore(jobs.keys.job_pending(), job_id) is None
    assert jobs.record(job_id)  # the record itself stays


def test_a_message_neither_queued_nor_held_is_lost(inproc_settings, reaping, rdb, unacked_key):
    celery = make_celery(inproc_settings)
    queue = queue_name(*INPROC_MODEL)
    taken, _ = submit_job(inproc_settings, celery, "m1", b"img", "taken and lost", None)
    queued, _ = submit_job(inproc_settings, celery, "m2", b"img", "on its queue", None)
    held, _ = submit_job(inproc_settings, celery, "m3", b"img", "held by a worker", None)
    assert json.loads(rdb.rpop(queue))["headers"]["id"] == taken  # a worker died with it
    message = rdb.lpop(queue)  # the newest, taken and entered in the unacked hash
    assert json.loads(message)["headers"]["id"] == held
    rdb.hset(unacked_key, "tag-1", json.dumps([json.loads(message), "", queue]))

    assert reaping.lost_messages(by_queue, unacked_key, grace_s=30) == []  # too recent
    lost = reaping.lost_messages(by_queue, unacked_key, grace_s=0.0)
    assert [job_id for job_id, _ in lost] == [taken]
    record = lost[0][1]
    assert record["status"] == "queued" and record["text"] == "taken and lost"
    assert reaping.lost_messages(by_queue, unacked_key, 0.0, only=[queued, held]) == []


def test_a_job_started_since_its_send_is_not_lost(inproc_settings, jobs, reaping, rdb, unacked_key):
    celery = make_celery(inproc_settings)
    job_id, _ = submit_job(inproc_settings, celery, "s1", b"img", "started then put back", None)
    rdb.rpop(queue_name(*INPROC_MODEL))
    rdb.hset(jobs.keys.job(job_id), "attempts", "1")  # taken and started: acknowledged
    assert reaping.lost_messages(by_queue, unacked_key, grace_s=0.0) == []


def test_a_lost_job_is_claimed_once(inproc_settings, jobs, reaping, rdb, unacked_key):
    celery = make_celery(inproc_settings)
    job_id, _ = submit_job(inproc_settings, celery, "c1", b"img", "claimed once", None)
    rdb.rpop(queue_name(*INPROC_MODEL))
    [(found, record)] = reaping.lost_messages(by_queue, unacked_key, grace_s=0.0)
    assert found == job_id
    assert reaping.claim_lost(job_id, record)
    assert not reaping.claim_lost(job_id, record)  # sent again since: nothing to do
    after = jobs.record(job_id)
    assert after["dispatches"] == "1"
    deadline = rdb.zscore(jobs.keys.job_deadlines(), job_id)
    assert deadline is not None and deadline > time.time()
