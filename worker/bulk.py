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
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from celery import bootsteps
from celery.exceptions import Reject
from kombu import Consumer, Message

from shared.celery_app import TASK_ENTAIL, TASK_ENTAIL_CHUNK, queue_name
from shared.settings import get_settings
from worker.events import dropped, handed_back, received_event, task_event

logger = logging.getLogger(__name__)

# Scan chunks, and scan jobs the reaper sent again on their own.
BULK_TASKS = frozenset({TASK_ENTAIL, TASK_ENTAIL_CHUNK})


class BulkConsumer(bootsteps.ConsumerStep):
    """Consumes the model's bulk queue into a few threads of its own."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.c = c
        self.settings = get_settings()
        # Twice as many messages held as threads run them: kombu asks for more only
        # when its event loop turns (a timer, or a reply or timeout of the interactive
        # queue's BRPOP), not when a thread acknowledges one, so with a prefetch equal
        # to the threads a thread that finished a chunk waited for the next. Measured
        # with ``bench_chunks``: the bulk threads idle ~40% of the time waiting for
        # work, the worker at 0.7 cores; held twice over, at 1.0 (HISTORY.md, item 32).
        # (Waking the loop after each acknowledgement instead cost more CPU a row.)
        self.prefetch = 2 * self.settings.bulk_chunks
        self.threads = ThreadPoolExecutor(self.settings.bulk_chunks, thread_name_prefix="bulk")
        self._taken: set[Future[None]] = set()  # chunks handed to the threads, not done
        self._lock = threading.Lock()

    def get_consumers(self, channel: Any) -> list[Consumer]:
        queue = self.c.app.amqp.queues.new_missing(queue_name(*self.settings.model_tag, bulk=True))
        channel.basic_qos(0, self.prefetch, False)
        return [
            Consumer(
                channel,
                queues=[queue],
                callbacks=[self._received],
                on_decode_error=self._undecodable,
                accept=["json"],
                prefetch_count=self.prefetch,
            )
        ]

    def stop(self, c: Any) -> None:
        """The consumer stops (a warm shutdown, or a reconnection): ``_settle``, then
        the channel closes."""
        self._settle()
        super().stop(c)

    def shutdown(self, c: Any) -> None:
        self._settle()
        self.threads.shutdown(wait=True)
        super().shutdown(c)

    def _settle(self) -> None:
        """Stop taking messages and let the chunks running finish (each acknowledged
        as it is recorded) before the channel closes. The chunks held but not started
        are not run: they stay unacknowledged, and kombu puts a channel's
        unacknowledged messages back on their queue when it closes, as they were, for
        another worker or this one after its restart. (Closing first, as Celery's
        consumer step does, would put the running chunks back too.)"""
        for consumer in self.consumers or []:
            try:
                consumer.cancel()
            except Exception as exc:  # a broken connection: nothing left to cancel
                logger.debug("cancelling the bulk consumer: %s", exc)
        with self._lock:
            taken = list(self._taken)
        running = [f for f in taken if not f.cancel()]
        if len(running) < len(taken):
            logger.info("%d held scan chunks go back to the queue", len(taken) - len(running))
        wait(running)

    @staticmethod
    def _undecodable(message: Message, exc: Exception) -> None:
        logger.error("dropped an undecodable message from the bulk queue: %s", exc)
        message.ack()

    def _received(self, body: Any, message: Message) -> None:
        """On the event loop: announce the task and hand it to a bulk thread."""
        headers = message.headers or {}
        task_id = str(headers.get("id", ""))
        received_event(self.c, headers)
        future = self.threads.submit(self._run, body, message, task_id, str(headers.get("task")))
        with self._lock:
            self._taken.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._taken.discard(future)

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
