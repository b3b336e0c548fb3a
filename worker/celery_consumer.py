"""The Celery consumer our workers run (``worker_consumer``): Celery's own, with task
events sent in batches on a short timer.

With an event loop Celery buffers task events (received, started, succeeded) and
flushes the buffer on the loop's next turn, which at a few hundred jobs/s means a
PUBLISH of one or two events per turn: about a tenth of a worker's CPU in the
profile. Here the first buffered event arms a timer and everything buffered in the
next ``EVENT_FLUSH_S`` goes out as one ``task.multi`` message, which Flower reads like
any other (Celery also flushes on its own whenever ``buffer_limit`` events wait).
Monitoring lags by at most that interval; job records are never delayed by it.
"""

from __future__ import annotations

import time

from celery.worker.consumer import Consumer as CeleryConsumer

EVENT_FLUSH_S = 0.05
# A timer armed longer ago than this is presumed lost (the loop was rebuilt after a
# reconnection) and is armed again.
LOST_AFTER_S = 1.0


class Consumer(CeleryConsumer):
    _flush_armed_at = 0.0

    def on_send_event_buffered(self) -> None:
        if self.hub is None:
            return
        now = time.monotonic()
        if now - self._flush_armed_at < LOST_AFTER_S:
            return  # a flush is already due
        self._flush_armed_at = now
        # Timers belong to the loop's thread; events also come from task threads.
        self.hub.call_soon(self._arm_event_flush)

    def _arm_event_flush(self) -> None:
        self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._flush_armed_at = 0.0
        self._flush_events()
