"""Worker heartbeats."""

from __future__ import annotations

import time

import redis
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.store.codec import text_of


class WorkerRegistry:
    """Workers announce the model they serve; the API's readiness check counts them."""

    FRESH_S = 30.0

    def __init__(self, keys: Keys, model_tag: tuple[str, str]) -> None:
        self.key = keys.workers(*model_tag)

    def beat(self, durable: redis.Redis, name: str, interval_s: float) -> None:
        """Announce ``name``; forget workers silent for six intervals."""
        now_s = time.time()
        pipe = durable.pipeline()
        pipe.zadd(self.key, {name: now_s})
        pipe.zremrangebyscore(self.key, 0, now_s - 6 * interval_s)
        pipe.expire(self.key, int(10 * interval_s))
        pipe.execute()

    def withdraw(self, durable: redis.Redis, name: str) -> None:
        """A worker stopping cleanly leaves the set at once."""
        durable.zrem(self.key, name)

    async def acount(self, adurable: aioredis.Redis) -> int:
        """Workers heard from in the last ``FRESH_S`` seconds."""
        return int(await adurable.zcount(self.key, time.time() - self.FRESH_S, "+inf"))

    def members(self, durable: redis.Redis, within_s: float) -> list[str]:
        """Names of workers heard from in the last ``within_s`` seconds."""
        return [text_of(m) for m in durable.zrangebyscore(self.key, time.time() - within_s, "+inf")]


class WebhookLog:
    """Webhook deliveries counted by outcome: the coordinators' webhook threads add,
    the API's /metrics reads (any API process reports the service's totals)."""

    # delivered: accepted by the receiver; retried: an attempt failed, another is
    # queued; failed: given up after the last retry (the receiver never got it).
    OUTCOMES = ("delivered", "retried", "failed")

    def __init__(self, keys: Keys) -> None:
        self.key = keys.webhook_stats()

    def record(self, durable: redis.Redis, outcome: str) -> None:
        """Count one delivery attempt's ``outcome`` (one of ``OUTCOMES``)."""
        durable.hincrby(self.key, outcome, 1)

    async def aread(self, adurable: aioredis.Redis) -> dict[str, int]:
        """Every outcome's count (0 for one never seen)."""
        raw = {text_of(k): int(v) for k, v in (await adurable.hgetall(self.key)).items()}
        return {name: raw.get(name, 0) for name in self.OUTCOMES}


class ReaperLog:
    """The reaper's lock, its counters and the time of its last pass."""

    COUNTERS = ("resent", "poisoned", "scans_resent")

    def __init__(self, keys: Keys) -> None:
        self.lock_key = keys.reaper_lock()
        self.key = keys.reaper_stats()

    def take_turn(self, durable: redis.Redis, token: str, period_s: float) -> bool:
        """True for the one process whose pass this period is."""
        return bool(durable.set(self.lock_key, token, nx=True, px=max(1, int(period_s * 900))))

    def record(self, durable: redis.Redis, counts: dict[str, int]) -> None:
        """Add a pass's counts and stamp its time."""
        pipe = durable.pipeline(transaction=False)
        for name in self.COUNTERS:
            if counts.get(name):
                pipe.hincrby(self.key, name, counts[name])
        pipe.hset(self.key, "last_run", f"{time.time():.3f}")
        pipe.execute()

    async def aread(self, adurable: aioredis.Redis) -> tuple[dict[str, int], float | None]:
        """(counters, seconds since the last pass, or None if none ever ran)."""
        raw = {text_of(k): text_of(v) for k, v in (await adurable.hgetall(self.key)).items()}
        last = raw.get("last_run")
        counts = {name: int(raw.get(name, 0)) for name in self.COUNTERS}
        return counts, time.time() - float(last) if last else None
