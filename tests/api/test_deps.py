"""Who is calling (``api/deps.py``), in process against the embedded Valkey: how a key
is presented, key records and ``OFA_API_KEYS`` entries, 401 for a missing, unknown,
wrong or revoked key, 403 for a scope the key lacks, the key cache, and the charge."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from starlette.requests import Request

from api.app import create_app
from api.deps import RateLimitedError, Services, authenticate, charge, presented_key
from shared.store.apikeys import ALL_SCOPES, Caller, Limits, Scope
from tests.helpers import API_KEY, API_KEY_OWNER, key_store, small_jpeg

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def client(inproc_settings) -> Iterator[TestClient]:
    """The app with no key of its own: each request presents one, or none."""
    with TestClient(create_app(inproc_settings)) as c:
        yield c


def make_key(rdb: redis.Redis, settings, *scopes: Scope) -> str:
    return key_store(settings.key_prefix, rdb).create("team", frozenset(scopes), 0, 1)


def snapshot(rdb: redis.Redis, settings) -> set[bytes]:
    return set(rdb.scan_iter(f"{settings.key_prefix}*"))


def request_with(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw})


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"Authorization": "Bearer  abc "}, "abc"),
        ({"Authorization": "bearer abc"}, "abc"),
        ({"Authorization": "Bearer abc", "X-API-Key": "other"}, "abc"),
        ({"Authorization": "Basic abc", "X-API-Key": " other "}, "other"),
        ({"Authorization": "Bearer ", "X-API-Key": "other"}, "other"),
        ({}, ""),
    ],
)
def test_the_presented_key(headers, key):
    assert presented_key(request_with(headers)) == key


def test_auth_required(client, rdb, inproc_settings):
    before = snapshot(rdb, inproc_settings)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "nope"}):
        resp = client.post(
            "/v1/jobs",
            data={"text": "a"},
            files={"image": ("a.jpg", small_jpeg(seed=501))},
            headers=headers,
        )
        assert resp.status_code == 401
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/jobs/whatever").status_code == 401
    assert snapshot(rdb, inproc_settings) == before


def test_unknown_malformed_or_wrong_keys_are_401_never_403(client, rdb, inproc_settings):
    token = make_key(rdb, inproc_settings, Scope.READ)
    key_id = token.split("_")[1]
    for bad in (
        "nope",
        token[:-2] + "xx",  # the right id, the wrong secret
        f"ofa_{key_id[::-1]}_" + "a" * 43,  # well formed, no such id
        "ofa_0123456789abcdef_" + "a" * 43,
    ):
        resp = client.get("/v1/jobs/whatever", headers={"X-API-Key": bad})
        assert resp.status_code == 401, bad
        assert resp.json()["detail"] == "invalid or revoked API key"
    missing = client.get("/v1/jobs/whatever")
    assert missing.status_code == 401 and missing.json()["detail"] == "missing API key"


def test_a_key_out_of_scope_is_403(client, rdb, inproc_settings):
    reader = make_key(rdb, inproc_settings, Scope.READ)
    jobs_only = make_key(rdb, inproc_settings, Scope.JOBS)
    scans_only = make_key(rdb, inproc_settings, Scope.SCANS)
    before = snapshot(rdb, inproc_settings)

    def post_job(token: str):
        return client.post(
            "/v1/jobs",
            data={"text": "a"},
            files={"image": ("a.jpg", small_jpeg(seed=502))},
            headers={"X-API-Key": token},
        )

    def post_scan(token: str):
        manifest = {"manifest": ("m.jsonl", io.BytesIO(b'{"id": "1", "image": "a.jpg"}\n'))}
        return client.post("/v1/scans", files=manifest, headers={"X-API-Key": token})

    denied = post_job(reader)
    assert denied.status_code == 403 and "'jobs' scope" in denied.json()["detail"]
    assert denied.json()["title"] == "Forbidden"
    assert client.delete("/v1/jobs/x", headers={"X-API-Key": reader}).status_code == 403
    assert post_scan(reader).status_code == 403
    assert post_job(scans_only).status_code == 403
    scan = post_scan(jobs_only)
    assert scan.status_code == 403 and "'scans' scope" in scan.json()["detail"]
    assert snapshot(rdb, inproc_settings) == before
    # Reading is implied by every scope: an unknown id is 404, not 403.
    for token in (reader, jobs_only, scans_only):
        assert client.get("/v1/jobs/x", headers={"X-API-Key": token}).status_code == 404


def test_a_revoked_key_is_401(client, rdb, inproc_settings):
    token = make_key(rdb, inproc_settings, Scope.JOBS)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/jobs/x", headers=headers).status_code == 404
    assert key_store(inproc_settings.key_prefix, rdb).revoke(token.split("_")[1])
    revoked = client.get("/v1/jobs/x", headers=headers)
    assert revoked.status_code == 401
    assert revoked.json()["detail"] == "invalid or revoked API key"


def test_a_revocation_reaches_a_cached_key_within_the_cache_time(rdb, inproc_settings):
    token = make_key(rdb, inproc_settings, Scope.JOBS)
    headers = {"X-API-Key": token}
    with TestClient(create_app(inproc_settings.model_copy(update={"key_cache_s": 2}))) as c:
        assert c.get("/v1/jobs/x", headers=headers).status_code == 404
        revoked_at = time.monotonic()
        key_store(inproc_settings.key_prefix, rdb).revoke(token.split("_")[1])
        # Remembered for the cache time: no lookup per request.
        assert c.get("/v1/jobs/x", headers=headers).status_code == 404
        time.sleep(max(0.0, revoked_at + 2.1 - time.monotonic()))
        assert c.get("/v1/jobs/x", headers=headers).status_code == 401


def test_an_env_key_has_every_scope_and_the_default_limits(inproc_settings):
    settings = inproc_settings.model_copy(
        update={"rate_limit_per_min": 30, "rate_limit_burst": 7, "cache_hit_rate_factor": 4}
    )

    async def main() -> Caller:
        s = Services.build(settings)
        try:
            return await authenticate(s, request_with({"X-API-Key": API_KEY}))
        finally:
            await s.aclose()

    caller = asyncio.run(main())
    assert caller.key_id == API_KEY_OWNER and caller.name == "OFA_API_KEYS"
    assert caller.scopes == ALL_SCOPES and not caller.admin
    assert caller.limits == Limits(30, 7, 4)


def test_charge_admits_then_raises_rate_limited(inproc_settings, rdb):
    caller = Caller("charge-test", "t", ALL_SCOPES, Limits(1, 1))
    unlimited = Caller("free", "t", ALL_SCOPES, Limits(0, 1))

    async def main() -> None:
        s = Services.build(inproc_settings)
        try:
            assert await charge(s, unlimited, "miss", "new jobs") is None
            first = await charge(s, caller, "miss", "new jobs")
            assert first is not None and first.admitted and first.remaining == 0
            with pytest.raises(RateLimitedError) as refused:
                await charge(s, caller, "miss", "new jobs")
            assert not refused.value.decision.admitted
            retry = refused.value.decision.headers()["Retry-After"]
            assert refused.value.detail == (
                f"the rate limit of this API key for new jobs is used up: retry in {retry}s"
            )
        finally:
            await s.aclose()

    asyncio.run(main())
