"""The worker's Celery app: two thin tasks, and the signals that load the model.

Run it with ``ofa-entail worker`` (one process per device). Celery's consumer takes
the interactive queue, whose messages run in groups (``worker/groups.py``); the bulk
queue has a consumer of its own (``worker/bulk.py``); both feed the in-process batcher.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import worker_init, worker_shutdown

from shared import wiring
from shared.settings import get_settings
from shared.wire import TASK_ENTAIL, TASK_ENTAIL_CHUNK, EntailChunk, EntailTask
from worker import jobs
from worker.broker import worker_celery
from worker.bulk import BulkConsumer
from worker.groups import InteractiveGroups
from worker.runtime import get_runtime, stop_runtime

logger = logging.getLogger(__name__)

settings = get_settings()
app = worker_celery(settings)  # kombu patched, Celery's consumer ours: worker/broker.py


@worker_init.connect
def _load_model(**_: Any) -> None:
    """Load the model once, in the worker process, before it consumes anything."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # Two INFO lines per task add up at hundreds of jobs/s; Flower shows every task.
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)
    get_runtime(settings, app)
    wiring.freeze_startup_objects()  # the model and torch out of every collection


@worker_shutdown.connect
def _unload(**_: Any) -> None:
    stop_runtime()


@app.task(
    name=TASK_ENTAIL, bind=True, acks_late=True, pydantic=True, Strategy="worker.groups:grouped"
)
def entail(self: Task, msg: EntailTask) -> str:
    """Score one queued job. Returns a one-line summary of the verdict: Celery's task
    events carry it, so Flower's task pages show each job's verdict (the job record
    stays the source of truth). Interactive messages are taken in groups instead
    (``worker/groups.py``: the strategy above); this body runs the jobs the reaper sends
    again to the bulk queue (``worker/bulk.py``)."""
    rt = get_runtime(settings, app)
    jobs.ensure_ours(rt, msg.model, msg.revision)
    return jobs.summary(jobs.run_job(rt, msg), msg.job_id)


@app.task(name=TASK_ENTAIL_CHUNK, bind=True, acks_late=True, pydantic=True)
def entail_chunk(self: Task, msg: EntailChunk) -> str:
    """Score a chunk of a scan's jobs (bulk queue, taken by ``worker/bulk.py``): one
    message for many rows, each row still its own job with its own outcome. Returns
    counts, which Flower shows."""
    rt = get_runtime(settings, app)
    jobs.ensure_ours(rt, msg.model, msg.revision)
    counts = jobs.run_chunk(rt, msg.items)
    return f"chunk of {len(msg.items)}: " + ", ".join(f"{k} {v}" for k, v in counts.items())


# The bulk queue has a consumer of its own: scan chunks never take the threads and
# prefetch slots interactive jobs use (worker/bulk.py). Interactive messages, taken by
# Celery's consumer, run in groups (worker/groups.py).
app.steps["consumer"].add(BulkConsumer)
app.steps["consumer"].add(InteractiveGroups)
