"""How many webhook deliveries are in flight to each receiver, across every coordinator.

A receiver (``host:port``) has a sorted set of holds: one member per delivery in
flight, scored by when the hold expires on the server's clock (``TIME``, so
coordinators on different hosts agree). Taking a hold first drops the expired ones,
then admits the delivery only below the bound, in one script; the delivery gives its
hold back when it ends. A coordinator that dies mid-delivery leaves its hold to
expire: a hold lasts a little longer than a delivery's deadline, never for good.
"""

from __future__ import annotations

import logging
import uuid
from urllib.parse import urlsplit

import redis

from shared.keys import Keys
from shared.settings import Settings
from shared.store.clients import Clients, Store
from shared.store.scripts import Script

logger = logging.getLogger(__name__)

_TAKE_HOLD = Script("take_hold")

# A hold lasts a delivery's deadline (OFA_WEBHOOK_DEADLINE_S) and this much more: a
# delivery still running holds its slot; a dead coordinator's hold expires soon after.
HOLD_MARGIN_S = 5.0


def receiver_of(url: str) -> str:
    """``host:port`` of a webhook URL (the port as the scheme implies when absent): what
    the per-receiver bound counts. A URL that does not parse is its own receiver (its
    delivery fails anyway, before any connection)."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return url
    return f"{host}:{port or (443 if parts.scheme == 'https' else 80)}"


class WebhookSlots(Store):
    """At most ``bound`` deliveries in flight to one receiver (``OFA_WEBHOOK_PER_HOST``);
    each hold lasts ``hold_s`` (the delivery's deadline and ``HOLD_MARGIN_S``) unless
    given back first. Owns the ``webhooks:{host:port}`` keys."""

    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        clients: Clients,
        *,
        bound: int | None = None,
        hold_s: float | None = None,
    ) -> None:
        super().__init__(settings, keys, clients)
        self.bound = settings.webhook_per_host if bound is None else bound
        if hold_s is None:
            hold_s = settings.webhook_deadline_s + HOLD_MARGIN_S
        self.hold_ms = max(1, int(hold_s * 1000))

    @property
    def durable(self) -> redis.Redis:
        """The blocking durable client."""
        return self.sync.durable

    def key(self, receiver: str) -> str:
        """The receiver's sorted set of holds (``shared/keys.py`` spells every other key;
        this one is private to this store)."""
        return f"{self.keys.prefix}webhooks:{receiver}"

    def take(self, receiver: str) -> str | None:
        """A hold on one of the receiver's slots (its token), or None at the bound."""
        token = uuid.uuid4().hex
        taken = _TAKE_HOLD(self.durable, [self.key(receiver)], [token, self.bound, self.hold_ms])
        return token if int(taken) else None

    def give_back(self, receiver: str, token: str) -> None:
        """End a hold (a lost one just expires: never raises)."""
        try:
            self.durable.zrem(self.key(receiver), token)
        except redis.RedisError as exc:
            logger.warning("hold on %s not given back (it expires): %s", receiver, exc)

    def in_flight(self, receiver: str) -> int:
        """Holds not yet expired (given back ones are gone)."""
        t = self.durable.time()
        now_ms = t[0] * 1000 + t[1] // 1000
        return int(self.durable.zcount(self.key(receiver), f"({now_ms}", "+inf"))
