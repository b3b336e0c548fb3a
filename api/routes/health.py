"""Liveness, readiness and metrics."""

from __future__ import annotations

import logging
import time

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import metrics
from api.deps import Services, ServicesDep
from api.metrics import REGISTRY

logger = logging.getLogger(__name__)

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
        workers = await s.workers.acount()
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
        _, age = await s.reaper_log.aread()
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
    backlog (pending, overdue, oldest), workers alive, scans, the reaper's, the batches'
    and the webhooks' counters and the Redis servers' memory, read from Redis."""
    try:
        await _read_store(s)
    except redis.RedisError as exc:
        # The process's own metrics still answer; the store's stay as last read.
        logger.warning("metrics from the store not read: %s", exc)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def _read_store(s: Services) -> None:
    """Every value /metrics reads from the durable store (and the servers' memory)."""
    pending, overdue, oldest = await s.reads.abacklog()
    counts, age = await s.reaper_log.aread()
    interactive, held = await s.reads.aheld()
    workers = await s.workers.acount()
    unfinished, stalled, rows = await s.scans.aprogress()
    batches = await s.reads.abatch_stats()
    webhooks = await s.webhook_log.aread()
    metrics.JOBS_PENDING.set(pending)
    metrics.MODEL_WORK.labels(*s.settings.model_tag).set(pending)
    metrics.JOBS_OVERDUE.set(overdue)
    metrics.OLDEST_PENDING.set(time.time() - oldest if oldest else 0)
    metrics.REAPER_AGE.set(age if age is not None else -1)
    metrics.INTERACTIVE_PENDING.set(interactive)
    for kind in ("interactive", "bulk"):
        metrics.HELD_BYTES.labels(kind).set(held.get(kind, 0))
    metrics.WORKERS_ALIVE.labels(*s.settings.model_tag).set(workers)
    metrics.SCANS_UNFINISHED.set(unfinished)
    metrics.SCANS_OVERDUE.set(stalled)
    metrics.STORE.reaper, metrics.STORE.batches = counts, batches
    metrics.STORE.webhooks, metrics.STORE.scan_rows = webhooks, rows
    stores = {"durable": s.redis.durable}
    if s.redis.cache is not s.redis.durable:
        stores["cache"] = s.redis.cache
    for name, client in stores.items():
        used, cap = await redis_memory(client)
        metrics.REDIS_MEMORY_USED.labels(name).set(used)
        if cap is not None:
            metrics.REDIS_MEMORY_MAX.labels(name).set(cap)


async def redis_memory(client: aioredis.Redis) -> tuple[int, int | None]:
    """(bytes used, maxmemory or None when unknown) of the server ``client`` reaches.
    INFO is one of Redis's "dangerous" commands, which a deployed ACL user may lack:
    then MEMORY STATS (allowed) gives the bytes used, and the cap stays unknown."""
    try:
        info = await client.info("memory")
    except redis.exceptions.NoPermissionError:
        stats = await client.memory_stats()
        return int(stats["total.allocated"]), None
    return int(info["used_memory"]), int(info["maxmemory"])
