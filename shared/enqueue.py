"""Creating a job, or joining the one already computing the same key.

One implementation for the API (through its thread pool) and the scan coordinator.
Nothing is left behind when the broker refuses the task.
"""

from __future__ import annotations

import logging
import uuid

import redis
from celery import Celery

from shared import jobs
from shared.celery_app import TASK_ENTAIL, queue_name
from shared.errors import QueueUnavailableError
from shared.keys import Keys
from shared.settings import Settings

logger = logging.getLogger(__name__)

_DELETE_IF_EQUAL = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


def enqueue_job(
    durable: redis.Redis,
    celery: Celery,
    keys: Keys,
    settings: Settings,
    key: str,
    image: bytes,
    text: str,
    premise: str | None,
    scan_id: str | None = None,
) -> tuple[str, bool]:
    """Join the job computing ``key`` or create one; returns (job id, created).

    Interactive jobs go to the model's interactive queue, scan jobs (``scan_id``) to
    its bulk queue.
    """
    model_id, revision = settings.model_tag
    job_id = uuid.uuid4().hex
    inflight = keys.inflight(key)
    for _ in range(3):
        if durable.set(inflight, job_id, nx=True, ex=settings.job_ttl_s):
            break
        existing = durable.get(inflight)
        if existing:
            other = existing.decode() if isinstance(existing, bytes) else str(existing)
            if durable.exists(keys.job(other)):
                return other, False
            # The mark outlived its job record: drop it (only if unchanged) and retry.
            durable.eval(_DELETE_IF_EQUAL, 1, inflight, other)
    else:
        raise QueueUnavailableError("could not register the job; try again")

    job_key, blob_key = keys.job(job_id), keys.blob(key)
    record = jobs.new_record(key, model_id, revision, text, premise)
    if scan_id:
        record["scan"] = scan_id
    try:
        pipe = durable.pipeline(transaction=True)
        pipe.set(blob_key, image, ex=settings.blob_ttl_s)
        pipe.hset(job_key, mapping=record)
        pipe.expire(job_key, settings.job_ttl_s)
        pipe.execute()
        celery.send_task(
            TASK_ENTAIL,
            kwargs={
                "job_id": job_id,
                "key": key,
                "model": model_id,
                "revision": revision,
                "text": text,
                "premise": premise,
                "scan_id": scan_id,
            },
            task_id=job_id,
            queue=queue_name(model_id, revision, bulk=scan_id is not None),
            retry=False,
        )
    except Exception as exc:
        try:
            durable.delete(job_key, blob_key, inflight)
        except redis.RedisError:
            logger.exception("could not clean up after a failed enqueue")
        raise QueueUnavailableError(f"the job queue is unavailable ({type(exc).__name__})") from exc
    return job_id, True
