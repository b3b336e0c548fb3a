"""The FastAPI application: thin, no torch. ``create_app()`` builds it from settings."""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import docs, metrics, problems
from api.bodylimit import BodyLimitMiddleware, BodyLimits
from api.deps import Services
from api.routes import health, jobs, scans
from shared import tracing, wiring
from shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            latency, count = self._series(path, method, status)
            latency.observe(time.perf_counter() - start)
            count.inc()

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def _series(path: str, method: str, status: int) -> tuple[Any, Any]:
        """The latency and count series of one route, method and status (looked up once:
        ``labels()`` takes a lock and builds a key on every call)."""
        return metrics.LATENCY.labels(path, method), metrics.REQUESTS.labels(
            path, method, str(status)
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI application."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.build(settings)
        app.state.services = services
        wiring.freeze_startup_objects()
        if not settings.api_keys:
            logger.warning("no API keys configured (OFA_API_KEYS): every job request gets 401")
        yield
        await services.aclose()

    extra: dict[str, Any] = {}
    # One switch (OFA_OPENTELEMETRY) for FastAPI's instrumentation and the job's trace
    # (shared/tracing.py): its request span is the parent of the submission's.
    tracing.configure(settings, "ofa-entail-api")
    if "telemetry" in inspect.signature(FastAPI).parameters:
        if not settings.opentelemetry:
            extra["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
        elif tracing.provider() is not None:
            extra["telemetry"] = {"tracer_provider": tracing.provider()}
    app = FastAPI(
        **extra,
        title="ofa-entail",
        version="1.0",
        summary="Does this image support this sentence? Visual entailment with OFA.",
        lifespan=lifespan,
        docs_url=None,  # served below from vendored assets: no CDN, works offline
        redoc_url=None,
    )
    problems.install(app)
    docs.install(app)

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

    # Added first, so it runs inside the metrics middleware, which counts its refusals.
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits.of(settings))
    app.add_middleware(MetricsMiddleware)
    app.include_router(jobs.router)
    app.include_router(scans.router)
    app.include_router(health.router)
    return app
