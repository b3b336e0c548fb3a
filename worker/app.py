"""The worker's Celery app: one thin task, and the signals that load the model.

Run it with ``ofa-entail worker`` (a threads pool: one process per device, many
threads waiting on the in-process batcher).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_init, worker_shutdown

from shared.celery_app import TASK_ENTAIL, make_celery
from shared.settings import get_settings
from worker import jobs
from worker.runtime import get_runtime, stop_runtime

logger = logging.getLogger(__name__)

app = make_celery()


@worker_init.connect
def _load_model(**_: Any) -> None:
    """Load the model once, in the worker process, before it consumes anything."""
    get_runtime()


@worker_shutdown.connect
def _unload(**_: Any) -> None:
    stop_runtime()


@app.task(name=TASK_ENTAIL, bind=True, acks_late=True)
def entail(
    self: Task,
    job_id: str,
    key: str,
    model: str,
    revision: str,
    text: str,
    premise: str | None = None,
    scan_id: str | None = None,
) -> None:
    """Score one queued job (the batcher groups concurrent ones)."""
    rt = get_runtime()
    if (model, revision) != rt.model_tag:
        # Not ours: back on the queue for a worker serving that model.
        raise Reject(f"this worker serves {rt.model_tag}, not {(model, revision)}", requeue=True)
    try:
        jobs.run_job(rt, job_id, key, text, premise, scan_id)
    except Exception as exc:
        retries = self.request.retries
        if retries >= get_settings().task_max_retries:
            logger.exception("job %s failed for good", job_id)
            jobs.fail(rt, job_id, key, f"gave up after {retries} retries: {exc}")
            return
        logger.warning("job %s: %s; retry %d", job_id, exc, retries + 1)
        raise self.retry(exc=exc, countdown=min(2**retries, 30)) from exc
