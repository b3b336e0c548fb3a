"""``JobStore`` against a real Valkey: every transition of a job."""

from __future__ import annotations

import time

import pytest
import redis

from shared.models import JobStatus
from shared.store import JobReads, JobReaping, JobStore, StartAction
from tests.helpers import VERDICT

pytestmark = pytest.mark.usefixtures("clean_inproc")


def test_create_join_start_succeed(jobs: JobStore, reads: JobReads, rdb: redis.Redis, on_loop):
    got = jobs.create_or_join("k1", b"img", "a cat", None)
    assert got.created and not got.overdue
    job_id = got.job_id
    job = reads.get(job_id)
    assert job is not None and job.status == JobStatus.QUEUED and job.created_at
    # Queued with a dispatch deadline, in the pending index.
    deadline = rdb.zscore(jobs.keys.job_deadlines(), job_id)
    assert deadline is not None and deadline > time.time() + 100
    assert on_loop(lambda st: st.reads.abacklog())[0] == 1
    joined = jobs.create_or_join("k1", b"img", "a cat", None)
    assert (joined.job_id, joined.created) == (job_id, False) and reads.is_shared(job_id)
    started = jobs.start(job_id, "k1")
    assert started.action == "run" and started.cached is None and started.blob == b"img"
    assert started.attempts == 1
    assert reads.get(job_id).status == JobStatus.RUNNING  # type: ignore[union-attr]
    lease = rdb.zscore(jobs.keys.job_deadlines(), job_id)
    assert lease is not None and lease < deadline  # a 30 s lease, not the dispatch deadline
    # A second message while the lease is live: nothing to do.
    assert jobs.start(job_id, "k1").action == "busy"
    jobs.succeed(job_id, "k1", VERDICT, cached=False)
    done = reads.get(job_id)
    assert done is not None and done.status == JobStatus.SUCCEEDED and done.verdict == VERDICT
    assert not rdb.exists(jobs.keys.blob("k1"))
    assert rdb.zscore(jobs.keys.job_deadlines(), job_id) is None
    assert on_loop(lambda st: st.reads.abacklog())[0] == 0
    # The mark stays with the finished job: a racing submit joins it.
    assert jobs.create_or_join("k1", b"img", "a cat", None).job_id == job_id
    assert reads.cached_many(["k1", "k2"]) == {"k1": VERDICT.model_dump_json().encode()}
    # A message for a finished job does nothing.
    assert jobs.start(job_id, "k1").action == "finished"
    assert jobs.start("no-such-job", "k1").action == "gone"


def test_a_redelivery_after_the_lease_finishes_from_the_cache(
    jobs: JobStore, reaping: JobReaping, rdb: redis.Redis
):
    job_id = jobs.create_or_join("k5", b"img", "t", None).job_id
    jobs.start(job_id, "k5")
    rdb.set(jobs.keys.verdict("k5"), VERDICT.model_dump_json())
    rdb.zadd(jobs.keys.job_deadlines(), {job_id: time.time() - 1})  # the lease ran out
    assert reaping.overdue() == [job_id]
    again = jobs.start(job_id, "k5")
    assert again.action == "run" and again.cached == VERDICT.model_dump_json().encode()
    assert again.blob is None and again.attempts == 2


