"""Per-key rate limits shared by every API process: GCRA, one atomic script in Redis.

The generic cell rate algorithm keeps one number per key and bucket, the theoretical
arrival time (TAT) of the next request. With an emission interval T (60 s / rate) and
a burst B, a request is admitted when TAT - now <= (B - 1) * T, and then moves TAT on
by T. The clock is the server's (``TIME``), so API processes on different hosts agree.
Refused requests change nothing and learn exactly when the next one would pass.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from shared.keys import Keys
from shared.store.apikeys import Caller

# KEYS: bucket. ARGV: emission interval (ms), burst. Returns {admitted, remaining,
# retry_after_ms, reset_ms}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local T = tonumber(ARGV[1])
local tau = T * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tau then
  return {0, 0, tostring(tat - tau - now), tostring(tat - now)}
end
local new_tat = tat + T
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
local remaining = math.floor((tau - (new_tat - T - now)) / T)
return {1, remaining, '0', tostring(new_tat - now)}
"""


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
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
            "RateLimit-Policy": f"{self.limit};w={math.ceil(self.window_s)}",
        }
        if not self.admitted:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


class RateLimiter:
    """Charges requests to a caller's buckets: ``miss`` (work that computes, scans) and
    ``hit`` (answered from the cache, ``hit_factor`` times as generous)."""

    def __init__(self, keys: Keys, durable: aioredis.Redis) -> None:
        self.keys = keys
        self.redis = durable
        self._sha = hashlib.sha1(_GCRA.encode()).hexdigest()

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
        try:  # EVALSHA directly: the cheapest call on the cache-hit path
            reply = await self.redis.evalsha(self._sha, 1, key, interval_ms, burst)
        except NoScriptError:  # a restarted server forgot it: send it once
            reply = await self.redis.eval(_GCRA, 1, key, interval_ms, burst)
        admitted, remaining, retry_ms, reset_ms = reply
        return Decision(
            admitted=bool(admitted),
            limit=burst,
            remaining=int(remaining),
            retry_after_s=float(retry_ms) / 1000,
            reset_s=float(reset_ms) / 1000,
            window_s=burst * interval_ms / 1000,
        )
