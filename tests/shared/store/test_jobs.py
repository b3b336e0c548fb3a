"""``JobStore`` against a real Valkey: every transition of a job."""

from __future__ import annotations

import time

import pytest
import redis

from shared.keys import payload_name
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
    assert started.action == "run" and started.cached is None and started.payload == ""
    assert jobs.payloads.get(payload_name("k1", job_id)) == b"img"
    assert started.attempts == 1
    assert reads.get(job_id).status == JobStatus.RUNNING  # type: ignore[union-attr]
    lease = rdb.zscore(jobs.keys.job_deadlines(), job_id)
    assert lease is not None and lease < deadline  # a 30 s lease, not the dispatch deadline
    # A second message while the lease is live: nothing to do.
    assert jobs.start(job_id, "k1").action == "busy"
    jobs.succeed(job_id, "k1", VERDICT, cached=False)
    done = reads.get(job_id)
    assert done is not None and done.status == JobStatus.SUCCEEDED and done.verdict == VERDICT
    assert jobs.payloads.get(payload_name("k1", job_id)) is None
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
    assert again.payload is None and again.attempts == 2


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
    assert not rdb.exists(jobs.keys.inflight("k2"))
    assert jobs.payloads.get(payload_name("k2", job_id)) is None
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
    assert jobs.payloads.get(payload_name("k4", job_id)) is None


def test_a_message_whose_key_is_not_its_jobs_starts_nothing(jobs: JobStore, reads: JobReads):
    """A message naming a job with another key (another job's image) is not that job's
    work: the job stays queued and no image is handed out."""
    job_id = jobs.create_or_join("k-own", b"own image", "t", None).job_id
    jobs.create_or_join("k-other", b"other image", "t", None)
    [started] = jobs.start_many([(job_id, "k-other")])
    assert started.action == StartAction.GONE and started.payload is None
    assert reads.get(job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
    [ours] = jobs.start_many([(job_id, "k-own")])
    assert ours.action == StartAction.RUN and ours.payload == ""
    assert jobs.payloads.get(payload_name("k-own", job_id)) == b"own image"


# --- the payload store --------------------------------------------------------------


def _payload_files(jobs: JobStore, *keys: str) -> list[str]:
    """The payload files of jobs with these keys (the folder is the session's)."""
    root = jobs.payloads.root  # type: ignore[attr-defined]
    names = [p.name for p in root.glob("*/*")] if root.exists() else []
    return sorted(n for n in names if n.partition(".")[0] in keys)


def _broken(inproc_settings, tmp_path) -> JobStore:
    """A job store whose payload store is a folder that cannot be made (a file stands
    where it should be)."""
    from shared import wiring
    from shared.payloads import LocalPayloads

    (tmp_path / "not-a-folder").write_bytes(b"")
    sync = wiring.sync_redis(inproc_settings)
    return wiring.stores(
        inproc_settings, sync=sync, payloads=LocalPayloads(tmp_path / "not-a-folder" / "p")
    ).jobs


def test_the_payload_is_written_first_and_gone_when_the_job_ends(
    jobs: JobStore, rdb: redis.Redis, inproc_settings, tmp_path
):
    """A job's image is a payload named by its key and id (never in Redis); an
    unreachable payload store stores nothing at all, so no record ever names a payload
    that was not written; succeed, fail and discard each remove the job's payload."""
    from shared.errors import PayloadStoreUnavailable

    broken = _broken(inproc_settings, tmp_path)
    with pytest.raises(PayloadStoreUnavailable, match="not-a-folder"):
        broken.create_or_join("kp0", b"img", "t", None)
    with pytest.raises(PayloadStoreUnavailable):
        broken.create_or_join_many([("kp1", b"a", "t", None), ("kp2", b"b", "t", None)], "s")
    assert list(rdb.scan_iter(f"{inproc_settings.key_prefix}*")) == []
    broken.sync.close()

    ended = {}
    for key in ("kp3", "kp4", "kp5"):  # to succeed, fail and be discarded
        job_id = jobs.create_or_join(key, b"image " + key.encode(), "t", None).job_id
        record = jobs.record(job_id)
        assert record["payload"] == "" and record["size"] == str(len(b"image kp3"))
        assert jobs.payloads.get(payload_name(key, job_id)) == b"image " + key.encode()
        assert not any(
            b"image" in (rdb.get(k) or b"") for k in rdb.scan_iter("*") if rdb.type(k) == b"string"
        )  # no image bytes in the durable store
        ended[key] = job_id
    held = int(rdb.hget(jobs.keys.held_bytes(), "interactive_bytes") or 0)
    assert held == 3 * len(b"image kp3")
    jobs.succeed(ended["kp3"], "kp3", VERDICT, cached=False)
    jobs.fail(ended["kp4"], "kp4", "broken")
    jobs.discard(ended["kp5"], "kp5")
    assert _payload_files(jobs, "kp3", "kp4", "kp5") == []
    assert not rdb.hexists(jobs.keys.held_bytes(), "interactive_bytes")
    jobs.fail(ended["kp3"], "kp3", "again")  # a second end takes nothing off twice
    assert not rdb.hexists(jobs.keys.held_bytes(), "interactive_bytes")


def test_a_joined_submission_leaves_no_extra_payload(jobs: JobStore):
    first = jobs.create_or_join("kj", b"img", "t", None)
    again = jobs.create_or_join_many([("kj", b"img", "t", None)] * 3, "scan-j")
    assert all(not g.created and g.job == first.job_id for g in again)
    assert _payload_files(jobs, "kj") == [payload_name("kj", first.job_id)]


def test_a_reference_is_recorded_and_nothing_copied(jobs: JobStore, rdb: redis.Redis):
    """A scan row's object (or shared file) is named by the job, never copied: no
    payload, no held bytes; the worker is told where to read it."""
    job_id = jobs.create_or_join_many([("kr", "s3://bucket/cats/1.jpg", "t", None)], "s")[0].job_id
    assert _payload_files(jobs, "kr") == []
    assert jobs.record(job_id)["payload"] == "s3://bucket/cats/1.jpg"
    assert not rdb.hexists(jobs.keys.held_bytes(), "bulk_bytes")
    [started] = jobs.start_many([(job_id, "kr")])
    assert started.action == StartAction.RUN and started.payload == "s3://bucket/cats/1.jpg"
    jobs.succeed(job_id, "kr", VERDICT, cached=False)
    assert not rdb.hexists(jobs.keys.held_bytes(), "bulk_bytes")


def test_orphaned_payloads_are_swept(jobs: JobStore, inproc_settings):
    """A payload written but never recorded (a crash between the two), or left after
    its job ended, goes once older than the grace; an unfinished job's stays."""
    import uuid

    live = jobs.create_or_join("ks1", b"live", "t", None).job_id
    ended = jobs.create_or_join("ks2", b"ended", "t", None).job_id
    orphan = payload_name("ks3", uuid.uuid4().hex)
    jobs.payloads.put(orphan, b"orphan")
    jobs.fail(ended, "ks2", "broken")
    jobs.payloads.put(payload_name("ks2", ended), b"ended")  # its removal was lost
    assert jobs.sweep_payloads(3600) == 0  # younger than the grace: kept
    time.sleep(0.01)
    jobs.sweep_payloads(0)  # other tests' leftovers may go too
    assert _payload_files(jobs, "ks1", "ks2", "ks3") == [payload_name("ks1", live)]
