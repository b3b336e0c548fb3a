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

logger = logging.getLogger(__name__)

# KEYS[1] = the receiver's holds (sorted set: token -> expiry, ms on the server clock)
# ARGV[1] = token, ARGV[2] = the bound, ARGV[3] = how long a hold lasts (ms)
# Returns 1 with the hold taken, 0 when the receiver is at its bound (nothing changed
# but the removal of expired holds).
_TAKE = """
local holds = KEYS[1]
local token = ARGV[1]
local bound = tonumber(ARGV[2])
local hold_ms = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', holds, '-inf', now)
if redis.call('ZCARD', holds) >= bound then return 0 end
redis.call('ZADD', holds, now + hold_ms, token)
redis.call('PEXPIRE', holds, hold_ms)
return 1
"""


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


class WebhookSlots:
    """At most ``bound`` deliveries in flight to one receiver; each hold lasts ``hold_s``
    unless given back first. Owns the ``webhooks:{host:port}`` keys."""

    def __init__(self, keys: Keys, durable: redis.Redis, bound: int, hold_s: float):
        self.keys = keys
        self.durable = durable
        self.bound = bound
        self.hold_ms = max(1, int(hold_s * 1000))
        self._take = durable.register_script(_TAKE)

    def key(self, receiver: str) -> str:
        """The receiver's sorted set of holds (``shared/keys.py`` spells every other key;
        this one is private to this store)."""
        return f"{self.keys.prefix}webhooks:{receiver}"

    def take(self, receiver: str) -> str | None:
        """A hold on one of the receiver's slots (its token), or None at the bound."""
        token = uuid.uuid4().hex
        taken = self._take(keys=[self.key(receiver)], args=[token, self.bound, self.hold_ms])
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
