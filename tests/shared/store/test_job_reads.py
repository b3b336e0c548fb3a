"""``JobReads`` and the done channel against a real Valkey."""

from __future__ import annotations

import time

import pytest
import redis

from shared.store import DoneChannel, JobReads, JobStore
from tests.helpers import VERDICT

pytestmark = pytest.mark.usefixtures("clean_inproc")


def test_a_finish_announces_the_final_record_and_a_cancellation_the_id(
    jobs: JobStore, reads: JobReads, rdb: redis.Redis, on_loop
):
    pubsub = rdb.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(jobs.keys.done_channel())

    def heard() -> tuple[str, dict[str, str] | None]:
        deadline = time.monotonic() + 5
        while (m := pubsub.get_message(timeout=0.1)) is None:
            assert time.monotonic() < deadline
        [(job_id, rest)] = DoneChannel.announcements(m["data"])
        return job_id, DoneChannel.announced_record(rest)

    job_id = jobs.create_or_join("k9", b"img", "t", None).job_id
    jobs.start(job_id, "k9")
    jobs.succeed(job_id, "k9", VERDICT, cached=False)
    got_id, record = heard()
    assert got_id == job_id and record is not None
    # What the announcement carries is what a read would give: a request needs no read.
    assert reads.job_of(job_id, record) == reads.get(job_id)
    assert reads.job_of(job_id, record).verdict == VERDICT
    queued = jobs.create_or_join("k10", b"img", "t", None).job_id

    on_loop(lambda st: st.jobs.acancel(queued))
    assert heard() == (queued, None)
    pubsub.close()


def test_jobs_finished_together_are_announced_in_one_message(
    jobs: JobStore, reads: JobReads, rdb: redis.Redis
):
    pubsub = rdb.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(jobs.keys.done_channel())
    keys = [f"together{i}" for i in range(3)]
    ids = [jobs.create_or_join(k, b"img", f"t{i}", None).job_id for i, k in enumerate(keys)]
    jobs.start_many(list(zip(ids, keys, strict=True)))
    jobs.succeed_many([(j, k, VERDICT) for j, k in zip(ids, keys, strict=True)])
    deadline = time.monotonic() + 5
    while (m := pubsub.get_message(timeout=0.1)) is None:
        assert time.monotonic() < deadline
    heard = DoneChannel.announcements(m["data"])
    assert [job_id for job_id, _ in heard] == ids
    for job_id, rest in heard:
        record = DoneChannel.announced_record(rest)
        assert record is not None and reads.job_of(job_id, record) == reads.get(job_id)
    assert pubsub.get_message(timeout=0.3) is None  # nothing more: one message for the three
    pubsub.close()


def test_the_coordinators_subscription_hears_what_a_finish_announces(
    jobs: JobStore, reads: JobReads
):
    subscription = reads.done.subscribe()
    try:
        job_id = jobs.create_or_join("k-sub", b"img", "t", None).job_id
        jobs.start(job_id, "k-sub")
        jobs.succeed(job_id, "k-sub", VERDICT, cached=False)
        deadline = time.monotonic() + 5
        heard: dict[str, str] = {}
        while job_id not in heard:
            assert time.monotonic() < deadline
            heard.update(subscription.take(0.1))
        record = DoneChannel.announced_record(heard[job_id])
        assert record is not None and reads.job_of(job_id, record).verdict == VERDICT
    finally:
        subscription.close()


def test_a_store_without_the_client_it_needs_says_so(inproc_settings, inproc_redis):
    from shared import wiring
    from shared.store import MissingClientError

    blocking_only = wiring.stores(inproc_settings, sync=inproc_redis)
    with pytest.raises(MissingClientError, match="JobReads was built without asyncio"):
        _ = blocking_only.reads.aio
    with pytest.raises(MissingClientError, match="JobStore was built without blocking"):
        wiring.stores(inproc_settings).jobs.start("j", "k")
