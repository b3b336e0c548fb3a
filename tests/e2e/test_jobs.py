"""Submit, cache, deduplicate, poll: through a real API, Valkey and Celery worker."""

from __future__ import annotations

import base64
import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest

from shared import wiring
from shared.keys import payload_name, verdict_key
from shared.settings import Settings
from shared.store import JobReads, JobStore
from shared.wire import queue_name
from shared.wiring import sync_redis
from tests.helpers import (
    API_KEY,
    MODEL,
    PREFIX,
    batch_items,
    encode_image,
    payload_gone,
    photo,
    poll,
    queue_len,
    small_jpeg,
    start_api,
    unacked,
)
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer


def bulk_item(image: bytes, text: str):
    """A scan row's work under its real key (workers check the bytes they score
    against it)."""
    from shared.keys import verdict_key
    from shared.submit import BulkItem

    return BulkItem(verdict_key(*MODEL, image, text), image, text, None)


def service_store(service_env: dict[str, str]) -> tuple[Settings, JobStore, JobReads]:
    """The settings of the running service's model, and the job stores on its Valkey and
    its payload store."""
    payload = {
        name.removeprefix("OFA_").lower(): value
        for name, value in service_env.items()
        if name.startswith(("OFA_PAYLOAD_", "OFA_S3_"))
    }
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        **payload,
        redis_url=service_env["OFA_REDIS_URL"],
        key_prefix=PREFIX,
        model=MODEL[0],
        model_revision=MODEL[1],
    )
    stores = wiring.stores(settings, sync=sync_redis(settings))
    return settings, stores.jobs, stores.reads


@pytest.fixture(scope="module")
def direct(tiny_dir: Path) -> Entailer:
    """The runtime itself, to check what comes through the service."""
    return Entailer(load_checkpoint(tiny_dir), device="cpu")


def test_submit_poll_then_cache_hit(client, worker, rdb, keys, direct, payload_settings):
    image = encode_image(photo("chelsea").resize((120, 80)))
    text, premise = "A cat lies on a red sofa.", "An animal rests indoors."
    form = {"text": text, "premise": premise}
    resp = client.post("/v1/jobs", data=form, files={"image": ("cat.jpg", image)})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert resp.headers["location"] == f"/v1/jobs/{job_id}"
    assert int(resp.headers["retry-after"]) >= 1

    job = poll(client, job_id)
    assert job["status"] == "succeeded", job
    verdict = job["verdict"]
    assert sum(verdict["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
    assert verdict["model"] == {"id": MODEL[0], "revision": MODEL[1]}
    assert verdict["key"] == verdict_key(*MODEL, image, text, premise)
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    expected = direct.predict(image, text, premise)
    assert verdict["label"] == expected.label and verdict["answer"] == expected.answer
    for label, p in expected.probabilities.items():
        assert verdict["probabilities"][label] == pytest.approx(p, abs=1e-6)
    # The payload is gone once the verdict is cached; the in-flight mark now names the
    # finished job (late duplicates join it rather than start another).
    payloads = wiring.payload_store(Settings(_env_file=None, **payload_settings))  # type: ignore[call-arg, arg-type]
    assert payload_gone(payloads, payload_name(verdict["key"], job_id))
    assert rdb.get(keys.inflight(verdict["key"])).decode() == job_id

    jobs_before = set(rdb.scan_iter(keys.job("*")))
    queued_before, items_before = queue_len(rdb), batch_items(rdb, keys)
    # Same image bytes, texts that normalise the same: a 200 cache hit, no new job.
    again = client.post(
        "/v1/jobs",
        data={"text": "  a CAT lies on a red sofa.", "premise": "an animal rests indoors."},
        files={"image": ("other-name.jpg", image)},
    )
    assert again.status_code == 200, again.text
    assert again.json() == {"status": "succeeded", "cached": True, "verdict": verdict}
    assert set(rdb.scan_iter(keys.job("*"))) == jobs_before
    assert queue_len(rdb) == queued_before
    assert batch_items(rdb, keys) == items_before


def test_json_base64_and_wait(client, worker):
    image = small_jpeg(seed=11)
    body = {"text": "noise", "image_base64": base64.b64encode(image).decode()}
    resp = client.post("/v1/jobs?wait=20", json=body)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["status"] == "succeeded" and doc["cached"] is False
    assert set(doc["verdict"]["probabilities"]) == {"entailment", "contradiction", "neutral"}


def test_concurrent_identical_submits_run_once(api, worker, rdb, keys):
    image = small_jpeg(seed=12)
    items_before = batch_items(rdb, keys)

    def submit(_: int) -> httpx.Response:
        with httpx.Client(base_url=api, headers={"X-API-Key": API_KEY}, timeout=30) as c:
            return c.post("/v1/jobs", data={"text": "same"}, files={"image": ("a.jpg", image)})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(submit, range(16)))
    queued = {r.json()["job_id"] for r in responses if r.status_code == 202}
    assert all(r.status_code in (200, 202) for r in responses)
    assert len(queued) == 1, queued  # every queued answer names the same job
    with httpx.Client(base_url=api, headers={"X-API-Key": API_KEY}) as c:
        job = poll(c, queued.pop())
    assert job["status"] == "succeeded"
    assert batch_items(rdb, keys) == items_before + 1  # the model ran once


def test_other_revision_is_not_served_from_cache(client, worker, service_env, rdb, keys, tmp_path):
    image = small_jpeg(seed=13)
    resp = client.post("/v1/jobs?wait=20", data={"text": "x"}, files={"image": ("a.jpg", image)})
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded"
    proc, base = start_api(service_env, tmp_path / "api2.log", OFA_MODEL_REVISION="seed2")
    try:
        with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}) as other:
            again = other.post("/v1/jobs", data={"text": "x"}, files={"image": ("a.jpg", image)})
            assert again.status_code == 202  # a miss: queued for a seed2 worker
            job = other.get(again.headers["location"]).json()
            assert job["status"] == "queued"
            other_queue = queue_name(MODEL[0], "seed2")
            assert rdb.llen(other_queue) == 1  # waiting for a worker that serves seed2
            job_id = again.json()["job_id"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        rdb.delete(queue_name(MODEL[0], "seed2"))
    # No seed2 worker will ever come: drop the job (the reaper then forgets it).
    rdb.delete(keys.job(job_id))  # its payload is an orphan now: the reaper sweeps it


def test_health_ready_metrics(client, worker):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] >= 1
    text = client.get("/metrics").text
    for name in (
        "ofa_api_requests_total",
        "ofa_cache_lookups_total",
        "ofa_jobs_enqueued_total",
        "ofa_api_request_seconds_bucket",
    ):
        assert name in text


