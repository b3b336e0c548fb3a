"""One webhook delivery, called directly against real receivers on 127.0.0.1 and the
session's Valkey: its deadline, its cap on the answer, the bound per receiver shared by
every coordinator, and retries (the consumer that runs these in the coordinator is
driven end to end in tests/e2e/test_webhook_isolation.py)."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import pytest
import redis
from pydantic import SecretStr

from shared import wiring
from shared.fetch import UrlPolicy, post_json
from shared.store import Clients, SyncRedis, WebhookSlots, receiver_of
from tests.helpers import SlowReceiver
from worker.scans.callback import CallbackFailed, post_signed, sign
from worker.scans.webhooks import BUSY_PAUSE_S, Webhooks

pytestmark = pytest.mark.usefixtures("clean_inproc")

SECRET = "webhook-test-secret"
LOCAL = UrlPolicy(timeout_s=1.0, max_redirects=0, max_bytes=1024, allow_hosts=("127.0.0.1",))


def wait_for(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- one POST ---------------------------------------------------------------------------


def test_a_delivery_ends_at_its_deadline_however_slowly_the_receiver_answers():
    # A byte every 0.2 s: no single read waits long enough for httpx's own timeout.
    slow = SlowReceiver("dribble", every_s=0.2)
    try:
        start = time.monotonic()
        with pytest.raises(CallbackFailed, match="did not answer within 1s"):
            post_signed(slow.url(), b"{}", {}, b"s", LOCAL, 65536)
        took = time.monotonic() - start
        assert 1.0 <= took < 1.8, took
        assert len(slow.requests) == 1
        wait_for(lambda: slow.open_now() == 0, timeout=1.0)  # the connection was closed
    finally:
        slow.stop()


def test_a_delivery_reads_at_most_the_cap_of_an_endless_answer():
    endless = SlowReceiver("endless")
    policy = UrlPolicy(timeout_s=10.0, max_redirects=0, max_bytes=1024, allow_hosts=("127.0.0.1",))
    try:
        start = time.monotonic()
        answer = asyncio.run(post_json(endless.url(), b"{}", {}, policy, 65536))
        assert time.monotonic() - start < 2.0  # stopped at the cap, not at the deadline
        assert answer.status_code == 200 and answer.truncated
        assert len(answer.head) == 65536 and set(answer.head) == {ord("x")}
        wait_for(lambda: endless.open_now() == 0, timeout=2.0)  # and hung up
        sent = endless.sent
        time.sleep(0.2)
        assert endless.sent == sent  # nothing more goes out to nobody
    finally:
        endless.stop()


# --- a delivery: bound per receiver, retries --------------------------------------------


class Gate(http.server.BaseHTTPRequestHandler):
    """Holds each POST until ``opened`` is set, then answers ``status``; records every
    request and the most in flight at once."""

    status: ClassVar[int] = 204
    opened: ClassVar[threading.Event] = threading.Event()
    got: ClassVar[list[tuple[dict, bytes]]] = []
    now: ClassVar[int] = 0
    peak: ClassVar[int] = 0
    lock: ClassVar[threading.Lock] = threading.Lock()

    def log_message(self, *_: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with Gate.lock:
            Gate.got.append((dict(self.headers), body))
            Gate.now += 1
            Gate.peak = max(Gate.peak, Gate.now)
        try:
            Gate.opened.wait(10)
            self.send_response(Gate.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
        finally:
            with Gate.lock:
                Gate.now -= 1


@pytest.fixture
def gate() -> Iterator[str]:
    Gate.status, Gate.now, Gate.peak = 204, 0, 0
    Gate.got.clear()
    Gate.opened.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gate)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    Gate.opened.set()
    server.shutdown()
    server.server_close()


def deliveries(inproc_settings, jobs, scans, inproc_redis, per_host: int, **more) -> Webhooks:
    settings = inproc_settings.model_copy(
        update={
            "webhook_secret": SecretStr(SECRET),
            "webhook_per_host": per_host,
            "webhook_timeout_s": 5.0,
            "url_allow_hosts": ["127.0.0.1"],
            **more,
        }
    )
    stores = wiring.stores(settings, sync=inproc_redis)
    slots = WebhookSlots(settings, jobs.keys, stores.clients, bound=per_host, hold_s=10)
    return Webhooks(settings, stores.reads, stores.scans, slots)


def finished_scan(scans, url: str) -> str:
    scan_id = uuid.uuid4().hex
    scans.create(scan_id, 1, "m.jsonl", callback_url=url)
    return scan_id


def test_deliveries_to_one_receiver_never_exceed_the_bound(
    inproc_settings, jobs, scans, inproc_redis, valkey, gate
):
    hooks = deliveries(inproc_settings, jobs, scans, inproc_redis, per_host=3)
    scan_id = finished_scan(scans, gate)
    receiver = receiver_of(gate)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(hooks.scan, scan_id, f"d{i}", retries=2) for i in range(8)]
        # Five find the receiver at its bound and come back at once, to wait in the
        # queue; three are at the receiver.
        wait_for(lambda: sum(f.done() for f in futures) == 5 and Gate.now == 3)
        busy = [f.result() for f in futures if f.done()]
        assert all(n.kind == "busy" and n.again and n.retries == 2 for n in busy), busy
        assert all(BUSY_PAUSE_S[0] <= n.countdown <= BUSY_PAUSE_S[1] for n in busy)
        assert hooks.slots.in_flight(receiver) == 3
        # Another coordinator (its own client) sees the same bound.
        own = redis.Redis.from_url(valkey)
        clients = Clients(blocking=SyncRedis(own, own))
        other = WebhookSlots(inproc_settings, jobs.keys, clients, bound=3, hold_s=10)
        assert other.take(receiver) is None
        other.durable.close()
        Gate.opened.set()
        outcomes = [f.result(timeout=5) for f in futures]
    assert sorted(n.kind for n in outcomes) == ["busy"] * 5 + ["delivered"] * 3
    assert Gate.peak == 3 and len(Gate.got) == 3
    assert hooks.slots.in_flight(receiver) == 0  # every hold given back
    assert scans.get(scan_id).get("callback_delivered_at")


def test_a_dead_coordinators_holds_expire(stores, inproc_settings):
    slots = WebhookSlots(inproc_settings, stores.jobs.keys, stores.clients, bound=2, hold_s=0.3)
    assert slots.take("example.org:443") and slots.take("example.org:443")
    assert slots.take("example.org:443") is None
    assert slots.take("example.org:8443")  # another port, another receiver
    time.sleep(0.35)
    assert slots.take("example.org:443")


def test_a_refused_scan_callback_backs_off_keeps_its_id_then_gives_up(
    inproc_settings, jobs, scans, inproc_redis, gate
):
    Gate.status = 500
    Gate.opened.set()
    hooks = deliveries(inproc_settings, jobs, scans, inproc_redis, 4, callback_max_retries=2)
    scan_id = finished_scan(scans, gate)
    outcomes = [hooks.scan(scan_id, "delivery-1", retries=n) for n in range(3)]
    assert [(n.kind, n.countdown, n.retries) for n in outcomes[:2]] == [
        ("retry", 1.0, 1),
        ("retry", 2.0, 2),
    ]
    assert outcomes[2].kind == "failed" and not outcomes[2].again
    assert "HTTP 500" in scans.get(scan_id)["callback_error"]
    assert len(Gate.got) == 3
    for headers, body in Gate.got:
        assert headers["X-OFA-Delivery"] == "delivery-1" and headers["X-OFA-Scan"] == scan_id
        doc = json.loads(body)
        assert doc["delivery_id"] == "delivery-1" and doc["scan_id"] == scan_id
        ts = headers["X-OFA-Timestamp"]
        assert headers["X-OFA-Signature"] == f"v1={sign(SECRET.encode(), ts, body)}"


def test_receivers_are_host_and_port():
    assert receiver_of("https://Example.org/hook") == "example.org:443"
    assert receiver_of("http://example.org./hook") == "example.org:80"
    assert receiver_of("http://127.0.0.1:8080/x?y") == "127.0.0.1:8080"
