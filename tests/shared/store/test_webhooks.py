"""The webhook slots (``shared/store/webhooks.py``) on the test Valkey: at most
``bound`` holds per receiver however many take at once, holds given back or expired on
the server's clock, and what counts as one receiver."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from shared import wiring
from shared.store import Clients, SyncRedis, WebhookSlots, receiver_of
from shared.store.webhooks import HOLD_MARGIN_S

pytestmark = pytest.mark.usefixtures("clean_inproc")


def slots(stores, bound: int, hold_s: float) -> WebhookSlots:
    return WebhookSlots(
        stores.jobs.settings, stores.jobs.keys, stores.clients, bound=bound, hold_s=hold_s
    )


def test_a_hold_lasts_the_delivery_deadline_and_a_margin(inproc_settings, stores):
    default = stores.webhook_slots
    assert default.bound == inproc_settings.webhook_per_host
    assert default.hold_ms == int((inproc_settings.webhook_deadline_s + HOLD_MARGIN_S) * 1000)
    assert slots(stores, 1, 0.0001).hold_ms == 1  # never shorter than a millisecond


def test_racing_takers_get_exactly_the_bound(inproc_settings, stores):
    """Forty threads, each on clients of its own (as many coordinators), take at once:
    exactly ``bound`` holds are granted."""
    start = threading.Barrier(40)
    clients = [wiring.sync_redis(inproc_settings) for _ in range(40)]

    def take(n: int) -> str | None:
        mine = wiring.stores(inproc_settings, sync=clients[n])
        start.wait()
        return slots(mine, 5, 10).take("race.example:443")

    try:
        with ThreadPoolExecutor(40) as pool:
            got = list(pool.map(take, range(40)))
    finally:
        for c in clients:
            c.close()
    tokens = [t for t in got if t is not None]
    assert len(tokens) == 5 and len(set(tokens)) == 5
    s = slots(stores, 5, 10)
    assert s.in_flight("race.example:443") == 5
    for token in tokens:
        s.give_back("race.example:443", token)
    assert s.in_flight("race.example:443") == 0
    assert s.take("race.example:443") is not None  # free again


def test_a_hold_never_given_back_expires(stores):
    s = slots(stores, 1, 0.3)
    assert s.take("dead.example:80") is not None
    assert s.take("dead.example:80") is None  # the bound
    time.sleep(0.4)  # its coordinator died: the hold runs out
    assert s.in_flight("dead.example:80") == 0
    assert s.take("dead.example:80") is not None


def test_giving_back_a_lost_or_unknown_hold_never_raises(inproc_settings, stores, caplog):
    s = slots(stores, 1, 10)
    s.give_back("nobody.example:80", "not-a-token")  # nothing to end
    token = s.take("gone.example:80")
    assert token is not None
    broken = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    unreachable = WebhookSlots(
        inproc_settings, s.keys, Clients(blocking=SyncRedis(broken, broken)), bound=1, hold_s=10
    )
    unreachable.give_back("gone.example:80", token)  # Redis unreachable: it just expires
    assert any("not given back" in r.getMessage() for r in caplog.records)
    assert s.in_flight("gone.example:80") == 1


def test_holds_live_under_the_service_prefix(inproc_settings, stores, rdb):
    s = slots(stores, 2, 10)
    s.take("keyed.example:443")
    assert rdb.zcard(f"{inproc_settings.key_prefix}webhooks:keyed.example:443") == 1


@pytest.mark.parametrize(
    ("url", "receiver"),
    [
        ("https://hooks.example/a", "hooks.example:443"),
        ("http://hooks.example/a", "hooks.example:80"),
        ("https://HOOKS.example:8443/a", "hooks.example:8443"),
        ("http://[::1]:9/a", "::1:9"),
        ("http://[::1/a", "http://[::1/a"),  # does not parse: its own receiver
        ("http://hooks.example:99999/a", "http://hooks.example:99999/a"),
    ],
)
def test_a_receiver_is_host_and_port(url: str, receiver: str):
    assert receiver_of(url) == receiver