def test_task_events_reach_monitoring(client, worker, service_env):
    """Flower's view: every job's received, started and succeeded events arrive (sent in
    batches by the worker's consumer), the last carrying the verdict's summary."""
    from shared.celery_app import make_celery

    settings = Settings(_env_file=None, redis_url=service_env["OFA_REDIS_URL"])  # type: ignore[call-arg]
    app = make_celery(settings)
    seen: dict[str, dict[str, dict]] = {}

    def record(event: dict) -> None:
        if event.get("uuid"):
            seen.setdefault(event["uuid"], {})[event["type"]] = event

    with app.connection() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": record})
        listening = concurrent.futures.ThreadPoolExecutor(1).submit(
            receiver.capture, limit=None, timeout=None, wakeup=False
        )
        try:
            time.sleep(0.5)  # subscribed before the jobs start
            image = small_jpeg(seed=77)
            ids = []
            for n in range(6):
                form = {"text": f"events {time.time()} {n}"}
                resp = client.post("/v1/jobs", data=form, files={"image": ("e.jpg", image)})
                assert resp.status_code == 202, resp.text
                ids.append(resp.json()["job_id"])
            for job_id in ids:
                assert poll(client, job_id)["status"] == "succeeded"
            deadline = time.monotonic() + 10
            wanted = {"task-received", "task-started", "task-succeeded"}
            while time.monotonic() < deadline:
                if all(wanted <= set(seen.get(i, {})) for i in ids):
                    break
                time.sleep(0.05)
        finally:
            receiver.should_stop = True
            listening.result(timeout=10)
    for job_id in ids:
        assert wanted <= set(seen.get(job_id, {})), (job_id, sorted(seen.get(job_id, {})))
        assert "entailment=" in seen[job_id]["task-succeeded"]["result"]


def test_scan_chunks_never_take_the_interactive_capacity(client, worker, service_env, rdb):
    """40 chunk messages queued on the bulk queue: the worker runs OFA_BULK_CHUNKS (4)
    of them at a time on threads of their own and holds at most twice that, so an
    interactive job submitted meanwhile finishes while most of the scan work is still
    queued."""
    import threading
    import uuid

    from shared.celery_app import make_celery
    from shared.submit import submit_bulk

    settings, jobs, reads = service_store(service_env)
    run = uuid.uuid4().hex[:8]
    items = [bulk_item(small_jpeg(seed=6000 + i % 40), f"bulk {run} {i}") for i in range(320)]
    bulk = queue_name(*MODEL, bulk=True)
    reserved: list[int] = []
    sampling = threading.Event()
    sampling.set()

    def sample() -> None:  # bulk messages the worker has taken and not acknowledged
        while sampling.is_set():
            reserved.append(len(unacked(rdb, bulk)))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        ids = submit_bulk(jobs, make_celery(settings), f"capacity-{run}", items, chunk=8)
        time.sleep(0.3)  # the worker is busy with chunks
        resp = client.post(
            "/v1/jobs?wait=20",
            data={"text": f"interactive amid a scan {run}"},
            files={"image": ("i.jpg", small_jpeg(seed=6100))},
        )
        backlog = rdb.llen(bulk)
        assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
        assert backlog >= 10, backlog  # most of the scan's chunks still waiting
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all((j := reads.get(i)) is not None and j.status.finished for i in ids):
                break
            time.sleep(0.2)
    finally:
        sampling.clear()
        sampler.join()
    assert all(reads.get(i).status == "succeeded" for i in ids)  # type: ignore[union-attr]
    # Busy, and never more than the bulk consumer's prefetch: twice OFA_BULK_CHUNKS.
    assert max(reserved) == 2 * settings.bulk_chunks, max(reserved)


