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
