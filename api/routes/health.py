"""Liveness, readiness and metrics."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ServicesDep
from api.metrics import REGISTRY

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def get_healthz() -> dict[str, str]:
    """Always 200 while the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", summary="Redis reachable and a worker serves the model")
async def get_readyz(s: ServicesDep) -> Response:
    """200 when both stores answer and at least one worker for the configured model
    sent a heartbeat in the last 30 seconds; otherwise 503 with the reasons."""
    problems = []
    workers = 0
    try:
        await s.redis.durable.ping()
        workers = await s.workers.acount(s.redis.durable)
    except redis.RedisError as exc:
        problems.append(f"durable Redis: {exc}")
    if s.redis.cache is not s.redis.durable:
        try:
            await s.redis.cache.ping()
        except redis.RedisError as exc:
            problems.append(f"cache Redis: {exc}")
    if not problems and workers == 0:
        model_id, revision = s.settings.model_tag
        problems.append(f"no worker is serving {model_id}@{revision}")
    body = {
        "status": "ready" if not problems else "not ready",
        "workers": workers,
        "problems": problems,
    }
    return JSONResponse(body, status_code=200 if not problems else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def get_metrics() -> Response:
    """Request counts, cache hits and misses, enqueued jobs, latency histograms."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
