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

from shared.keys import Keys
from shared.settings import Settings
from shared.store.apikeys import Caller
from shared.store.clients import Clients, Store
from shared.store.scripts import Script

_GCRA = Script("gcra")
_REFUND = Script("refund")

# Cache hits take their tokens from Redis this many at a time (at most; fewer for small
# bursts), a token batch, and spend them locally for up to TOKEN_BATCH_S: one round trip
# per batch instead of one per request. Tokens a process took and did not spend are
# lost, never lent twice, so a limit is never exceeded across processes; near the limit
# a process may refuse a little early while another holds unspent tokens.
HIT_BATCH = 16
TOKEN_BATCH_S = 1.0


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
    def _headers(self) -> dict[str, str]:  # a token batch's decision answers many requests
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
class _TokenBatch:
    """Hit tokens this process took from Redis and has not spent yet."""

    tokens: int
    expires: float
    decision: Decision


class RateLimiter(Store):
    """Charges requests to a caller's buckets: ``miss`` (work that computes, scans:
    exact, one atomic call each) and ``hit`` (answered from the cache, ``hit_factor``
    times as generous, taken in token batches)."""

    def __init__(self, settings: Settings, keys: Keys, clients: Clients) -> None:
        super().__init__(settings, keys, clients)
        self._batches: dict[str, _TokenBatch] = {}
        self._refills: dict[str, asyncio.Future[None]] = {}  # a token batch being taken, by key

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
            held = self._batches.get(key)
            now = time.monotonic()
            if held is not None and held.expires > now:
                if held.tokens > 0:
                    held.tokens -= 1
                    return held.decision
                if not held.decision.admitted:  # refused until then: no need to ask
                    return replace(held.decision, retry_after_s=held.expires - now)
            refill = self._refills.get(key)
            if refill is None:
                return await self._refill(key, interval_ms, burst)
            # Another request of this process is taking a token batch: wait for its tokens
            # rather than take one too (concurrent requests would each take a batch, keep one
            # token and lose the rest: one round trip a request, the budget wasted).
            await asyncio.shield(refill)  # a cancelled waiter leaves it to the others

    async def _refill(self, key: str, interval_ms: float, burst: int) -> Decision:
        """Take a token batch of hit tokens for ``key``, keep one; the requests waiting on
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
            if len(self._batches) > 10_000:
                self._batches.clear()
            if decision.admitted:
                self._batches[key] = _TokenBatch(batch - 1, now + TOKEN_BATCH_S, decision)
            else:
                self._batches[key] = _TokenBatch(0, now + decision.retry_after_s, decision)
            return decision
        finally:
            del self._refills[key]
            done.set_result(None)  # never cancelled: waiters shield it

    async def refund(self, caller: Caller, bucket: str) -> None:
        """Give back one request charged to an exact bucket (``miss``) that stored
        nothing after all: a refused manifest costs its caller nothing."""
        assert bucket != "hit", "hit tokens come in token batches, not charged one by one"
        rate = caller.limits.per_minute
        if rate > 0:
            key = self.keys.rate_bucket(caller.key_id, bucket)
            await _REFUND.acall(self.aio.durable, [key], [60_000.0 / rate])

    async def _take(self, key: str, interval_ms: float, burst: int, cost: int) -> Decision:
        reply = await _GCRA.acall(self.aio.durable, [key], [interval_ms, burst, cost])
        admitted, remaining, retry_ms, reset_ms = reply
        return Decision(
            admitted=bool(admitted),
            limit=burst,
            remaining=int(remaining),
            retry_after_s=float(retry_ms) / 1000,
            reset_s=float(reset_ms) / 1000,
            window_s=burst * interval_ms / 1000,
        )
