"""No message in limbo: a job whose message a worker took off its queue and never
recorded (frozen with SIGSTOP while its BRPOP was outstanding, then killed) runs again
within a lease and a reaper period, not at its dispatch deadline.

Real processes: an API and a worker of this test's own (their own model revision, so
their own queue, and their own key prefix, so their own reaper), the worker frozen and
killed by signal and started again as a supervisor would.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import Keys
from shared.wire import queue_name
from tests.helpers import API_KEY, MODEL, WorkerProcess, poll, small_jpeg, start_api
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer

LIMBO_MODEL = (MODEL[0], "limbo")
LIMBO_PREFIX = "ofa:limbo:"
# The test environment's scale (tests/conftest.py): leases of 3 s, a reaper pass a
# second; the grace scaled as the lease is (5 s of 30). The dispatch deadline is set
# far off, so only the lost-message check can bring the job back in time.
LEASE_S, REAPER_S, GRACE_S, DISPATCH_S = 3.0, 1.0, 0.5, 300.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def limbo_env(service_env: dict) -> dict:
    return {
        **service_env,
        "OFA_KEY_PREFIX": LIMBO_PREFIX,
        "OFA_MODEL_REVISION": LIMBO_MODEL[1],
        "OFA_DISPATCH_DEADLINE_S": str(DISPATCH_S),
        "OFA_LEASE_S": str(LEASE_S),
        "OFA_REAPER_INTERVAL_S": str(REAPER_S),
        "OFA_LOST_MESSAGE_GRACE_S": str(GRACE_S),
    }


@pytest.fixture(scope="module")
def limbo_api(limbo_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, base = start_api(limbo_env, tmp_path_factory.mktemp("limbo-api") / "api.log")
    yield base
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def limbo_worker(
    limbo_env: dict, rdb: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    w = WorkerProcess(limbo_env, rdb, tmp_path_factory.mktemp("limbo-worker"), model=LIMBO_MODEL)
    w.start()
    yield w
    if w.proc is not None and w.proc.poll() is None:
        os.kill(w.proc.pid, signal.SIGCONT)
    w.stop()


def in_unacked(rdb: redis.Redis, job_id: str) -> bool:
    return any(json.loads(e)[0]["headers"].get("id") == job_id for e in rdb.hvals("unacked"))


def test_a_message_taken_by_a_worker_that_died_runs_within_a_lease(
    limbo_api: str, limbo_worker: WorkerProcess, rdb: redis.Redis, tiny_dir: Path
) -> None:
    keys = Keys(LIMBO_PREFIX)
    queue = queue_name(*LIMBO_MODEL)
    assert limbo_worker.proc is not None
    with httpx.Client(
        base_url=limbo_api, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ) as client:
        # Freeze the idle worker: its BRPOP stays outstanding on the server, which hands
        # it the next message. (A freeze that lands between two BRPOPs leaves the
        # message on the queue: thaw, let it run, and try again.)
        for attempt in range(8):
            image, text = small_jpeg(seed=700 + attempt), f"a message in limbo {attempt}"
            os.kill(limbo_worker.proc.pid, signal.SIGSTOP)
            resp = client.post("/v1/jobs", data={"text": text}, files={"image": ("l.jpg", image)})
            assert resp.status_code == 202, resp.text
            job_id = resp.json()["job_id"]
            time.sleep(0.3)
            taken = rdb.llen(queue) == 0 and not in_unacked(rdb, job_id)
            if taken:
                break
            os.kill(limbo_worker.proc.pid, signal.SIGCONT)
            assert poll(client, job_id)["status"] == "succeeded"
        assert taken, "the frozen worker never had a BRPOP outstanding"
        submitted = time.monotonic()
        record = rdb.hgetall(keys.job(job_id))
        assert record[b"status"] == b"queued" and b"dispatches" not in record

        limbo_worker.kill()  # SIGKILL: the message it was handed dies with it
        killed = time.monotonic()
        assert rdb.llen(queue) == 0 and not in_unacked(rdb, job_id)
        limbo_worker.start()  # what its supervisor does
        ready = time.monotonic()

        job = poll(client, job_id, timeout=60)
        finished = time.monotonic()
    assert job["status"] == "succeeded", job
    record = rdb.hgetall(keys.job(job_id))
    assert record[b"dispatches"] == b"1" and record[b"attempts"] == b"1", record
    direct = Entailer(load_checkpoint(tiny_dir), device="cpu").predict(image, text)
    assert job["verdict"]["label"] == direct.label
    for label, p in direct.probabilities.items():
        assert job["verdict"]["probabilities"][label] == pytest.approx(p, abs=1e-6)
    print(
        f"\nlost message: finished {finished - submitted:.1f}s after its submission, "
        f"{finished - killed:.1f}s after the kill, {finished - ready:.1f}s after the "
        f"restarted worker was ready (dispatch deadline {DISPATCH_S:.0f}s)"
    )
    # The lease and one reaper period from the moment a worker is there to run it
    # (+ 2 s of slack for a busy machine); the dispatch deadline is 300 s away.
    assert finished - ready <= LEASE_S + REAPER_S + 2
