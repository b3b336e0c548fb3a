"""The record owners against a real Valkey: every transition of a job and a scan."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from shared import wiring
from shared.models import JobStatus, ScanCounts, ScanStatus
from shared.store import JobStore, ScanStore, StartAction, summarize
from tests.helpers import VERDICT

pytestmark = pytest.mark.usefixtures("clean_inproc")


def test_create_join_start_succeed(jobs: JobStore, rdb: redis.Redis):
    got = jobs.create_or_join("k1", b"img", "a cat", None)
    assert got.created and not got.overdue
    job_id = got.job_id
    job = jobs.get(job_id)
    assert job is not None and job.status == JobStatus.QUEUED and job.created_at
    # Queued with a dispatch deadline, in the pending index.
    deadline = rdb.zscore(jobs.keys.job_deadlines(), job_id)
    assert deadline is not None and deadline > time.time() + 100
    assert jobs.backlog()[0] == 1
    joined = jobs.create_or_join("k1", b"img", "a cat", None)
    assert (joined.job_id, joined.created) == (job_id, False) and jobs.is_shared(job_id)
    started = jobs.start(job_id, "k1")
    assert started.action == "run" and started.cached is None and started.blob == b"img"
    assert started.attempts == 1
    assert jobs.get(job_id).status == JobStatus.RUNNING  # type: ignore[union-attr]
    lease = rdb.zscore(jobs.keys.job_deadlines(), job_id)
    assert lease is not None and lease < deadline  # a 30 s lease, not the dispatch deadline
    # A second message while the lease is live: nothing to do.
    assert jobs.start(job_id, "k1").action == "busy"
    jobs.succeed(job_id, "k1", VERDICT, cached=False)
    done = jobs.get(job_id)
    assert done is not None and done.status == JobStatus.SUCCEEDED and done.verdict == VERDICT
    assert not rdb.exists(jobs.keys.blob("k1"))
    assert rdb.zscore(jobs.keys.job_deadlines(), job_id) is None and jobs.backlog()[0] == 0
    # The mark stays with the finished job: a racing submit joins it.
    assert jobs.create_or_join("k1", b"img", "a cat", None).job_id == job_id
    assert jobs.cached_many(["k1", "k2"]) == {"k1": VERDICT.model_dump_json().encode()}
    # A message for a finished job does nothing.
    assert jobs.start(job_id, "k1").action == "finished"
    assert jobs.start("no-such-job", "k1").action == "gone"


def test_a_redelivery_after_the_lease_finishes_from_the_cache(jobs: JobStore, rdb: redis.Redis):
    job_id = jobs.create_or_join("k5", b"img", "t", None).job_id
    jobs.start(job_id, "k5")
    rdb.set(jobs.keys.verdict("k5"), VERDICT.model_dump_json())
    rdb.zadd(jobs.keys.job_deadlines(), {job_id: time.time() - 1})  # the lease ran out
    assert jobs.overdue() == [job_id]
    again = jobs.start(job_id, "k5")
    assert again.action == "run" and again.cached == VERDICT.model_dump_json().encode()
    assert again.blob is None and again.attempts == 2


def test_release_requeues_with_backoff_and_poison_after_max_attempts(
    jobs: JobStore, rdb: redis.Redis, inproc_settings
):
    job_id = jobs.create_or_join("k6", b"img", "t", None).job_id
    for attempt in range(1, inproc_settings.max_attempts + 1):
        started = jobs.start(job_id, "k6")
        assert started.action == "run" and started.attempts == attempt
        backoff = jobs.release(job_id)
        assert backoff == inproc_settings.retry_backoff_s * 2 ** (attempt - 1)
        assert jobs.get(job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
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


def test_fail_frees_the_key(jobs: JobStore, rdb: redis.Redis):
    job_id = jobs.create_or_join("k2", b"img", "t", "p", scan_id="s1").job_id
    jobs.fail(job_id, "k2", "broken")
    job = jobs.get(job_id)
    assert job is not None and job.status == JobStatus.FAILED and job.error == "broken"
    assert not rdb.exists(jobs.keys.inflight("k2"), jobs.keys.blob("k2"))
    other = jobs.create_or_join("k2", b"img", "t", "p")
    assert other.created and other.job_id != job_id
    [outcome] = jobs.outcomes([job_id])
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


def test_cancel_only_unfinished_scans(inproc_settings, scans: ScanStore):
    scans.create("a", 1, "/m", None)
    scans.create("b", 1, "/m", None)
    scans.finish("b", ScanCounts(read=1, done=1))

    async def go() -> tuple:
        aio = wiring.async_redis(inproc_settings)
        store = ScanStore(inproc_settings, wiring.keys(inproc_settings), adurable=aio.durable)
        try:
            return (
                await store.acancel("a"),
                await store.acancel("b"),
                await store.acancel("missing"),
            )
        finally:
            await aio.aclose()

    a, b, missing = asyncio.run(go())
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


def test_a_finish_announces_the_final_record_and_a_cancellation_the_id(
    inproc_settings, jobs: JobStore, rdb: redis.Redis
):
    pubsub = rdb.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(jobs.keys.done_channel())

    def heard() -> tuple[str, dict[str, str] | None]:
        deadline = time.monotonic() + 5
        while (m := pubsub.get_message(timeout=0.1)) is None:
            assert time.monotonic() < deadline
        [(job_id, rest)] = JobStore.announcements(m["data"])
        return job_id, JobStore.announced_record(rest)

    job_id = jobs.create_or_join("k9", b"img", "t", None).job_id
    jobs.start(job_id, "k9")
    jobs.succeed(job_id, "k9", VERDICT, cached=False)
    got_id, record = heard()
    assert got_id == job_id and record is not None
    # What the announcement carries is what a read would give: a request needs no read.
    assert jobs.job_of(job_id, record) == jobs.get(job_id)
    assert jobs.job_of(job_id, record).verdict == VERDICT
    queued = jobs.create_or_join("k10", b"img", "t", None).job_id

    async def cancel() -> None:
        aio = wiring.async_redis(inproc_settings)
        try:
            await JobStore(inproc_settings, jobs.keys, aio=aio).acancel(queued)
        finally:
            await aio.aclose()

    asyncio.run(cancel())
    assert heard() == (queued, None)
    pubsub.close()


def test_jobs_finished_together_are_announced_in_one_message(jobs: JobStore, rdb: redis.Redis):
    pubsub = rdb.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(jobs.keys.done_channel())
    keys = [f"together{i}" for i in range(3)]
    ids = [jobs.create_or_join(k, b"img", f"t{i}", None).job_id for i, k in enumerate(keys)]
    jobs.start_many(list(zip(ids, keys, strict=True)))
    jobs.succeed_many([(j, k, VERDICT) for j, k in zip(ids, keys, strict=True)])
    deadline = time.monotonic() + 5
    while (m := pubsub.get_message(timeout=0.1)) is None:
        assert time.monotonic() < deadline
    heard = JobStore.announcements(m["data"])
    assert [job_id for job_id, _ in heard] == ids
    for job_id, rest in heard:
        record = JobStore.announced_record(rest)
        assert record is not None and jobs.job_of(job_id, record) == jobs.get(job_id)
    assert pubsub.get_message(timeout=0.3) is None  # nothing more: one message for the three
    pubsub.close()


def test_a_message_whose_key_is_not_its_jobs_starts_nothing(jobs: JobStore):
    """A message naming a job with another key (another job's image) is not that job's
    work: the job stays queued and no image is handed out."""
    job_id = jobs.create_or_join("k-own", b"own image", "t", None).job_id
    jobs.create_or_join("k-other", b"other image", "t", None)
    [started] = jobs.start_many([(job_id, "k-other")])
    assert started.action == StartAction.GONE and started.blob is None
    assert jobs.get(job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
    [ours] = jobs.start_many([(job_id, "k-own")])
    assert ours.action == StartAction.RUN and ours.blob == b"own image"
