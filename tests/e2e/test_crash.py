"""A worker killed with SIGKILL in the middle of a batch loses no job."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import poll, small_jpeg
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer


@pytest.mark.slow
def test_sigkill_mid_batch_then_restart(client, worker, rdb, keys, tiny_dir: Path):
    # A worker that holds items in its batcher for 3 s: the kill lands mid-batch.
    worker.kill()
    worker.start(OFA_BATCH_WAIT_MS="3000", OFA_BATCH_SIZE="64")
    images = {f"crash {i}": small_jpeg(seed=200 + i) for i in range(12)}
    job_ids = {}
    for text, image in images.items():
        resp = client.post("/v1/jobs", data={"text": text}, files={"image": ("a.jpg", image)})
        assert resp.status_code == 202, resp.text
        job_ids[text] = resp.json()["job_id"]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        statuses = [client.get(f"/v1/jobs/{j}").json()["status"] for j in job_ids.values()]
        if statuses.count("running") >= 6:
            break
        time.sleep(0.05)
    assert "running" in statuses and "succeeded" not in statuses, statuses
    worker.kill()
    # Nothing finished; the messages are unacked, held by a dead worker.
    statuses = [client.get(f"/v1/jobs/{j}").json()["status"] for j in job_ids.values()]
    assert "succeeded" not in statuses

    killed_at = time.monotonic()
    worker.start()  # normal batching
    direct = Entailer(load_checkpoint(tiny_dir), device="cpu")
    for text, job_id in job_ids.items():
        job = poll(client, job_id, timeout=60)
        assert job["status"] == "succeeded", job
        expected = direct.predict(images[text], text)
        assert job["verdict"]["label"] == expected.label
        for label, p in expected.probabilities.items():
            assert job["verdict"]["probabilities"][label] == pytest.approx(p, abs=1e-6)
    recovered_in = time.monotonic() - killed_at
    # visibility timeout (8 s) + restore sweep (2 s) + start-up and slack
    assert recovered_in < 40, recovered_in
