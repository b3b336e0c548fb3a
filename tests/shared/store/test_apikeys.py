"""API key records (``shared/store/apikeys.py``), against the embedded Valkey."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.settings import Settings
from shared.store.apikeys import (
    TOKEN,
    ApiKeyStore,
    Caller,
    KeyCache,
    Limits,
    Scope,
    digest,
    parse_scopes,
)
from shared.store.clients import AsyncRedis, Clients, SyncRedis

KEYS = Keys("ofa:apikeys-test:")


@pytest.fixture
def settings(inproc_settings) -> Settings:
    return inproc_settings.model_copy(update={"key_prefix": KEYS.prefix})


def keystore(
    settings: Settings, sync: redis.Redis | None = None, aio: aioredis.Redis | None = None
) -> ApiKeyStore:
    clients = Clients(
        blocking=SyncRedis(sync, sync) if sync is not None else None,
        asyncio=AsyncRedis(aio, aio) if aio is not None else None,
    )
    return ApiKeyStore(settings, KEYS, clients)


@pytest.fixture
def sync(valkey) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(valkey)
    yield client
    client.close()


def test_key_records_store_only_hashes(valkey, sync, settings):

    async def verify(store: ApiKeyStore, token: str) -> Caller | None:
        r = aioredis.Redis.from_url(valkey)
        try:
            return await keystore(settings, aio=r).averify(token)
        finally:
            await r.aclose()

    store = keystore(settings, sync=sync)
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


def test_a_revoked_key_in_constant_use_is_refused_within_the_cache_time(valkey, sync, settings):
    """The API's key cache serves a verified key for ``OFA_KEY_CACHE_S`` from its
    verification, not from its last use: a key used without pause is refused all the
    same once revoked."""
    from types import SimpleNamespace

    from fastapi import HTTPException
    from starlette.requests import Request

    from api.deps import authenticate
    from shared.store.apikeys import KeyCache

    token = keystore(settings, sync=sync).create("busy", parse_scopes("jobs"), 0, 1)
    request = Request({"type": "http", "headers": [(b"x-api-key", token.encode())]})

    async def main() -> float:
        r = aioredis.Redis.from_url(valkey)
        services = SimpleNamespace(
            key_cache=KeyCache(0.5),
            settings=SimpleNamespace(api_keys=[]),
            apikeys=keystore(settings, aio=r),
        )
        try:
            assert (await authenticate(services, request)).name == "busy"  # type: ignore[arg-type]
            keystore(settings, sync=sync).revoke(token.split("_")[1])
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


def test_create_refuses_a_nameless_key_or_a_bad_limit(sync, settings):
    store = keystore(settings, sync=sync)
    with pytest.raises(ValueError, match="needs a name"):
        store.create("  ", parse_scopes("jobs"), 10, 1)
    with pytest.raises(ValueError, match="burst >= 1"):
        store.create("team", parse_scopes("jobs"), 10, 0)
    with pytest.raises(ValueError, match="rate must be >= 0"):
        store.create("team", parse_scopes("jobs"), -1, 1)


def test_list_shows_every_key_oldest_first_never_the_secret(sync, settings):
    for key in sync.scan_iter(f"{KEYS.prefix}*"):
        sync.delete(key)
    store = keystore(settings, sync=sync)
    first = store.create("first", parse_scopes("read"), 6, 2)
    second = store.create("second", parse_scopes("scans,jobs"), 0, 1)
    listed = store.list()
    assert [r.name for r in listed] == ["first", "second"]
    assert listed[0].scopes == ("read",) and listed[1].scopes == ("jobs", "scans")
    assert (listed[0].per_minute, listed[0].burst) == (6.0, 2)
    assert listed[0].revoked_at is None and listed[0].created_at <= listed[1].created_at
    assert all(TOKEN.match(t) for t in (first, second))
    assert store.revoke(listed[1].key_id)
    assert store.list()[1].revoked_at is not None  # kept, marked


def test_scopes_parse_and_imply_read():
    assert parse_scopes(" Jobs ,,scans ") == {Scope.JOBS, Scope.SCANS}
    with pytest.raises(ValueError, match="at least one scope"):
        parse_scopes(" , ")
    jobs_only = Caller("k", "k", parse_scopes("jobs"), Limits(1, 1))
    assert jobs_only.may(Scope.READ) and not jobs_only.may(Scope.SCANS)
    assert not Caller("n", "n", frozenset(), Limits(1, 1)).may(Scope.READ)
    assert jobs_only.owns("k") and not jobs_only.owns("other") and not jobs_only.owns(None)
    admin = Caller("a", "a", parse_scopes("admin"), Limits(1, 1))
    assert admin.admin and admin.owns("other") and admin.owns(None)


def test_digest_is_the_sha256_of_the_whole_key():
    token = "ofa_0123456789abcdef_" + "x" * 43
    assert digest(token) == hashlib.sha256(token.encode()).hexdigest()
    assert TOKEN.match(token) is not None and TOKEN.match("ofa_short_x") is None


def test_the_key_cache_forgets_a_caller_after_its_time():
    who = Caller("k", "k", parse_scopes("jobs"), Limits(1, 1))
    cache = KeyCache(0.2)
    cache.put("token", who)
    assert cache.get("token") is who and cache.get("other") is None
    time.sleep(0.25)
    assert cache.get("token") is None
    off = KeyCache(0)
    off.put("token", who)
    assert off.get("token") is None  # a cache time of 0 keeps nothing
