"""The reaper heals what crashes leave, with a real worker (which runs the reaper) on
the session's Valkey: a job whose message never reached the broker, a job whose
worker vanished mid-run, and a poison job that fails after the cap."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared import wiring
from shared.keys import payload_name, verdict_key
from shared.models import JobStatus
from shared.settings import Settings
from shared.store import JobReads, JobStore
from tests.helpers import MODEL, PREFIX, poll, small_jpeg
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer

# What tests/conftest.py gives the service processes.
DISPATCH_S, LEASE_S, REAPER_S, MAX_ATTEMPTS = 6.0, 3.0, 1.0, 3


@pytest.fixture(scope="module")
def service(
    valkey: str, tiny_dir: Path, payload_settings: dict[str, str]
) -> Iterator[wiring.Stores]:
    """The stores as the API would hold them (same prefix, model, deadlines and payload
    store)."""
    settings = Settings(
        **payload_settings,  # type: ignore[arg-type]
        redis_url=valkey,
        key_prefix=PREFIX,
        model=MODEL[0],
        model_revision=MODEL[1],
        dispatch_deadline_s=DISPATCH_S,
        lease_s=LEASE_S,
        reaper_interval_s=REAPER_S,
        max_attempts=MAX_ATTEMPTS,
    )
    clients = wiring.sync_redis(settings)
    yield wiring.stores(settings, sync=clients)
    clients.close()


@pytest.fixture
def jobs(service: wiring.Stores) -> JobStore:
    return service.jobs


@pytest.fixture
def reads(service: wiring.Stores) -> JobReads:
    return service.reads


@pytest.fixture(scope="module")
def direct(tiny_dir: Path) -> Entailer:
    return Entailer(load_checkpoint(tiny_dir), device="cpu")


def wait_finished(reads: JobReads, job_id: str, timeout: float) -> float:
    """Seconds until the job's record is final."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        job = reads.get(job_id)
        if job is not None and job.status.finished:
            return time.monotonic() - start
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {reads.get(job_id)}")


def assert_clean(rdb: redis.Redis, jobs: JobStore, job_id: str, key: str) -> None:
    """No payload, no deadline, and an in-flight mark only as a pointer to the finished
    job. The payload goes just after the final record is written (by whichever process
    ended the job): given a moment."""
    name = payload_name(key, job_id)
    deadline = time.monotonic() + 5
    while jobs.payloads.get(name) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs.payloads.get(name) is None
    assert rdb.zscore(jobs.keys.job_deadlines(), job_id) is None
    assert rdb.zscore(jobs.keys.job_pending(), job_id) is None
    mark = rdb.get(jobs.keys.inflight(key))
    assert mark is None or mark.decode() == job_id


def test_a_job_whose_message_never_left_is_sent_by_the_reaper(worker, jobs, reads, direct, rdb):
    """What an API killed between writing the record and sending the message leaves
    (or a worker killed between kombu's pop and its bookkeeping)."""
    image = small_jpeg(seed=901)
    key = verdict_key(*MODEL, image, "a lost message", None)
    got = jobs.create_or_join(key, image, "a lost message", None)  # record, no message
    took = wait_finished(reads, got.job_id, timeout=DISPATCH_S + 3 * REAPER_S + 10)
    job = reads.get(got.job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED, job
    print(f"\nno message: finished {took:.1f}s after the record was written")
    assert took <= DISPATCH_S + REAPER_S + 3  # the dispatch deadline plus one period (+ slack)
    want = direct.predict(image, "a lost message")
    assert job.verdict is not None and job.verdict.label == want.label
    assert job.verdict.probabilities.model_dump() == pytest.approx(want.probabilities, abs=1e-6)
    assert jobs.record(got.job_id)["dispatches"] == "1"
    assert_clean(rdb, jobs, got.job_id, key)


def test_a_job_whose_worker_vanished_runs_again_after_its_lease(worker, jobs, reads, direct, rdb):
    image = small_jpeg(seed=902)
    key = verdict_key(*MODEL, image, "a vanished worker", None)
    got = jobs.create_or_join(key, image, "a vanished worker", None)
    assert jobs.start(got.job_id, key).action == "run"  # taken by a worker that then died
    took = wait_finished(reads, got.job_id, timeout=LEASE_S + 3 * REAPER_S + 10)
    job = reads.get(got.job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED, job
    print(f"\nvanished worker: finished {took:.1f}s after its start")
    assert took <= LEASE_S + REAPER_S + 3
    record = jobs.record(got.job_id)
    assert record["attempts"] == "2" and record["dispatches"] == "1"
    want = direct.predict(image, "a vanished worker")
    assert job.verdict is not None
    assert job.verdict.probabilities.model_dump() == pytest.approx(want.probabilities, abs=1e-6)
    assert_clean(rdb, jobs, got.job_id, key)


def test_a_poison_job_fails_after_the_cap_and_a_resubmission_starts_fresh(
    worker, jobs, reads, client, rdb
):
    image = small_jpeg(seed=903)
    text = "a poison input"
    key = verdict_key(*MODEL, image, text, None)
    got = jobs.create_or_join(key, image, text, None)
    # Its worker died every time: each start ran out its lease without finishing.
    # (Each earlier lease is ended by hand just before the next start, so the real
    # reaper never gets to send the job to the real worker in between.)
    for attempt in range(MAX_ATTEMPTS):
        if attempt:
            rdb.zadd(jobs.keys.job_deadlines(), {got.job_id: time.time() - 0.1})
        assert jobs.start(got.job_id, key).action == "run"
    wait_finished(reads, got.job_id, timeout=LEASE_S + 3 * REAPER_S + 10)
    job = reads.get(got.job_id)
    assert job is not None and job.status == JobStatus.FAILED
    assert job.error is not None and "gave up after 3 attempts" in job.error
    assert_clean(rdb, jobs, got.job_id, key)
    assert rdb.get(jobs.keys.inflight(key)) is None  # the key is free again
    again = client.post("/v1/jobs", data={"text": text}, files={"image": ("p.jpg", image)})
    assert again.status_code == 202, again.text
    assert again.json()["job_id"] != got.job_id
    assert poll(client, again.json()["job_id"])["status"] == "succeeded"
