"""FastAPI dependencies, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.waiter import JobWaiter
from shared import wiring
from shared.fetch import UrlPolicy
from shared.settings import Settings
from shared.store import JobStore, ReaperLog, ScanStore, WorkerRegistry


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


def require_api_key(
    services: ServicesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
    header_key: Annotated[str | None, Security(API_KEY_HEADER)],
) -> None:
    """Accept ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` matching a configured key."""
    keys = services.settings.api_keys
    if not keys:
        raise HTTPException(401, "no API keys are configured on the server (OFA_API_KEYS)")
    given = (bearer.credentials.strip() if bearer else "") or (header_key or "")
    if not given or not any(
        hmac.compare_digest(given.encode(), k.get_secret_value().encode()) for k in keys
    ):
        raise HTTPException(
            401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )


AuthDep = Annotated[None, Depends(require_api_key)]
