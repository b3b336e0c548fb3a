"""FastAPI dependencies, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, HTTPException, Request

from api.waiter import JobWaiter
from shared import wiring
from shared.fetch import UrlPolicy
from shared.objects import BucketPolicy, ObjectStorage
from shared.payloads import PayloadStore
from shared.settings import Settings
from shared.store import JobReads, JobStore, ReaperLog, ScanStore, WebhookLog, WorkerRegistry
from shared.store.apikeys import ALL_SCOPES, ApiKeyStore, Caller, KeyCache, Limits, Scope, digest
from shared.store.limits import Decision, RateLimiter


@dataclass
class Services:
    """What the routes use, built once at start-up from the settings."""

    settings: Settings
    redis: wiring.AsyncRedis
    redis_sync: wiring.SyncRedis  # for work done in the thread pool (submitting)
    jobs: JobStore
    reads: JobReads
    scans: ScanStore
    workers: WorkerRegistry
    reaper_log: ReaperLog
    webhook_log: WebhookLog
    celery: Celery
    url_policy: UrlPolicy
    waiter: JobWaiter
    apikeys: ApiKeyStore
    key_cache: KeyCache
    limiter: RateLimiter
    objects: ObjectStorage  # scans' manifests and results named by object URLs
    buckets: BucketPolicy  # which object URLs a request may name (OFA_OBJECT_BUCKETS)
    payloads: PayloadStore  # where submitted images wait for a worker (``jobs`` writes them)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """Redis clients, stores, the Celery app and the URL policy."""
        from shared.celery_app import make_celery

        aio, sync = wiring.async_redis(settings), wiring.sync_redis(settings)
        objects = wiring.object_storage(settings)
        payloads = wiring.payload_store(settings, sync, objects)
        stores = wiring.stores(settings, sync=sync, aio=aio, payloads=payloads)
        return cls(
            settings=settings,
            redis=aio,
            redis_sync=sync,
            jobs=stores.jobs,
            reads=stores.reads,
            scans=stores.scans,
            workers=stores.workers,
            reaper_log=stores.reaper_log,
            webhook_log=stores.webhook_log,
            celery=make_celery(settings),
            url_policy=wiring.url_policy(settings),
            waiter=JobWaiter(stores.reads.done),
            apikeys=stores.apikeys,
            key_cache=KeyCache(settings.key_cache_s),
            limiter=stores.limiter,
            objects=objects,
            buckets=wiring.bucket_policy(settings),
            payloads=payloads,
        )

    async def aclose(self) -> None:
        """Stop listening and close every connection pool."""
        await self.waiter.close()
        await self.redis.aclose()
        self.redis_sync.close()
        self.payloads.close()


async def get_services(request: Request) -> Services:
    """The application's services (async: a plain def would cost a thread hop)."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


# How a key is presented; the OpenAPI document declares both schemes (added in
# api/problems.py:install), so the docs' Authorize button sends the key. Read straight
# from the headers: FastAPI's security dependencies cost a resolution step each on
# every request.
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer KEY`"},
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "`X-API-Key: KEY`",
    },
}


def presented_key(request: Request) -> str:
    """``Authorization: Bearer KEY``, else ``X-API-Key: KEY``, else empty."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key", "").strip()


class RateLimitedError(Exception):
    """A caller over its rate limit (429, with the limit's headers)."""

    def __init__(self, decision: Decision, what: str) -> None:
        self.decision = decision
        self.detail = (
            f"the rate limit of this API key for {what} is used up: "
            f"retry in {decision.headers()['Retry-After']}s"
        )
        super().__init__(self.detail)


def _env_caller(services: Services, given: str) -> Caller | None:
    """An ``OFA_API_KEYS`` entry matching ``given``: every scope, the default limits."""
    settings = services.settings
    for k in settings.api_keys:
        if hmac.compare_digest(given.encode(), k.get_secret_value().encode()):
            limits = Limits(
                settings.rate_limit_per_min,
                settings.rate_limit_burst,
                settings.cache_hit_rate_factor,
            )
            return Caller(f"env-{digest(given)[:16]}", "OFA_API_KEYS", ALL_SCOPES, limits)
    return None


async def authenticate(services: Services, request: Request) -> Caller:
    """The caller presenting the request's key: a key record (``ofa-entail keys``) or
    an ``OFA_API_KEYS`` entry. Missing, unknown, wrong or revoked keys get 401."""
    given = presented_key(request)
    if not given:
        raise HTTPException(401, "missing API key", headers={"WWW-Authenticate": "Bearer"})
    caller = services.key_cache.get(given)
    if caller is not None:
        return caller  # not put back: a revocation must reach it within the cache time
    caller = _env_caller(services, given) or await services.apikeys.averify(given)
    if caller is None:
        raise HTTPException(
            401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"}
        )
    services.key_cache.put(given, caller)
    return caller


@dataclass(frozen=True)
class Call:
    """The services and the authorised caller, in one dependency: each dependency costs
    FastAPI a resolution step on every request."""

    services: Services
    caller: Caller


def _scoped(scope: Scope) -> Any:
    async def call(request: Request) -> Call:
        services = await get_services(request)
        caller = await authenticate(services, request)
        if not caller.may(scope):
            raise HTTPException(
                403, f"this API key ({caller.name}) lacks the '{scope.value}' scope"
            )
        return Call(services, caller)

    return call


ReadCall = Annotated[Call, Depends(_scoped(Scope.READ))]
JobsCall = Annotated[Call, Depends(_scoped(Scope.JOBS))]
ScansCall = Annotated[Call, Depends(_scoped(Scope.SCANS))]


async def charge(services: Services, caller: Caller, bucket: str, what: str) -> Decision | None:
    """Count one request against the caller's limit; ``RateLimitedError`` when over."""
    decision = await services.limiter.charge(caller, bucket)
    if decision is not None and not decision.admitted:
        raise RateLimitedError(decision, what)
    return decision
