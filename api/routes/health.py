"""Liveness, readiness and metrics."""

from __future__ import annotations

import time

import redis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import metrics
from api.deps import ServicesDep
from api.metrics import REGISTRY

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def get_healthz() -> dict[str, str]:
    """Always 200 while the process serves requests."""
    return {"status": "ok"}


READY_BODY = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not ready"]},
        "workers": {"type": "integer"},
        "problems": {"type": "array", "items": {"type": "string"}},
    },
}


@router.get(
    "/readyz",
    summary="Redis reachable and a worker serves the model",
    responses={
        200: {"content": {"application/json": {"schema": READY_BODY}}},
        503: {
            "description": "not ready, with the reasons",
            "content": {"application/json": {"schema": READY_BODY}},
        },
    },
)
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
    if not problems:
        _, age = await s.reaper_log.aread(s.redis.durable)
        limit = max(3 * s.settings.reaper_interval_s, 15.0)
        if age is None or age > limit:
            since = "ever" if age is None else f"for {age:.0f}s"
            problems.append(f"the reaper has not run {since}: overdue jobs are not re-sent")
    body = {
        "status": "ready" if not problems else "not ready",
        "workers": workers,
        "problems": problems,
    }
    return JSONResponse(body, status_code=200 if not problems else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def get_metrics(s: ServicesDep) -> Response:
    """Request counts, cache hits and misses, enqueued jobs, latency histograms; the
    backlog (pending, overdue, oldest) and the reaper's counters, read from Redis."""
    try:
        pending, overdue, oldest = await s.jobs.abacklog()
        counts, age = await s.reaper_log.aread(s.redis.durable)
        interactive, held = await s.jobs.aheld()
    except redis.RedisError:
        pass  # the process's own metrics still answer; the store's stay as last read
    else:
        metrics.JOBS_PENDING.set(pending)
        metrics.MODEL_WORK.labels(*s.settings.model_tag).set(pending)
        metrics.JOBS_OVERDUE.set(overdue)
        metrics.OLDEST_PENDING.set(time.time() - oldest if oldest else 0)
        metrics.REAPER_AGE.set(age if age is not None else -1)
        metrics.REAPER.values = counts
        metrics.INTERACTIVE_PENDING.set(interactive)
        for kind in ("interactive", "bulk"):
            metrics.HELD_BYTES.labels(kind).set(held.get(kind, 0))
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
