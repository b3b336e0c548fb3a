"""The FastAPI application: thin, no torch. ``create_app()`` builds it from settings."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics, problems
from api.deps import Services
from api.routes import health, jobs, scans
from api.waiter import JobWaiter
from shared.celery_app import make_celery
from shared.embedded import redis_urls
from shared.fetch import UrlPolicy
from shared.keys import Keys
from shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)


class MetricsMiddleware:
    """Request count and latency per route (plain ASGI: no per-request task or copy)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            metrics.LATENCY.labels(path, method).observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(path, method, str(status)).inc()


def build_services(settings: Settings) -> Services:
    """Redis clients, the Celery app and the URL policy."""
    durable_url, cache_url = redis_urls(settings)
    durable = aioredis.Redis.from_url(
        durable_url, socket_connect_timeout=3, socket_timeout=10, health_check_interval=30
    )
    cache = (
        durable
        if cache_url == durable_url
        else aioredis.Redis.from_url(cache_url, socket_connect_timeout=3, socket_timeout=10)
    )
    policy = UrlPolicy(
        timeout_s=settings.url_timeout_s,
        max_redirects=settings.url_max_redirects,
        max_bytes=settings.max_upload_bytes,
        allow_hosts=tuple(settings.url_allow_hosts),
    )
    keys = Keys(settings.key_prefix)
    waiter = JobWaiter(durable, keys.done_channel())
    durable_sync = redis.Redis.from_url(
        durable_url, socket_connect_timeout=3, socket_timeout=10, health_check_interval=30
    )
    return Services(
        settings, durable, durable_sync, cache, keys, make_celery(settings), policy, waiter
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI application."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings)
        app.state.services = services
        if not settings.api_keys:
            logger.warning("no API keys configured (OFA_API_KEYS): every job request gets 401")
        yield
        await services.waiter.close()
        await services.durable.aclose()
        services.durable_sync.close()
        if services.cache is not services.durable:
            await services.cache.aclose()

    app = FastAPI(
        title="ofa-entail",
        version="1.0",
        summary="Does this image support this sentence? Visual entailment with OFA.",
        lifespan=lifespan,
    )
    problems.install(app)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> Response:
        logger.warning("Redis error on %s: %s", request.url.path, exc)
        return problems.problem(
            503,
            "Service unavailable",
            f"Redis is unavailable ({type(exc).__name__})",
            "unavailable",
            headers={"Retry-After": "5"},
        )

    app.add_middleware(MetricsMiddleware)
    app.include_router(jobs.router)
    app.include_router(scans.router)
    app.include_router(health.router)
    return app
