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
import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from shared.objects import ObjectUrl
from shared.store.clients import Store
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
    # Object URL prefixes this key may name (``s3://bucket/prefix/``), narrowing
    # ``OFA_OBJECT_BUCKETS``; None (no list: an OFA_API_KEYS entry, or a record made
    # without one): the global list alone applies.
    buckets: tuple[str, ...] | None = None

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
    buckets: tuple[str, ...] | None = None


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


def check_buckets(entries: Sequence[str]) -> tuple[str, ...]:
    """A key's bucket list, each entry an object URL prefix (``s3://bucket`` or
    ``s3://bucket/prefix/``) written back canonically; ValueError names a bad one."""
    out = []
    for entry in entries:
        try:
            url = ObjectUrl.parse(entry.strip(), key_required=False)
        except ValueError as exc:
            raise ValueError(f"bucket {entry!r}: {exc}") from None
        out.append(f"{url.scheme}://{url.bucket}/{url.key + '/' if url.key else ''}")
    return tuple(out)


def _buckets_of(rec: dict[str, str]) -> tuple[str, ...] | None:
    return tuple(json.loads(rec["buckets"])) if "buckets" in rec else None


def digest(secret_token: str) -> str:
    """Hex SHA-256 of a whole key."""
    return hashlib.sha256(secret_token.encode()).hexdigest()


class ApiKeyStore(Store):
    """Creates, lists, revokes (``ofa-entail keys``) and verifies (the API) key records
    in the durable store; a key's cache hits get ``OFA_CACHE_HIT_RATE_FACTOR`` times its
    limits."""

    def create(
        self,
        name: str,
        scopes: frozenset[Scope],
        per_minute: float,
        burst: int,
        buckets: Sequence[str] | None = None,
    ) -> str:
        """Store a new key's record; returns the key itself (shown once, never stored).
        ``buckets``: the object URL prefixes the key may name (within
        ``OFA_OBJECT_BUCKETS``); None leaves the global list alone to apply."""
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
        if buckets is not None:
            record["buckets"] = json.dumps(check_buckets(buckets))
        pipe = self.sync.durable.pipeline()
        pipe.hset(self.keys.api_key(key_id), mapping=record)  # type: ignore[arg-type]
        pipe.sadd(self.keys.api_key_index(), key_id)
        pipe.execute()
        return token

    def list(self) -> list[KeyRecord]:
        """Every key ever created, oldest first."""
        durable = self.sync.durable
        ids = sorted(text_of(i) for i in durable.smembers(self.keys.api_key_index()))
        pipe = durable.pipeline()
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
                    buckets=_buckets_of(rec),
                )
            )
        return sorted(out, key=lambda r: r.created_at)

    def revoke(self, key_id: str) -> bool:
        """Mark the key revoked; False when there is no such key."""
        key = self.keys.api_key(key_id)
        if not self.sync.durable.exists(key):
            return False
        self.sync.durable.hsetnx(key, "revoked_at", now())
        return True

    async def averify(self, token: str) -> Caller | None:
        """The caller a presented key belongs to, or None (unknown, wrong or revoked)."""
        m = TOKEN.match(token)
        if m is None:
            return None
        rec = decode_hash(await self.aio.durable.hgetall(self.keys.api_key(m.group(1))))
        if not rec or "revoked_at" in rec:
            return None
        if not hmac.compare_digest(rec.get("sha256", ""), digest(token)):
            return None
        scopes = frozenset(Scope(s) for s in rec.get("scopes", "").split(",") if s)
        factor = self.settings.cache_hit_rate_factor
        limits = Limits(float(rec["per_minute"]), int(rec["burst"]), factor)
        return Caller(m.group(1), rec.get("name", ""), scopes, limits, _buckets_of(rec))


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
