"""Webhooks cannot stall the coordinator: real API, worker and coordinator processes,
real receivers on 127.0.0.1. A receiver that answers a byte a second, with deliveries
queued for it, delays neither another key's scan nor another receiver's webhook; a
scan callback keeps its delivery id across retries."""

from __future__ import annotations

import base64
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import httpx
import pytest

from tests.helpers import SlowReceiver, poll, small_jpeg

ROWS = 40
PER_HOST = 4  # OFA_WEBHOOK_PER_HOST's default: the e2e environment leaves it


class Quick(http.server.BaseHTTPRequestHandler):
    """A healthy receiver: records each delivery and when it came; refuses (HTTP 500)
    the first delivery of each id in ``refuse_first``."""

    got: ClassVar[list[tuple[float, dict, bytes, int]]] = []
    refuse_first: ClassVar[set[str]] = set()

    def log_message(self, *_: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        delivery = self.headers.get("X-OFA-Delivery", "")
        status = 204
        if self.path.startswith("/refuse-first") and delivery not in Quick.refuse_first:
            Quick.refuse_first.add(delivery)
            status = 500
        Quick.got.append((time.time(), dict(self.headers), body, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def quick() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quick)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def other_key(service_env: dict) -> str:
    """Another caller: an API key record made by the real CLI, scans only, unlimited."""
    made = subprocess.run(
        [sys.executable, "-m", "shared.cli", "keys", "create", "--name", "webhook-isolation",
         "--scopes", "scans", "--rate", "0", "--json"],
        env=service_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return json.loads(made.stdout)["key"]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def start_scan(client: httpx.Client, rows: list[dict], **data: str) -> str:
    manifest = "".join(json.dumps(r) + "\n" for r in rows).encode()
    resp = client.post("/v1/scans", files={"manifest": ("m.jsonl", manifest)}, data=data)
    assert resp.status_code == 202, resp.text
    return resp.json()["scan_id"]


def finish_scan(client: httpx.Client, scan_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = client.get(f"/v1/scans/{scan_id}").json()
        if doc["status"] in ("succeeded", "cancelled", "failed") and doc["pending"] == 0:
            return doc
        assert time.monotonic() < deadline, f"scan stalled: {doc}"
        time.sleep(0.1)


def scan_rows(first_seed: int) -> list[dict]:
    """Rows no verdict is cached for: each one a job for the worker."""
    return [
        {
            "id": f"r{i}",
            "image_base64": base64.b64encode(small_jpeg(seed=first_seed + i, size=40)).decode(),
            "text": "webhook isolation",
        }
        for i in range(ROWS)
    ]


def timed_scan(client: httpx.Client, first_seed: int) -> float:
    start = time.monotonic()
    scan_id = start_scan(client, scan_rows(first_seed))
    doc = finish_scan(client, scan_id, timeout=120)
    took = time.monotonic() - start
    assert doc["status"] == "succeeded" and doc["done"] == ROWS, doc
    return took


@pytest.mark.slow
def test_a_dribbling_receiver_stalls_no_scan_and_no_other_webhook(
    client, api, worker, coordinator, quick, other_key
):
    scanner = httpx.Client(base_url=api, headers={"X-API-Key": other_key}, timeout=60)
    quiet_s = timed_scan(scanner, 7000)
    slow = SlowReceiver("dribble", every_s=1.0)
    try:
        # Eight finished jobs whose webhooks go to the dribbling receiver: more than
        # the coordinator's four scan threads, twice the bound per receiver.
        for i in range(8):
            resp = client.post(
                "/v1/jobs",
                data={"text": "dribbled", "callback_url": slow.url("localhost")},
                files={"image": ("a.jpg", small_jpeg(seed=7100 + i))},
            )
            assert resp.status_code == 202, resp.text
        wait_for(lambda: slow.open_now() == PER_HOST, 30, "deliveries never reached the receiver")

        start = time.monotonic()
        scan_id = start_scan(scanner, scan_rows(7200))
        # Meanwhile another receiver's job webhook.
        resp = client.post(
            "/v1/jobs",
            data={"text": "quick", "callback_url": f"{quick}/hook"},
            files={"image": ("a.jpg", small_jpeg(seed=7300))},
        )
        job_id = resp.json()["job_id"]
        job = poll(client, job_id)
        assert job["status"] == "succeeded"
        wait_for(
            lambda: any(h.get("X-OFA-Job") == job_id for _, h, _, _ in Quick.got),
            10,
            "the other receiver's webhook did not come",
        )
        came = next(t for t, h, _, _ in Quick.got if h.get("X-OFA-Job") == job_id)
        doc = finish_scan(scanner, scan_id, timeout=120)
        loaded_s = time.monotonic() - start
        assert doc["status"] == "succeeded" and doc["done"] == ROWS, doc

        late = came - job["finished_at"]
        print(f"\n{ROWS}-row scan: {quiet_s:.1f}s quiet, {loaded_s:.1f}s beside the dribbling"
              f" receiver; the other webhook {late:.2f}s after its job finished")  # fmt: skip
        # Deliveries to the dribbling receiver end at their deadline (4 s here: half the
        # visibility timeout) and others take their place, never above the bound.
        wait_for(lambda: len(slow.requests) > 2 * PER_HOST, 30, "deliveries never ended")
        assert slow.peak() <= PER_HOST, slow.spans
    finally:
        slow.stop()
        scanner.close()
    assert late < 3.0
    assert loaded_s < 2 * quiet_s + 5, (quiet_s, loaded_s)


def test_a_scan_callback_keeps_its_delivery_id_across_retries(
    client, api, worker, coordinator, quick
):
    rows = [{"id": "r0", "image_base64": base64.b64encode(small_jpeg(seed=7400)).decode(),
             "text": "callback retried"}]  # fmt: skip
    scan_id = start_scan(client, rows, callback_url=f"{quick}/refuse-first")
    finish_scan(client, scan_id, timeout=60)

    def mine() -> list[tuple[float, dict, bytes, int]]:
        return [g for g in Quick.got if g[1].get("X-OFA-Scan") == scan_id]

    wait_for(lambda: len(mine()) >= 2, 20, "the refused callback was not sent again")
    (t1, h1, b1, s1), (t2, h2, b2, s2) = mine()[:2]
    assert (s1, s2) == (500, 204)
    assert h1["X-OFA-Delivery"] == h2["X-OFA-Delivery"]
    assert json.loads(b1)["delivery_id"] == json.loads(b2)["delivery_id"] == h1["X-OFA-Delivery"]
    assert t2 - t1 >= 0.9  # the first retry's backoff: 1 s
    doc = client.get(f"/v1/scans/{scan_id}").json()
    assert doc["scan_id"] == json.loads(b2)["scan_id"]


@pytest.mark.slow
def test_a_delivery_held_past_the_visibility_timeout_is_sent_once(
    client, worker, coordinator, quick, valkey
):
    """A retry's wait may pass the visibility timeout (8 s here): the coordinator holds
    the message at most half of it at a stretch and sends it again, with the same eta,
    so the sweep never hands a held message out a second time."""
    from shared.celery_app import make_celery
    from shared.settings import Settings
    from shared.wire import TASK_JOB_WEBHOOK, WEBHOOK_QUEUE

    resp = client.post(
        "/v1/jobs?wait=20", data={"text": "held"}, files={"image": ("a.jpg", small_jpeg(seed=7500))}
    )
    job_id = resp.json()["job_id"]
    assert resp.json()["status"] == "succeeded", resp.text
    celery = make_celery(Settings(redis_url=valkey))
    sent = time.time()
    celery.send_task(
        TASK_JOB_WEBHOOK,
        args=(job_id, f"{quick}/hook", "held-delivery"),
        queue=WEBHOOK_QUEUE,
        countdown=10,
        ignore_result=True,
    )

    def mine() -> list[float]:
        return [t for t, h, _, _ in Quick.got if h.get("X-OFA-Delivery") == "held-delivery"]

    wait_for(lambda: bool(mine()), 20, "the held delivery never came")
    assert mine()[0] - sent >= 9.9
    time.sleep(6)  # a visibility timeout's sweep would have sent it again by now
    assert len(mine()) == 1
