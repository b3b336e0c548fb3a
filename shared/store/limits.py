"""Per-key rate limits shared by every API process: GCRA, one atomic script in Redis.

The generic cell rate algorithm keeps one number per key and bucket, the theoretical
arrival time (TAT) of the next request. With an emission interval T (60 s / rate) and
a burst B, a request is admitted when TAT - now <= (B - 1) * T, and then moves TAT on
by T. The clock is the server's (``TIME``), so API processes on different hosts agree.
Refused requests change nothing and learn exactly when the next one would pass.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, replace
from functools import cached_property

import redis.asyncio as aioredis

from shared.keys import Keys
from shared.store.apikeys import Caller

# KEYS: bucket. ARGV: emission interval T (ms), burst B, cost n. Admits n requests at
# once when the new TAT stays within B*T of now. Returns {admitted, remaining,
# retry_after_ms, reset_ms}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local T = tonumber(ARGV[1])
local limit = T * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + T * tonumber(ARGV[3])
if new_tat - now > limit then
  return {0, 0, tostring(new_tat - limit - now), tostring(tat - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return {1, math.floor((limit - (new_tat - now)) / T), '0', tostring(new_tat - now)}
"""

# KEYS: bucket. ARGV: emission interval T (ms). Gives one admitted request back: TAT
# moves back by T, never before now (a bucket back at now is simply full).
_REFUND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(ARGV[1])
if tat <= now then return redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
return 1
"""

# Cache hits take their tokens from Redis this many at a time (at most; fewer for small
# bursts) and spend them locally for up to LEASE_S: one round trip per batch instead of
# one per request. Tokens a process leased and did not spend are lost, never lent
# twice, so a limit is never exceeded across processes; near the limit a process may
# refuse a little early while another holds unspent tokens.
HIT_BATCH = 16
LEASE_S = 1.0


@dataclass(frozen=True)
class Decision:
    """One request's outcome against a limit."""

    admitted: bool
    limit: int  # the burst
    remaining: int
    retry_after_s: float  # 0 when admitted
    reset_s: float  # until the bucket is full again
    window_s: float  # the time the burst takes to refill from empty

    def headers(self) -> dict[str, str]:
        """``RateLimit-*`` headers (IETF draft), and ``Retry-After`` when refused."""
        return dict(self._headers)  # a copy: callers add their own

    @cached_property
    def _headers(self) -> dict[str, str]:  # a leased decision answers many requests
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
            "RateLimit-Policy": f"{self.limit};w={math.ceil(self.window_s)}",
        }
        if not self.admitted:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


@dataclass
class _Lease:
    """Hit tokens this process took from Redis and has not spent yet."""

    tokens: int
    expires: float
    decision: Decision


class RateLimiter:
    """Charges requests to a caller's buckets: ``miss`` (work that computes, scans:
    exact, one atomic call each) and ``hit`` (answered from the cache, ``hit_factor``
    times as generous, taken in leased batches)."""

    def __init__(self, keys: Keys, durable: aioredis.Redis) -> None:
        self.keys = keys
        self.redis = durable
        # EVALSHA, and the script sent again if a restarted server forgot it.
        self._gcra = durable.register_script(_GCRA)
        self._refund = durable.register_script(_REFUND)
        self._leases: dict[str, _Lease] = {}
        self._refills: dict[str, asyncio.Future[None]] = {}  # a lease being taken, by key

    async def charge(self, caller: Caller, bucket: str) -> Decision | None:
        """Admit or refuse one request; None when the caller has no limit."""
        limits = caller.limits
        factor = limits.hit_factor if bucket == "hit" else 1.0
        rate = limits.per_minute * factor
        if rate <= 0:
            return None
        burst = max(1, int(limits.burst * factor))
        interval_ms = 60_000.0 / rate
        key = self.keys.rate_bucket(caller.key_id, bucket)
        if bucket != "hit":
            return await self._take(key, interval_ms, burst, 1)
        while True:
            lease = self._leases.get(key)
            now = time.monotonic()
            if lease is not None and lease.expires > now:
                if lease.tokens > 0:
                    lease.tokens -= 1
                    return lease.decision
                if not lease.decision.admitted:  # refused until then: no need to ask
                    return replace(lease.decision, retry_after_s=lease.expires - now)
            refill = self._refills.get(key)
            if refill is None:
                return await self._refill(key, interval_ms, burst)
            # Another request of this process is leasing: wait for its tokens rather
            # than lease again (concurrent requests would each take a batch, keep one
            # token and lose the rest: one round trip a request, the budget wasted).
            await asyncio.shield(refill)  # a cancelled waiter leaves it to the others

    async def _refill(self, key: str, interval_ms: float, burst: int) -> Decision:
        """Lease a batch of hit tokens for ``key``, keep one; the requests waiting on
        the refill take the others (or, when it failed, try again themselves)."""
        done = asyncio.get_running_loop().create_future()
        self._refills[key] = done
        try:
            now = time.monotonic()
            batch = max(1, min(HIT_BATCH, burst // HIT_BATCH))
            decision = await self._take(key, interval_ms, burst, batch)
            if not decision.admitted and batch > 1:
                decision = await self._take(key, interval_ms, burst, 1)
                batch = 1
            if len(self._leases) > 10_000:
                self._leases.clear()
            if decision.admitted:
                self._leases[key] = _Lease(batch - 1, now + LEASE_S, decision)
            else:
                self._leases[key] = _Lease(0, now + decision.retry_after_s, decision)
            return decision
        finally:
            del self._refills[key]
            done.set_result(None)  # never cancelled: waiters shield it

    async def refund(self, caller: Caller, bucket: str) -> None:
        """Give back one request charged to an exact bucket (``miss``) that stored
        nothing after all: a refused manifest costs its caller nothing."""
        assert bucket != "hit", "hit tokens are leased, not charged one by one"
        rate = caller.limits.per_minute
        if rate > 0:
            key = self.keys.rate_bucket(caller.key_id, bucket)
            await self._refund(keys=[key], args=[60_000.0 / rate])

    async def _take(self, key: str, interval_ms: float, burst: int, cost: int) -> Decision:
        reply = await self._gcra(keys=[key], args=[interval_ms, burst, cost])
        admitted, remaining, retry_ms, reset_ms = reply
        return Decision(
            admitted=bool(admitted),
            limit=burst,
            remaining=int(remaining),
            retry_after_s=float(retry_ms) / 1000,
            reset_s=float(reset_ms) / 1000,
            window_s=burst * interval_ms / 1000,
        )