def test_release_requeues_with_backoff_and_poison_after_max_attempts(
    jobs: JobStore, reads: JobReads, rdb: redis.Redis, inproc_settings
):
    job_id = jobs.create_or_join("k6", b"img", "t", None).job_id
    for attempt in range(1, inproc_settings.max_attempts + 1):
        started = jobs.start(job_id, "k6")
        assert started.action == "run" and started.attempts == attempt
        backoff = jobs.release(job_id)
        assert backoff == inproc_settings.retry_backoff_s * 2 ** (attempt - 1)
        assert reads.get(job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
    assert jobs.start(job_id, "k6").action == "poison"


def test_renew_extends_only_unfinished_leases(jobs: JobStore, rdb: redis.Redis):
    live = jobs.create_or_join("k7", b"img", "t", None).job_id
    jobs.start(live, "k7")
    rdb.zadd(jobs.keys.job_deadlines(), {live: time.time() + 1})
    jobs.renew([live, "finished-long-ago"])
    assert rdb.zscore(jobs.keys.job_deadlines(), live) > time.time() + 20
    assert rdb.zscore(jobs.keys.job_deadlines(), "finished-long-ago") is None
    # Only an overdue job can be claimed for sending again, and only once.
    assert not jobs.claim_overdue(live)
    rdb.zadd(jobs.keys.job_deadlines(), {live: time.time() - 1})
    assert jobs.claim_overdue(live) and not jobs.claim_overdue(live)
    record = jobs.record(live)
    assert record["status"] == JobStatus.QUEUED and record["dispatches"] == "1"


def test_joining_an_overdue_job_says_so(jobs: JobStore, rdb: redis.Redis):
    job_id = jobs.create_or_join("k8", b"img", "t", None).job_id
    rdb.zadd(jobs.keys.job_deadlines(), {job_id: time.time() - 5})
    joined = jobs.create_or_join("k8", b"img", "t", None)
    assert joined.job_id == job_id and not joined.created and joined.overdue


def test_fail_frees_the_key(jobs: JobStore, reads: JobReads, rdb: redis.Redis):
    job_id = jobs.create_or_join("k2", b"img", "t", "p", scan_id="s1").job_id
    jobs.fail(job_id, "k2", "broken")
    job = reads.get(job_id)
    assert job is not None and job.status == JobStatus.FAILED and job.error == "broken"
    assert not rdb.exists(jobs.keys.inflight("k2"), jobs.keys.blob("k2"))
    other = jobs.create_or_join("k2", b"img", "t", "p")
    assert other.created and other.job_id != job_id
    [outcome] = reads.outcomes([job_id])
    assert outcome.status == JobStatus.FAILED and outcome.scan_id == "s1"


def test_a_mark_without_its_record_is_replaced(jobs: JobStore, rdb: redis.Redis):
    rdb.set(jobs.keys.inflight("k3"), "ghost")
    got = jobs.create_or_join("k3", b"img", "t", None)
    assert got.created and got.job_id != "ghost"


def test_jobs_a_scan_has_copied_linger_briefly(jobs: JobStore, rdb: redis.Redis):
    from shared.store.jobs import SCAN_JOB_LINGER_S

    made = {k: jobs.create_or_join(k, b"img", "t", None, scan_id="s2").job_id for k in "ab"}
    other = jobs.create_or_join("c", b"img", "t", None, scan_id="s2").job_id
    for key, job_id in made.items():
        jobs.succeed(job_id, key, VERDICT, cached=False)
    jobs.linger([(key, job_id) for key, job_id in made.items()] + [("gone", "gone")])
    for key, job_id in made.items():
        for name in (jobs.keys.job(job_id), jobs.keys.inflight(key)):
            assert 0 < rdb.ttl(name) <= SCAN_JOB_LINGER_S
    assert rdb.ttl(jobs.keys.job(other)) > SCAN_JOB_LINGER_S  # not copied: untouched
    assert not rdb.exists(jobs.keys.job("gone"))
    jobs.linger([])  # nothing to do, no command


def test_discard_leaves_nothing(jobs: JobStore, rdb: redis.Redis, inproc_settings):
    job_id = jobs.create_or_join("k4", b"img", "t", None).job_id
    jobs.discard(job_id, "k4")
    assert list(rdb.scan_iter(f"{inproc_settings.key_prefix}*")) == []


def test_a_message_whose_key_is_not_its_jobs_starts_nothing(jobs: JobStore, reads: JobReads):
    """A message naming a job with another key (another job's image) is not that job's
    work: the job stays queued and no image is handed out."""
    job_id = jobs.create_or_join("k-own", b"own image", "t", None).job_id
    jobs.create_or_join("k-other", b"other image", "t", None)
    [started] = jobs.start_many([(job_id, "k-other")])
    assert started.action == StartAction.GONE and started.blob is None
    assert reads.get(job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
    [ours] = jobs.start_many([(job_id, "k-own")])
    assert ours.action == StartAction.RUN and ours.blob == b"own image"