def test_scan_chunks_show_in_monitoring(worker, service_env):
    """Chunks taken by the worker's own bulk consumer send Celery's task events:
    received (with the task's name), started, and succeeded with the chunk's counts."""
    import uuid

    from shared.celery_app import make_celery
    from shared.submit import submit_bulk
    from shared.wire import TASK_ENTAIL_CHUNK

    settings, jobs, reads = service_store(service_env)
    app = make_celery(settings)
    seen: dict[str, dict[str, dict]] = {}

    def record(event: dict) -> None:
        if event.get("uuid"):
            seen.setdefault(event["uuid"], {})[event["type"]] = event

    run = uuid.uuid4().hex[:8]
    items = [bulk_item(small_jpeg(seed=6200 + i), f"row {run} {i}") for i in range(6)]
    with app.connection() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": record})
        listening = concurrent.futures.ThreadPoolExecutor(1).submit(
            receiver.capture, limit=None, timeout=None, wakeup=False
        )
        try:
            time.sleep(0.5)  # subscribed before the chunks go out
            ids = submit_bulk(jobs, app, f"shown-{run}", items, chunk=3)
            deadline = time.monotonic() + 20
            chunks: list[dict] = []
            while time.monotonic() < deadline:
                chunks = [
                    e
                    for e in seen.values()
                    if e.get("task-received", {}).get("name") == TASK_ENTAIL_CHUNK
                    and "task-succeeded" in e
                    and "task-started" in e
                ]
                if len(chunks) >= 2 and all(reads.get(i).status.finished for i in ids):  # type: ignore[union-attr]
                    break
                time.sleep(0.05)
        finally:
            receiver.should_stop = True
            listening.result(timeout=10)
    assert len(chunks) == 2, chunks  # the only chunks sent while listening: ours
    assert all(e["task-succeeded"]["result"] == "chunk of 3: scored 3, cached 0, skipped 0, "
               "retried 0" for e in chunks)  # fmt: skip


@pytest.mark.slow
def test_a_stopping_worker_finishes_its_running_chunk_and_hands_back_the_held_ones(
    worker, service_env, rdb
):
    """SIGTERM while one chunk waits in the batcher (a 2 s batch window) and the next
    is held, not started (one bulk thread, so a prefetch of two): the running chunk's
    jobs are recorded and its message acknowledged before the worker exits; the held
    chunk goes back to the bulk queue unrun, and the restarted worker (as a supervisor
    would restart it) computes it."""
    from shared.celery_app import make_celery
    from shared.submit import submit_bulk

    settings, jobs, reads = service_store(service_env)
    bulk = queue_name(*MODEL, bulk=True)
    run = time.time()
    items = [bulk_item(small_jpeg(seed=6200 + i), f"held {run} {i}") for i in range(12)]
    worker.kill()
    worker.start(OFA_BULK_CHUNKS="1", OFA_BATCH_WAIT_MS="2000", OFA_BATCH_SIZE="64")
    try:
        ids = submit_bulk(jobs, make_celery(settings), f"handback-{run}", items, chunk=4)
        running, held = ids[:4], ids[4:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(unacked(rdb, bulk)) == 2 and all(
                reads.get(i).status == "running"  # type: ignore[union-attr]
                for i in running
            ):
                break
            time.sleep(0.05)
        assert len(unacked(rdb, bulk)) == 2 and rdb.llen(bulk) == 1
        worker.stop()  # SIGTERM: Celery's warm shutdown
        assert worker.proc is not None and worker.proc.returncode is not None
        assert [reads.get(i).status for i in running] == ["succeeded"] * 4  # type: ignore[union-attr]
        assert [reads.get(i).status for i in held] == ["queued"] * 8  # type: ignore[union-attr]
        assert not unacked(rdb, bulk) and rdb.llen(bulk) == 2  # both held chunks back
    finally:
        worker.stop()
        worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all((j := reads.get(i)) is not None and j.status == "succeeded" for i in held):
            break
        time.sleep(0.2)
    assert [reads.get(i).status for i in held] == ["succeeded"] * 8  # type: ignore[union-attr]
