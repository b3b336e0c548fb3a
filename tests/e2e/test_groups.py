"""Interactive messages taken in groups (``worker/groups.py``): every job recorded and
every message acknowledged, bad messages dropped, and a stopping worker finishing what
it took. Through a real API, Valkey and Celery worker."""

from __future__ import annotations

import concurrent.futures
import time
import uuid

import httpx
import pytest

from shared.celery_app import make_celery
from shared.settings import Settings
from shared.wire import TASK_ENTAIL, queue_name
from tests.helpers import API_KEY, MODEL, poll, queue_len, small_jpeg, unacked

INTERACTIVE = queue_name(*MODEL)


def wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_a_burst_of_jobs_each_recorded_and_every_message_acknowledged(api, worker, rdb):
    """24 jobs at once (taken together, answered by shared batches, recorded and
    acknowledged together): each its own verdict, and no message left unacknowledged,
    which would come back after the visibility timeout."""
    run = uuid.uuid4().hex[:8]
    image = small_jpeg(seed=8100)

    def one(n: int) -> dict:
        with httpx.Client(base_url=api, headers={"X-API-Key": API_KEY}, timeout=60) as c:
            resp = c.post(
                "/v1/jobs?wait=30",
                data={"text": f"burst {run} {n}"},
                files={"image": ("b.jpg", image)},
            )
            assert resp.status_code in (200, 202), resp.text
            return poll(c, resp.json()["job_id"])

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        jobs = list(pool.map(one, range(24)))
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    assert len({j["job_id"] for j in jobs}) == 24
    assert all(j["verdict"]["probabilities"] for j in jobs)
    assert wait_until(lambda: not unacked(rdb, INTERACTIVE)), unacked(rdb, INTERACTIVE)


def test_an_invalid_interactive_message_is_dropped_not_retried(client, worker, rdb, service_env):
    """A message no worker can run (its argument is not a job) is acknowledged and
    dropped, failing as a task would; the worker goes on serving."""
    settings = Settings(_env_file=None, redis_url=service_env["OFA_REDIS_URL"])  # type: ignore[call-arg]
    app = make_celery(settings)
    sent = app.send_task(TASK_ENTAIL, args=[{"job_id": 5}], queue=INTERACTIVE)
    assert wait_until(lambda: "dropped an invalid ofa.entail message " + sent.id in worker.log())
    assert wait_until(lambda: queue_len(rdb) == 0 and not unacked(rdb, INTERACTIVE))
    resp = client.post(
        "/v1/jobs?wait=20",
        data={"text": f"after an invalid message {time.time()}"},
        files={"image": ("a.jpg", small_jpeg(seed=8101))},
    )
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text


@pytest.mark.slow
def test_a_stopping_worker_finishes_the_jobs_it_took(client, worker, rdb):
    """SIGTERM while jobs wait in the batcher (a 2 s batch window): the worker records
    them and acknowledges their messages before it exits; nothing is left for another
    worker or for the visibility timeout."""
    worker.kill()
    worker.start(OFA_BATCH_WAIT_MS="2000", OFA_BATCH_SIZE="64")
    try:
        ids = []
        for n in range(6):
            resp = client.post(
                "/v1/jobs",
                data={"text": f"stopping {time.time()} {n}"},
                files={"image": ("s.jpg", small_jpeg(seed=8200 + n))},
            )
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["job_id"])
        assert wait_until(
            lambda: all(client.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids),
            timeout=1.5,
        )
        worker.stop()  # SIGTERM: Celery's warm shutdown
        assert worker.proc is not None and worker.proc.returncode is not None
        statuses = [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]
        assert statuses == ["succeeded"] * 6, statuses
        assert not unacked(rdb, INTERACTIVE) and queue_len(rdb) == 0
    finally:
        worker.stop()
        worker.start()


@pytest.mark.slow
def test_a_group_the_model_does_not_answer_in_time_goes_back_to_queued(client, worker, rdb, keys):
    """A group waits for the model at most the soft time limit (1 s here, against a
    5 s batch window): its job goes back to queued, to be sent again, as a task's
    bounded wait did; it is not held until the model answers."""
    worker.kill()
    worker.start(OFA_BATCH_WAIT_MS="5000", OFA_BATCH_SIZE="64", OFA_TASK_SOFT_TIME_LIMIT_S="1")
    try:
        resp = client.post(
            "/v1/jobs",
            data={"text": f"unanswered {time.time()}"},
            files={"image": ("u.jpg", small_jpeg(seed=8300))},
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]
        started = time.monotonic()
        assert wait_until(lambda: "1 interactive jobs unanswered in time" in worker.log(), 4.5)
        assert time.monotonic() - started < 4.5  # before the batch window closed
        # Released (queued, attempt counted) and sent again by the reaper.
        assert wait_until(lambda: int(rdb.hget(keys.job(job_id), "attempts") or 0) >= 2, 5)
    finally:
        worker.kill()
        worker.start()
    # With the usual settings back, the job is answered when it is sent again: nothing
    # is lost (and nothing is left to be scored during a later test).
    assert wait_until(lambda: rdb.hget(keys.job(job_id), "status") == b"succeeded", 30)
