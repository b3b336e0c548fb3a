"""The GCRA rate limiter and API key records, against the embedded Valkey."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.store.apikeys import ALL_SCOPES, ApiKeyStore, Caller, Limits, Scope, parse_scopes
from shared.store.limits import RateLimiter

KEYS = Keys("ofa:limits-test:")


def caller(name: str, per_minute: float, burst: int, hit_factor: float = 10) -> Caller:
    return Caller(name, name, ALL_SCOPES, Limits(per_minute, burst, hit_factor))


def test_burst_then_refill_with_honest_retry_after(valkey):
    async def run(r: aioredis.Redis) -> None:
        limiter = RateLimiter(KEYS, r)
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


def test_hit_tokens_are_leased_in_batches_never_over_the_limit(valkey):
    """Two limiters (two API processes) share a hit bucket of 320 at 10/s: leasing 16 at
    a time, together they never admit more than the bucket and its refill allow, and
    lose at most a lease each to tokens the other holds."""

    async def main() -> None:
        clients = [aioredis.Redis.from_url(valkey) for _ in range(2)]
        try:
            limiters = [RateLimiter(KEYS, c) for c in clients]
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


def test_concurrent_cache_hits_wait_for_one_lease_instead_of_each_taking_one(valkey):
    """64 cache hits in flight at once in one API process take 4 leases of 16 and spend
    all 64 tokens; a cancelled request, even the one leasing, leaves the rest served."""

    async def main() -> None:
        r = aioredis.Redis.from_url(valkey)
        try:
            limiter = RateLimiter(KEYS, r)
            await limiter.charge(caller("warm", 60, 1), "miss")  # the script loaded
            who = caller("concurrent", per_minute=6, burst=1000, hit_factor=1)  # 16 a lease
            before = evalsha_calls(await r.info("commandstats"))
            got = await asyncio.gather(*(limiter.charge(who, "hit") for _ in range(64)))
            assert all(d is not None and d.admitted for d in got)
            assert evalsha_calls(await r.info("commandstats")) - before == 4
            # Nothing leased and lost: the next lease finds 1000 - 64 - 16 left.
            nxt = await RateLimiter(KEYS, r).charge(who, "hit")
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


@pytest.fixture
def sync(valkey) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(valkey)
    yield client
    client.close()


def test_key_records_store_only_hashes(valkey, sync):

    async def verify(store: ApiKeyStore, token: str) -> Caller | None:
        r = aioredis.Redis.from_url(valkey)
        try:
            return await ApiKeyStore(KEYS, aio=r).averify(token)
        finally:
            await r.aclose()

    store = ApiKeyStore(KEYS, sync=sync)
    token = store.create("team", parse_scopes("jobs, read"), per_minute=30, burst=5)
    key_id = token.split("_")[1]
    raw = sync.hgetall(KEYS.api_key(key_id))
    assert token.encode() not in b"".join(raw.values())
    who = asyncio.run(verify(store, token))
    assert who is not None and who.scopes == {Scope.JOBS, Scope.READ}
    assert who.limits.per_minute == 30 and who.limits.burst == 5
    assert who.may(Scope.READ) and not who.may(Scope.SCANS)
    assert asyncio.run(verify(store, token[:-1] + ("A" if token[-1] != "A" else "B"))) is None
    assert [r.name for r in store.list() if r.key_id == key_id] == ["team"]
    assert store.revoke(key_id) and not store.revoke("f" * 16)
    assert asyncio.run(verify(store, token)) is None
    with pytest.raises(ValueError, match="unknown scope 'root'"):
        parse_scopes("jobs,root")
    assert parse_scopes("read, admin") == {Scope.READ, Scope.ADMIN}


def test_a_revoked_key_in_constant_use_is_refused_within_the_cache_time(valkey, sync):
    """The API's key cache serves a verified key for ``OFA_KEY_CACHE_S`` from its
    verification, not from its last use: a key used without pause is refused all the
    same once revoked."""
    from types import SimpleNamespace

    from fastapi import HTTPException
    from starlette.requests import Request

    from api.deps import authenticate
    from shared.store.apikeys import KeyCache

    token = ApiKeyStore(KEYS, sync=sync).create("busy", parse_scopes("jobs"), 0, 1)
    request = Request({"type": "http", "headers": [(b"x-api-key", token.encode())]})

    async def main() -> float:
        r = aioredis.Redis.from_url(valkey)
        services = SimpleNamespace(
            key_cache=KeyCache(0.5),
            settings=SimpleNamespace(api_keys=[]),
            apikeys=ApiKeyStore(KEYS, aio=r),
        )
        try:
            assert (await authenticate(services, request)).name == "busy"  # type: ignore[arg-type]
            ApiKeyStore(KEYS, sync=sync).revoke(token.split("_")[1])
            revoked = time.monotonic()
            while True:  # used every 10 ms
                try:
                    await authenticate(services, request)  # type: ignore[arg-type]
                except HTTPException as exc:
                    assert exc.status_code == 401
                    return time.monotonic() - revoked
                assert time.monotonic() - revoked < 5, "a revoked key kept working"
                await asyncio.sleep(0.01)
        finally:
            await r.aclose()

    assert asyncio.run(main()) <= 1.0
