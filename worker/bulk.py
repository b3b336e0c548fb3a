"""The bulk queue's own consumer, beside Celery's: scan work never holds what
interactive jobs need.

Celery's consumer takes the interactive queue. When the bulk queue went through
Celery's threads pool as well, every scan chunk waiting for the batcher held one of its
threads and one of their prefetch slots, and a few scans' worth of small chunks took
them all: interactive messages then waited in the queue for a free thread (measured
with ``bench_scan``: every thread held by a chunk, interactive jobs ~250 ms late at
the median). So the bulk queue has this consumer instead, a Celery consumer step
with its own channel, prefetch and threads (``OFA_BULK_CHUNKS`` messages running at a
time, twice that many held: enough to keep the batcher fed, few enough that workers
share a scan's chunks). Like
an ``acks_late`` task, a message is acknowledged once its work is recorded; a worker
that dies leaves it to the visibility timeout, and its jobs to the reaper.

It sends the task events Celery would (received, started, then succeeded with the
task's summary as its result, failed or rejected), so Flower lists chunks, and scan
jobs the reaper sent again, like any task.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import Reject

from shared.settings import get_settings
from shared.wire import TASK_ENTAIL, TASK_ENTAIL_CHUNK, queue_name
from worker.broker import Message
from worker.consumer_step import ThreadedConsumerStep
from worker.events import dropped, handed_back, received_event, task_event

logger = logging.getLogger(__name__)

# Scan chunks, and scan jobs the reaper sent again on their own.
BULK_TASKS = frozenset({TASK_ENTAIL, TASK_ENTAIL_CHUNK})


class BulkConsumer(ThreadedConsumerStep):
    """Consumes the model's bulk queue into ``OFA_BULK_CHUNKS`` threads of its own
    (holding twice that many chunks, ``worker/consumer_step.py``: the next chunk is
    there when a thread finishes one)."""

    what = "scan chunks"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, get_settings().bulk_chunks, "bulk", **kwargs)

    def queue_name(self) -> str:
        """The model's bulk queue."""
        return queue_name(*self.settings.model_tag, bulk=True)

    def _received(self, body: Any, message: Message) -> None:
        """On the event loop: announce the task and hand it to a bulk thread."""
        headers = message.headers or {}
        task_id = str(headers.get("id", ""))
        received_event(self.c, headers)
        self._submit(self._run, body, message, task_id, str(headers.get("task")))

    def _run(self, body: Any, message: Message, task_id: str, name: str) -> None:
        start = time.monotonic()
        task_event(self.c, "task-started", task_id)
        try:
            if name not in BULK_TASKS:
                raise ValueError(f"the bulk queue carries no {name!r} tasks")
            args, kwargs, _ = body  # Celery's protocol 2: (args, kwargs, embed)
            # The registered task itself (worker/app.py), run in this thread: one
            # definition of what a message does, whichever consumer took it.
            result = self.c.app.tasks[name](*args, **kwargs)
        except Reject as exc:  # another model's work: back on the queue
            handed_back(self.c, message, task_id, bool(exc.requeue))
            return
        except Exception as exc:  # a message no handler can ever run: not retried
            logger.exception("bulk task %s[%s] failed", name, task_id)
            dropped(self.c, message, task_id, exc)
            return
        message.ack()
        task_event(
            self.c, "task-succeeded", task_id, result=result, runtime=time.monotonic() - start
        )
