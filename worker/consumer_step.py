"""A Celery consumer step that takes one queue into threads of its own, beside the
process's Celery consumer: the GPU worker's bulk queue (``worker/bulk.py``) and the
coordinator's webhook queue (``worker/scans/webhooks.py``).

It holds twice as many messages as it has threads: kombu asks for more only when its
event loop turns (a timer, or a reply or timeout of the other queue's BRPOP), not when
a thread acknowledges one, so with a prefetch equal to the threads a thread that
finished its work waited for the next. Measured with ``bench_chunks``: the bulk
threads idle ~40% of the time waiting for work, the worker at 0.7 cores; held twice
over, at 1.0.

Stopping cancels the consumer, lets the work running finish (each message
acknowledged as its work is recorded) and only then lets the channel close: the
messages held but not started stay unacknowledged, and kombu puts a channel's
unacknowledged messages back on their queue when it closes, as they were, for another
process or this one after its restart. (Closing first, as Celery's consumer step does,
would put the running ones back too.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from celery import bootsteps

from shared.settings import get_settings
from worker.broker import Consumer, Message

logger = logging.getLogger(__name__)


class ThreadedConsumerStep(bootsteps.ConsumerStep):
    """Consumes ``queue_name()`` on this step's own channel into ``threads`` threads;
    a subclass says which queue, and what ``_received`` does with a message."""

    what = "messages"  # for the logs: what the queue carries

    def __init__(self, c: Any, threads: int, thread_name: str, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.c = c
        self.settings = get_settings()
        self.prefetch = 2 * threads  # twice as many held as run (the module says why)
        self.threads = ThreadPoolExecutor(threads, thread_name_prefix=thread_name)
        self._taken: set[Future[None]] = set()  # handed to the threads, not done
        self._lock = threading.Lock()

    def queue_name(self) -> str:
        """The queue this step consumes."""
        raise NotImplementedError

    def _on_channel(self, channel: Any) -> None:
        """A (re)started channel, before consuming on it (nothing by default)."""

    def get_consumers(self, channel: Any) -> list[Consumer]:
        """One kombu consumer of the queue on this step's own channel."""
        queue = self.c.app.amqp.queues.new_missing(self.queue_name())
        self._on_channel(channel)
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
        """The process ends: the work running finishes first."""
        self._settle()
        self.threads.shutdown(wait=True)
        super().shutdown(c)

    def _settle(self) -> None:
        """Stop taking messages and let the work running finish before the channel
        closes; what is held but not started goes back to the queue with it."""
        for consumer in self.consumers or []:
            try:
                consumer.cancel()
            except Exception as exc:  # a broken connection: nothing left to cancel
                logger.debug("cancelling the consumer of %s: %s", self.queue_name(), exc)
        with self._lock:
            taken = list(self._taken)
        running = [f for f in taken if not f.cancel()]
        if len(running) < len(taken):
            logger.info("%d held %s go back to the queue", len(taken) - len(running), self.what)
        wait(running)

    def _undecodable(self, message: Message, exc: Exception) -> None:
        logger.error("dropped an undecodable message from %s: %s", self.queue_name(), exc)
        message.ack()

    def _received(self, body: Any, message: Message) -> None:
        """On the event loop: a message arrived."""
        raise NotImplementedError

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on one of this step's threads, tracked until it ends."""
        future = self.threads.submit(fn, *args)
        with self._lock:
            self._taken.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._taken.discard(future)
