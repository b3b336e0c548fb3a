"""Running one job: the domain logic behind the Celery task.

Redelivered jobs (a worker died, the message came back) find the verdict in the
cache and finish without computing again. Input the model can never accept fails the
job at once; anything else propagates for the task to retry.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from shared import jobs
from shared.errors import BadInputError
from worker.runtime import Runtime

logger = logging.getLogger(__name__)


class JobGone(Exception):
    """The job record expired or never existed: nothing to do."""


def _record(
    rt: Runtime,
    job_id: str,
    key: str,
    fields: dict[Any, Any],
    keep_mark: bool,
    verdict: str | None = None,
) -> None:
    """Write the job's final fields (and the verdict, when the cache is the same server),
    tidy up, and tell waiting API requests; one round trip."""
    ttl = rt.settings.job_ttl_s
    pipe = rt.durable.pipeline()
    if verdict is not None:
        pipe.set(rt.keys.verdict(key), verdict, ex=rt.settings.verdict_ttl_s)
    pipe.hset(rt.keys.job(job_id), mapping=fields)
    pipe.expire(rt.keys.job(job_id), ttl)
    if keep_mark:
        pipe.expire(rt.keys.inflight(key), ttl)
    else:
        pipe.delete(rt.keys.inflight(key))
    pipe.delete(rt.keys.blob(key))
    pipe.publish(rt.keys.done_channel(), job_id)
    pipe.execute()


def finish(rt: Runtime, job_id: str, key: str, verdict: dict[str, Any], cached: bool) -> None:
    """Write the verdict to the cache and the job record.

    The in-flight mark stays (as long as the job record) pointing at this finished job:
    a submit that raced past the cache lookup joins this job instead of starting another.
    """
    doc = json.dumps(verdict)
    fields = jobs.succeeded_fields(verdict, cached)
    if rt.cache is rt.durable:
        _record(rt, job_id, key, fields, keep_mark=True, verdict=doc)
    else:
        # The verdict first: a job never reads as succeeded before its verdict is cached.
        rt.cache.set(rt.keys.verdict(key), doc, ex=rt.settings.verdict_ttl_s)
        _record(rt, job_id, key, fields, keep_mark=True)


def fail(rt: Runtime, job_id: str, key: str, error: str) -> None:
    """Mark the job failed for good; the next identical submission may try again."""
    _record(rt, job_id, key, jobs.failed_fields(error), keep_mark=False)
    logger.info("job %s failed: %s", job_id, error)


def run_job(
    rt: Runtime,
    job_id: str,
    key: str,
    text: str,
    premise: str | None,
    scan_id: str | None = None,
) -> dict[str, Any]:
    """Compute (or find) the verdict for one job and record it. Scan jobs (``scan_id``)
    yield to interactive ones in the batcher and are dropped when their scan is cancelled."""
    if scan_id and rt.durable.hget(rt.keys.scan(scan_id), "status") in (b"cancelled",):
        fail(rt, job_id, key, "scan cancelled")
        return {}
    if rt.cache is rt.durable:
        pipe = rt.durable.pipeline()
        pipe.get(rt.keys.verdict(key))
        pipe.get(rt.keys.blob(key))
        pipe.hset(rt.keys.job(job_id), mapping=jobs.running_fields())
        cached, blob, _ = pipe.execute()
    else:
        cached, blob = rt.cache.get(rt.keys.verdict(key)), None
        if cached is None:
            rt.durable.hset(rt.keys.job(job_id), mapping=jobs.running_fields())
    if cached is not None:
        verdict = json.loads(cached)
        finish(rt, job_id, key, verdict, cached=True)
        return verdict
    if blob is None:
        blob = rt.durable.get(rt.keys.blob(key))
    if not isinstance(blob, bytes):
        fail(rt, job_id, key, "the image expired before a worker could take the job")
        return {}
    try:
        prepared = rt.entailer.prepare(blob, text, premise)
    except BadInputError as exc:
        fail(rt, job_id, key, f"{exc.title}: {exc.detail}")
        return {}
    priority = 1 if scan_id else 0
    result = rt.batcher.submit(prepared, priority).result(
        timeout=rt.settings.task_soft_time_limit_s
    )
    model_id, revision = rt.model_tag
    verdict = {**result.to_dict(), "model": {"id": model_id, "revision": revision}, "key": key}
    finish(rt, job_id, key, verdict, cached=False)
    return verdict
