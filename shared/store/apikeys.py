"""API keys as records: a name, scopes, a rate limit, and the SHA-256 of the secret.

A key reads ``ofa_<id>_<secret>``: the id finds the record in one lookup, the secret
(32 random bytes) is never stored, only its SHA-256 (a slow hash buys nothing for a
secret with 256 bits of entropy). Revoking keeps the record, marked, so ``keys list``
still shows who had access. Keys from ``OFA_API_KEYS`` work as before, with every
scope and the default limits; they have no record.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

import redis
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.store.codec import decode_hash, now, text_of

TOKEN = re.compile(r"^ofa_([0-9a-f]{16})_([A-Za-z0-9_-]{20,100})$")


class Scope(StrEnum):
    """What a key may do. ``jobs`` and ``scans`` include reading what they submit."""

    JOBS = "jobs"  # submit, cancel and poll jobs
    SCANS = "scans"  # start, cancel and read scans
    READ = "read"  # poll jobs, read scans and reports; submit nothing
    # Sees every key's jobs and scans (operators, support). Without it a key sees only
    # what it submitted itself: other keys' ids answer 404.
    ADMIN = "admin"


# What an ``OFA_API_KEYS`` entry may do: everything but seeing other keys' work (an
# operator who needs that makes a key record with ``--scopes admin``).
ALL_SCOPES = frozenset({Scope.JOBS, Scope.SCANS, Scope.READ})


@dataclass(frozen=True)
class Limits:
    """Requests per minute and burst for submissions that compute (misses); cache hits
    get ``hit_factor`` times both. A rate of 0 means unlimited."""

    per_minute: float
    burst: int
    hit_factor: float = 10.0


@dataclass(frozen=True)
class Caller:
    """Who made the request: the key's id (or ``env-<hash>`` for an OFA_API_KEYS entry)."""

    key_id: str
    name: str
    scopes: frozenset[Scope]
    limits: Limits

    def may(self, scope: Scope) -> bool:
        """Whether the key carries ``scope`` (``read`` is implied by the others)."""
        return scope in self.scopes or (scope == Scope.READ and bool(self.scopes))

    @property
    def admin(self) -> bool:
        """Whether the key sees every key's jobs and scans."""
        return Scope.ADMIN in self.scopes

    def owns(self, owner: str | None) -> bool:
        """Whether a job or scan recorded with ``owner`` is this caller's to see, cancel
        or read: its own, or any with the ``admin`` scope. A record with no owner (made
        before owners were recorded, or by a scan) is an admin's alone."""
        return self.admin or (owner is not None and owner == self.key_id)


@dataclass(frozen=True)
class KeyRecord:
    """A key as ``keys list`` shows it (never the secret)."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    per_minute: float
    burst: int
    created_at: float
    revoked_at: float | None


def parse_scopes(text: str) -> frozenset[Scope]:
    """``jobs,scans`` -> scopes; ValueError names an unknown one."""
    out = set()
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        try:
            out.add(Scope(part))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise ValueError(f"unknown scope {part!r} (known: {known})") from None
    if not out:
        raise ValueError("give at least one scope")
    return frozenset(out)


def digest(secret_token: str) -> str:
    """Hex SHA-256 of a whole key."""
    return hashlib.sha256(secret_token.encode()).hexdigest()


class ApiKeyStore:
    """Creates, lists, revokes and verifies key records in the durable store."""

    def __init__(
        self,
        keys: Keys,
        sync: redis.Redis | None = None,
        aio: aioredis.Redis | None = None,
        hit_factor: float = 10.0,
    ) -> None:
        self.keys = keys
        self.sync = sync
        self.aio = aio
        self.hit_factor = hit_factor

    def create(self, name: str, scopes: frozenset[Scope], per_minute: float, burst: int) -> str:
        """Store a new key's record; returns the key itself (shown once, never stored)."""
        assert self.sync is not None
        if not name.strip():
            raise ValueError("a key needs a name")
        if per_minute < 0 or burst < 1:
            raise ValueError("the rate must be >= 0 per minute and the burst >= 1")
        key_id = secrets.token_hex(8)
        token = f"ofa_{key_id}_{secrets.token_urlsafe(32)}"
        record = {
            "name": name.strip(),
            "scopes": ",".join(sorted(s.value for s in scopes)),
            "per_minute": repr(float(per_minute)),
            "burst": str(int(burst)),
            "sha256": digest(token),
            "created_at": now(),
        }
        pipe = self.sync.pipeline()
        pipe.hset(self.keys.api_key(key_id), mapping=record)  # type: ignore[arg-type]
        pipe.sadd(self.keys.api_key_index(), key_id)
        pipe.execute()
        return token

    def list(self) -> list[KeyRecord]:
        """Every key ever created, oldest first."""
        assert self.sync is not None
        ids = sorted(text_of(i) for i in self.sync.smembers(self.keys.api_key_index()))
        pipe = self.sync.pipeline()
        for key_id in ids:
            pipe.hgetall(self.keys.api_key(key_id))
        out = []
        for key_id, raw in zip(ids, pipe.execute(), strict=True):
            rec = decode_hash(raw)
            if not rec:
                continue
            out.append(
                KeyRecord(
                    key_id=key_id,
                    name=rec.get("name", ""),
                    scopes=tuple(s for s in rec.get("scopes", "").split(",") if s),
                    per_minute=float(rec.get("per_minute", 0)),
                    burst=int(rec.get("burst", 1)),
                    created_at=float(rec.get("created_at", 0)),
                    revoked_at=float(rec["revoked_at"]) if "revoked_at" in rec else None,
                )
            )
        return sorted(out, key=lambda r: r.created_at)

    def revoke(self, key_id: str) -> bool:
        """Mark the key revoked; False when there is no such key."""
        assert self.sync is not None
        key = self.keys.api_key(key_id)
        if not self.sync.exists(key):
            return False
        self.sync.hsetnx(key, "revoked_at", now())
        return True

    async def averify(self, token: str) -> Caller | None:
        """The caller a presented key belongs to, or None (unknown, wrong or revoked)."""
        assert self.aio is not None
        m = TOKEN.match(token)
        if m is None:
            return None
        rec = decode_hash(await self.aio.hgetall(self.keys.api_key(m.group(1))))
        if not rec or "revoked_at" in rec:
            return None
        if not hmac.compare_digest(rec.get("sha256", ""), digest(token)):
            return None
        scopes = frozenset(Scope(s) for s in rec.get("scopes", "").split(",") if s)
        limits = Limits(float(rec["per_minute"]), int(rec["burst"]), self.hit_factor)
        return Caller(m.group(1), rec.get("name", ""), scopes, limits)


class KeyCache:
    """Verified callers remembered for a few seconds, so each request does not cost a
    lookup; a revocation takes effect within ``ttl_s``."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[str, tuple[float, Caller]] = {}

    def get(self, token: str) -> Caller | None:
        hit = self._seen.get(token)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, token: str, caller: Caller) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[token] = (time.monotonic() + self.ttl_s, caller)
