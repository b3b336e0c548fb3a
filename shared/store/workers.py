"""Worker heartbeats."""

from __future__ import annotations

import time

from shared.keys import Keys
from shared.settings import Settings
from shared.store.clients import Clients, Store
from shared.store.codec import text_of


class WorkerRegistry(Store):
    """Workers announce the model they serve; the API's readiness check counts them."""

    FRESH_S = 30.0

    def __init__(self, settings: Settings, keys: Keys, clients: Clients) -> None:
        super().__init__(settings, keys, clients)
        self.key = keys.workers(*settings.model_tag)

    def beat(self, name: str, interval_s: float) -> None:
        """Announce ``name``; forget workers silent for six intervals."""
        now_s = time.time()
        pipe = self.sync.durable.pipeline()
        pipe.zadd(self.key, {name: now_s})
        pipe.zremrangebyscore(self.key, 0, now_s - 6 * interval_s)
        pipe.expire(self.key, int(10 * interval_s))
        pipe.execute()

    def withdraw(self, name: str) -> None:
        """A worker stopping cleanly leaves the set at once."""
        self.sync.durable.zrem(self.key, name)

    async def acount(self) -> int:
        """Workers heard from in the last ``FRESH_S`` seconds."""
        return int(await self.aio.durable.zcount(self.key, time.time() - self.FRESH_S, "+inf"))

    def members(self, within_s: float) -> list[str]:
        """Names of workers heard from in the last ``within_s`` seconds."""
        got = self.sync.durable.zrangebyscore(self.key, time.time() - within_s, "+inf")
        return [text_of(m) for m in got]


class WebhookLog(Store):
    """Webhook deliveries counted by outcome: the coordinators' webhook threads add,
    the API's /metrics reads (any API process reports the service's totals)."""

    # delivered: accepted by the receiver; retried: an attempt failed, another is
    # queued; failed: given up after the last retry (the receiver never got it).
    OUTCOMES = ("delivered", "retried", "failed")

    def __init__(self, settings: Settings, keys: Keys, clients: Clients) -> None:
        super().__init__(settings, keys, clients)
        self.key = keys.webhook_stats()

    def record(self, outcome: str) -> None:
        """Count one delivery attempt's ``outcome`` (one of ``OUTCOMES``)."""
        self.sync.durable.hincrby(self.key, outcome, 1)

    async def aread(self) -> dict[str, int]:
        """Every outcome's count (0 for one never seen)."""
        got = await self.aio.durable.hgetall(self.key)
        raw = {text_of(k): int(v) for k, v in got.items()}
        return {name: raw.get(name, 0) for name in self.OUTCOMES}


class ReaperLog(Store):
    """The reaper's lock, its counters and the time of its last pass."""

    COUNTERS = ("resent", "poisoned", "scans_resent")

    def __init__(self, settings: Settings, keys: Keys, clients: Clients) -> None:
        super().__init__(settings, keys, clients)
        self.lock_key = keys.reaper_lock()
        self.key = keys.reaper_stats()

    def take_turn(self, token: str, period_s: float) -> bool:
        """True for the one process whose pass this period is."""
        px = max(1, int(period_s * 900))
        return bool(self.sync.durable.set(self.lock_key, token, nx=True, px=px))

    def record(self, counts: dict[str, int]) -> None:
        """Add a pass's counts and stamp its time."""
        pipe = self.sync.durable.pipeline(transaction=False)
        for name in self.COUNTERS:
            if counts.get(name):
                pipe.hincrby(self.key, name, counts[name])
        pipe.hset(self.key, "last_run", f"{time.time():.3f}")
        pipe.execute()

    async def aread(self) -> tuple[dict[str, int], float | None]:
        """(counters, seconds since the last pass, or None if none ever ran)."""
        got = await self.aio.durable.hgetall(self.key)
        raw = {text_of(k): text_of(v) for k, v in got.items()}
        last = raw.get("last_run")
        counts = {name: int(raw.get(name, 0)) for name in self.COUNTERS}
        return counts, time.time() - float(last) if last else None
