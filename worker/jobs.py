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


def finish(rt: Runtime, job_id: str, key: str, verdict: dict[str, Any], cached: bool) -> None:
    """Write the verdict to the cache and the job record.

    The in-flight mark stays (as long as the job record) pointing at this finished job:
    a submit that raced past the cache lookup joins this job instead of starting another.
    """
    ttl = rt.settings.verdict_ttl_s
    rt.cache.set(rt.keys.verdict(key), json.dumps(verdict), ex=ttl)
    pipe = rt.durable.pipeline()
    pipe.hset(rt.keys.job(job_id), mapping=jobs.succeeded_fields(verdict, cached))
    pipe.expire(rt.keys.job(job_id), rt.settings.job_ttl_s)
    pipe.expire(rt.keys.inflight(key), rt.settings.job_ttl_s)
    pipe.delete(rt.keys.blob(key))
    pipe.execute()


def fail(rt: Runtime, job_id: str, key: str, error: str) -> None:
    """Mark the job failed for good; the next identical submission may try again."""
    pipe = rt.durable.pipeline()
    pipe.hset(rt.keys.job(job_id), mapping=jobs.failed_fields(error))
    pipe.expire(rt.keys.job(job_id), rt.settings.job_ttl_s)
    pipe.delete(rt.keys.inflight(key))
    pipe.delete(rt.keys.blob(key))
    pipe.execute()
    logger.info("job %s failed: %s", job_id, error)


def run_job(rt: Runtime, job_id: str, key: str, text: str, premise: str | None) -> dict[str, Any]:
    """Compute (or find) the verdict for one job and record it."""
    cached = rt.cache.get(rt.keys.verdict(key))
    if cached is not None:
        verdict = json.loads(cached)
        finish(rt, job_id, key, verdict, cached=True)
        return verdict
    rt.durable.hset(rt.keys.job(job_id), mapping=jobs.running_fields())
    blob = rt.durable.get(rt.keys.blob(key))
    if not isinstance(blob, bytes):
        fail(rt, job_id, key, "the image expired before a worker could take the job")
        return {}
    try:
        prepared = rt.entailer.prepare(blob, text, premise)
    except BadInputError as exc:
        fail(rt, job_id, key, f"{exc.title}: {exc.detail}")
        return {}
    result = rt.batcher.submit(prepared).result(timeout=rt.settings.task_soft_time_limit_s)
    model_id, revision = rt.model_tag
    verdict = {**result.to_dict(), "model": {"id": model_id, "revision": revision}, "key": key}
    finish(rt, job_id, key, verdict, cached=False)
    return verdict
