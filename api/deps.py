"""FastAPI dependencies, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.waiter import JobWaiter
from shared import wiring
from shared.fetch import UrlPolicy
from shared.settings import Settings
from shared.store import JobStore, ReaperLog, ScanStore, WorkerRegistry
from shared.store.apikeys import ALL_SCOPES, ApiKeyStore, Caller, KeyCache, Limits, Scope, digest
from shared.store.limits import Decision, RateLimiter


@dataclass
class Services:
    """What the routes use, built once at start-up from the settings."""

    settings: Settings
    redis: wiring.AsyncRedis
    redis_sync: wiring.SyncRedis  # for work done in the thread pool (submitting)
    jobs: JobStore
    scans: ScanStore
    workers: WorkerRegistry
    reaper_log: ReaperLog
    celery: Celery
    url_policy: UrlPolicy
    waiter: JobWaiter
    apikeys: ApiKeyStore
    key_cache: KeyCache
    limiter: RateLimiter

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """Redis clients, stores, the Celery app and the URL policy."""
        from shared.celery_app import make_celery

        aio, sync = wiring.async_redis(settings), wiring.sync_redis(settings)
        keys = wiring.keys(settings)
        return cls(
            settings=settings,
            redis=aio,
            redis_sync=sync,
            jobs=JobStore(settings, keys, sync, aio),
            scans=ScanStore(settings, keys, sync.durable, aio.durable),
            workers=WorkerRegistry(keys, settings.model_tag),
            reaper_log=ReaperLog(keys),
            celery=make_celery(settings),
            url_policy=wiring.url_policy(settings),
            waiter=JobWaiter(aio.durable, keys.done_channel()),
            apikeys=ApiKeyStore(keys, aio=aio.durable, hit_factor=settings.cache_hit_rate_factor),
            key_cache=KeyCache(settings.key_cache_s),
            limiter=RateLimiter(keys, aio.durable),
        )

    async def aclose(self) -> None:
        """Stop listening and close every connection pool."""
        await self.waiter.close()
        await self.redis.aclose()
        self.redis_sync.close()


def get_services(request: Request) -> Services:
    """The application's services."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


# Declared as security schemes, so the OpenAPI document says how to authenticate and
# the docs' Authorize button sends the key (either one is enough).
BEARER = HTTPBearer(
    auto_error=False, scheme_name="bearer", description="`Authorization: Bearer KEY`"
)
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="apiKey", description="`X-API-Key: KEY`"
)


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


async def authenticate(
    services: ServicesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
    header_key: Annotated[str | None, Security(API_KEY_HEADER)],
) -> Caller:
    """The caller presenting ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``: a key
    record (``ofa-entail keys``) or an ``OFA_API_KEYS`` entry. Unknown, wrong or revoked
    keys get 401."""
    given = (bearer.credentials.strip() if bearer else "") or (header_key or "").strip()
    if not given:
        raise HTTPException(401, "missing API key", headers={"WWW-Authenticate": "Bearer"})
    caller = services.key_cache.get(given) or _env_caller(services, given)
    if caller is None:
        caller = await services.apikeys.averify(given)
        if caller is None:
            raise HTTPException(
                401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"}
            )
    services.key_cache.put(given, caller)
    return caller


def _scoped(scope: Scope) -> Any:
    async def check(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
        if not caller.may(scope):
            raise HTTPException(
                403, f"this API key ({caller.name}) lacks the '{scope.value}' scope"
            )
        return caller

    return check


ReadDep = Annotated[Caller, Depends(_scoped(Scope.READ))]
JobsDep = Annotated[Caller, Depends(_scoped(Scope.JOBS))]
ScansDep = Annotated[Caller, Depends(_scoped(Scope.SCANS))]


async def charge(services: Services, caller: Caller, bucket: str, what: str) -> Decision | None:
    """Count one request against the caller's limit; ``RateLimitedError`` when over."""
    decision = await services.limiter.charge(caller, bucket)
    if decision is not None and not decision.admitted:
        raise RateLimitedError(decision, what)
    return decision
