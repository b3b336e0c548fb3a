"""The GCRA rate limiter, against the embedded Valkey."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.settings import Settings
from shared.store.apikeys import ALL_SCOPES, Caller, Limits
from shared.store.clients import AsyncRedis, Clients
from shared.store.limits import RateLimiter

KEYS = Keys("ofa:limits-test:")


@pytest.fixture
def settings(inproc_settings) -> Settings:
    return inproc_settings.model_copy(update={"key_prefix": KEYS.prefix})


def limiter_on(settings: Settings, r: aioredis.Redis) -> RateLimiter:
    return RateLimiter(settings, KEYS, Clients(asyncio=AsyncRedis(r, r)))


def caller(name: str, per_minute: float, burst: int, hit_factor: float = 10) -> Caller:
    return Caller(name, name, ALL_SCOPES, Limits(per_minute, burst, hit_factor))


def test_burst_then_refill_with_honest_retry_after(valkey, settings):
    async def run(r: aioredis.Redis) -> None:
        limiter = limiter_on(settings, r)
        who = caller("gcra-1", per_minute=120, burst=3)  # one every 500 ms
        got = [await limiter.charge(who, "miss") for _ in range(4)]
        assert [d.admitted for d in got if d] == [True, True, True, False]
        assert [d.remaining for d in got if d] == [2, 1, 0, 0]
        refused = got[3]
        assert refused is not None and 0 < refused.retry_after_s <= 0.5
        headers = refused.headers()
        assert headers["Retry-After"] == "1" and headers["RateLimit-Limit"] == "3"
        await asyncio.sleep(refused.retry_after_s + 0.01)
        again = await limiter.charge(who, "miss")
        assert again is not None and again.admitted and again.remaining == 0
        # Cache hits draw on their own bucket, hit_factor times larger: 60/min, 10 at once.
        hitter = caller("gcra-hits", per_minute=6, burst=1, hit_factor=10)
        hits = [await limiter.charge(hitter, "hit") for _ in range(11)]
        assert [d.admitted for d in hits if d].count(True) == 10
        assert (await limiter.charge(hitter, "miss")).admitted  # type: ignore[union-attr]
        # Rate 0: no limit, no Redis call.
        assert await limiter.charge(caller("free", 0, 1), "miss") is None
        # A server that forgot the script (restart, SCRIPT FLUSH) gets it again.
        await r.script_flush()
        assert (await limiter.charge(caller("gcra-2", 60, 1), "miss")).admitted  # type: ignore[union-attr]

    async def main() -> None:
        r = aioredis.Redis.from_url(valkey)
        try:
            await run(r)
        finally:
            await r.aclose()

    asyncio.run(main())


def test_hit_tokens_are_leased_in_batches_never_over_the_limit(valkey, settings):
    """Two limiters (two API processes) share a hit bucket of 320 at 10/s: leasing 16 at
    a time, together they never admit more than the bucket and its refill allow, and
    lose at most a lease each to tokens the other holds."""

    async def main() -> None:
        clients = [aioredis.Redis.from_url(valkey) for _ in range(2)]
        try:
            limiters = [limiter_on(settings, c) for c in clients]
            who = caller("leased", per_minute=60, burst=32, hit_factor=10)

            before = evalsha_calls(await clients[0].info("commandstats"))
            t0 = time.monotonic()
            got = [await limiters[i % 2].charge(who, "hit") for i in range(400)]
            elapsed = time.monotonic() - t0
            admitted = sum(1 for d in got if d and d.admitted)
            assert 320 - 2 * 16 <= admitted <= 320 + math.ceil(elapsed * 10), (admitted, elapsed)
            assert not got[-1].admitted and got[-1].headers()["Retry-After"] == "1"  # type: ignore[union-attr]
            # 400 charges, far fewer round trips: one per lease, plus the refusals.
            calls = evalsha_calls(await clients[0].info("commandstats")) - before
            assert calls < 150, calls
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(main())


def evalsha_calls(stats: dict) -> int:
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_concurrent_cache_hits_wait_for_one_lease_instead_of_each_taking_one(valkey, settings):
    """64 cache hits in flight at once in one API process take 4 leases of 16 and spend
    all 64 tokens; a cancelled request, even the one leasing, leaves the rest served."""

    async def main() -> None:
        r = aioredis.Redis.from_url(valkey)
        try:
            limiter = limiter_on(settings, r)
            await limiter.charge(caller("warm", 60, 1), "miss")  # the script loaded
            who = caller("concurrent", per_minute=6, burst=1000, hit_factor=1)  # 16 a lease
            before = evalsha_calls(await r.info("commandstats"))
            got = await asyncio.gather(*(limiter.charge(who, "hit") for _ in range(64)))
            assert all(d is not None and d.admitted for d in got)
            assert evalsha_calls(await r.info("commandstats")) - before == 4
            # Nothing leased and lost: the next lease finds 1000 - 64 - 16 left.
            nxt = await limiter_on(settings, r).charge(who, "hit")
            assert nxt is not None and nxt.remaining == 1000 - 64 - 16, nxt

            other = caller("cancelled", per_minute=6, burst=1000, hit_factor=1)
            tasks = [asyncio.create_task(limiter.charge(other, "hit")) for _ in range(40)]
            await asyncio.sleep(0)  # the first is leasing, the others wait for it
            tasks[0].cancel()
            tasks[1].cancel()
            done = await asyncio.gather(*tasks[2:])
            assert all(d is not None and d.admitted for d in done)
            # redis-py may finish a command it has sent rather than give up the reply.
            assert tasks[1].cancelled() and (tasks[0].cancelled() or tasks[0].result())
        finally:
            await r.aclose()

    asyncio.run(main())
