"""FastAPI dependencies, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

import redis
import redis.asyncio as aioredis
from celery import Celery
from fastapi import Depends, HTTPException, Request

from api.waiter import JobWaiter
from shared.fetch import UrlPolicy
from shared.keys import Keys
from shared.settings import Settings


@dataclass
class Services:
    """What the routes use, built once at start-up (see ``api/app.py``)."""

    settings: Settings
    durable: aioredis.Redis
    durable_sync: redis.Redis  # for work done in the thread pool (enqueueing)
    cache: aioredis.Redis
    keys: Keys
    celery: Celery
    url_policy: UrlPolicy
    waiter: JobWaiter


def get_services(request: Request) -> Services:
    """The application's services."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_api_key(request: Request, services: ServicesDep) -> None:
    """Accept ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` matching a configured key."""
    keys = services.settings.api_keys
    if not keys:
        raise HTTPException(401, "no API keys are configured on the server (OFA_API_KEYS)")
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    given = given or request.headers.get("x-api-key", "")
    if not given or not any(
        hmac.compare_digest(given.encode(), k.get_secret_value().encode()) for k in keys
    ):
        raise HTTPException(
            401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )


AuthDep = Annotated[None, Depends(require_api_key)]
