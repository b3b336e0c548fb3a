"""A payload store briefly unreachable: submissions get a clear 503 and store nothing,
jobs already queued are put back by the worker and retried, not failed, and once the
store answers again every job submitted before the outage finishes with the verdict
the model gives: nothing lost.

Real processes: an API and a worker of this test's own (their own key prefix and model
revision, so their own queues and reaper) whose payload store is a bucket on a moto
server of this test's own. The outage is moto frozen with SIGSTOP: connections are
accepted and never answered, as a store behind a stalled network is; the objects stay
in the frozen process, so whatever was stored before is there after SIGCONT.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.helpers import API_KEY, MODEL, WorkerProcess, poll, small_jpeg, start_api
from tests.objstore import AWS_ENV, MotoServer
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer

CHAOS_PREFIX = "ofa:chaos:"
CHAOS_MODEL = (MODEL[0], "chaos")
BUCKET = "ofa-chaos-payloads"
# A stalled store is given up after this (OFA_OBJECT_TIMEOUT_S): short, so that the
# API answers its 503 and the worker puts a job back within a second or two.
STORE_TIMEOUT_S = 1.0
JOBS = 4
# How long the store stays down at least: several reaper periods (1 s here), each job
# put back more times than OFA_MAX_ATTEMPTS (3) allows starts: a start that only waited
# on the store is not a try (``store_waits``), so however long the outage, no job is
# failed as poison. CHAOS_OUTAGE_S tries another length.
OUTAGE_S = float(os.environ.get("CHAOS_OUTAGE_S", "10"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chaos(
    service_env: dict, rdb: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("payload-chaos")
    moto = MotoServer(tmp / "moto.log")
    moto.start()
    moto.create_bucket(BUCKET)
    env = {
        **service_env,
        **AWS_ENV,
        "OFA_KEY_PREFIX": CHAOS_PREFIX,
        "OFA_MODEL_REVISION": CHAOS_MODEL[1],
        "OFA_PAYLOAD_STORE": f"s3://{BUCKET}/payloads",
        "OFA_S3_ENDPOINT_URL": moto.endpoint,
        "OFA_S3_ALLOW_HTTP": "true",
        "OFA_OBJECT_TIMEOUT_S": str(STORE_TIMEOUT_S),
    }
    worker = WorkerProcess(env, rdb, tmp, model=CHAOS_MODEL)
    api_proc = None
    try:
        worker.start()
        api_proc, base = start_api(env, tmp / "api.log")
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        ) as client:
            yield SimpleNamespace(moto=moto, worker=worker, client=client, keys=Keys(CHAOS_PREFIX))
    finally:
        assert moto.proc is not None
        os.kill(moto.proc.pid, signal.SIGCONT)
        if worker.proc is not None and worker.proc.poll() is None:
            os.kill(worker.proc.pid, signal.SIGCONT)
        if api_proc is not None:
            api_proc.terminate()
            api_proc.wait(timeout=10)
        worker.stop()
        moto.stop()
        for key in rdb.scan_iter(f"{CHAOS_PREFIX}*"):
            rdb.delete(key)


def held(rdb: redis.Redis, keys: Keys) -> dict[str, int]:
    """What submissions leave in the durable Redis: job records, in-flight marks,
    unfinished jobs."""
    return {
        "records": sum(1 for _ in rdb.scan_iter(keys.job("*"))),
        "marks": sum(1 for _ in rdb.scan_iter(keys.inflight("*"))),
        "pending": rdb.zcard(keys.job_pending()),
    }


def test_an_unreachable_payload_store_loses_nothing(
    chaos: SimpleNamespace, rdb: redis.Redis, tiny_dir: Path
) -> None:
    client, keys, worker, moto = chaos.client, chaos.keys, chaos.worker, chaos.moto
    assert worker.proc is not None and moto.proc is not None
    # Jobs queued while the worker is frozen: their payloads are in the store.
    os.kill(worker.proc.pid, signal.SIGSTOP)
    asked = {}
    for i in range(JOBS):
        image, text = small_jpeg(seed=900 + i), f"queued before the outage {i}"
        resp = client.post("/v1/jobs", data={"text": text}, files={"image": ("c.jpg", image)})
        assert resp.status_code == 202, resp.text
        asked[resp.json()["job_id"]] = (image, text)
    before = held(rdb, keys)

    os.kill(moto.proc.pid, signal.SIGSTOP)
    down = time.monotonic()
    try:
        # A submission while the store is unreachable: a 503 that says so, with
        # Retry-After, and nothing stored for it.
        image = small_jpeg(seed=999)
        resp = client.post(
            "/v1/jobs", data={"text": "during the outage"}, files={"image": ("d.jpg", image)}
        )
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["type"].endswith("/payload-store-unavailable"), resp.json()
        assert held(rdb, keys) == before

        # The worker takes the queued jobs, cannot read their images, and puts them
        # back (queued again, the start counted); none fails.
        os.kill(worker.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while True:
            records = {j: rdb.hgetall(keys.job(j)) for j in asked}
            statuses = {j: r[b"status"].decode() for j, r in records.items()}
            assert "failed" not in statuses.values(), records
            assert "succeeded" not in statuses.values(), records  # no image, no verdict
            put_back = [
                j for j, r in records.items() if r[b"status"] == b"queued" and r.get(b"attempts")
            ]
            if len(put_back) == JOBS and time.monotonic() - down >= OUTAGE_S:
                break
            assert time.monotonic() < deadline, records
            time.sleep(0.1)
        outage = time.monotonic() - down
    finally:
        os.kill(moto.proc.pid, signal.SIGCONT)

    # Back: every job submitted before the outage finishes with the model's verdict.
    direct = Entailer(load_checkpoint(tiny_dir), device="cpu")
    for job_id, (image, text) in asked.items():
        job = poll(client, job_id, timeout=60)
        record = {k.decode(): v.decode() for k, v in rdb.hgetall(keys.job(job_id)).items()}
        assert job["status"] == "succeeded", {k: record.get(k) for k in ("error", "attempts")}
        want = direct.predict(image, text)
        assert job["verdict"]["label"] == want.label, job
        for label, p in want.probabilities.items():
            assert job["verdict"]["probabilities"][label] == pytest.approx(p, abs=1e-6)
    attempts = [int(rdb.hget(keys.job(j), "attempts") or 0) for j in asked]
    assert all(a >= 2 for a in attempts), attempts  # put back, then run again
    # Each job waited on the store more often than it may be tried, and none failed.
    waits = [int(rdb.hget(keys.job(j), "store_waits") or 0) for j in asked]
    assert max(waits) > 3, waits
    # And the service takes new work again.
    resp = client.post(
        "/v1/jobs?wait=30", data={"text": "after the outage"}, files={"image": ("a.jpg", image)}
    )
    assert resp.status_code in (200, 202) and resp.json()["status"] == "succeeded", resp.text
    print(f"store down {outage:.1f} s; attempts per job {attempts}")
