"""An in-process dynamic batcher, like Triton's dynamic batching or Ray Serve's
``@serve.batch``: callers hand in one item each and wait on a future; one thread
collects items until ``max_batch`` or until ``max_wait_s`` has passed since the
first, runs them together, and resolves every future. Items with a lower priority
number go first (interactive jobs before bulk scan jobs), and a batch that starts with
a priority-0 item takes no lower-priority ones: an interactive job never waits for a
batch to fill up with bulk work.

A batch already running cannot be interrupted, so while interactive work is about
(an item of priority 0 within the last ``URGENT_WINDOW_S``) a bulk batch is also cut
to what the model is estimated to finish within ``bulk_budget_s``: an interactive job
waits at most about that long for the bulk batch ahead of it. The estimate is a moving
average of the seconds per item of recent batches. On a GPU, where an item takes a
millisecond or two, bulk batches keep most of their size; on a CPU, where a full
batch can take hundreds of milliseconds, they shrink to a few items, and grow back to
``max_batch`` once interactive work stops (a nightly scan alone runs at full size).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
STOP = 2**31  # the stop sentinel's priority: after every real item
URGENT_WINDOW_S = 2.0  # interactive work is "about" this long after its last item
EMA_WEIGHT = 0.2  # the newest batch's share of the seconds-per-item estimate


class Batcher(Generic[T, R]):
    """Runs ``fn`` on batches of submitted items in one background thread."""

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        bulk_budget_s: float = 0.0,
    ) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.bulk_budget_s = bulk_budget_s  # 0: bulk batches are never cut
        self.per_item_s: float | None = None  # moving average over recent batches
        self._urgent_at = -URGENT_WINDOW_S  # monotonic time of the last priority-0 item
        # (priority, sequence, item, future); the sequence keeps equal priorities FIFO.
        self._queue: queue.PriorityQueue[tuple[int, int, T | None, Future[R] | None]] = (
            queue.PriorityQueue()
        )
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, item: T, priority: int = 0) -> Future[R]:
        """Queue one item; its result (or exception) arrives on the returned future."""
        fut: Future[R] = Future()
        if priority == 0:
            self._urgent_at = time.monotonic()
        self._queue.put((priority, next(self._seq), item, fut))
        return fut

    def bulk_limit(self) -> int:
        """How many items a batch of bulk work may take now: ``max_batch``, or fewer
        while interactive work is about (see the module's docstring)."""
        per_item = self.per_item_s
        if (
            not self.bulk_budget_s
            or per_item is None
            or time.monotonic() - self._urgent_at > URGENT_WINDOW_S
        ):
            return self.max_batch
        return max(1, min(self.max_batch, int(self.bulk_budget_s / max(per_item, 1e-9))))

    def close(self) -> None:
        """Finish the items already queued, then stop the thread."""
        self._queue.put((STOP, next(self._seq), None, None))
        self._thread.join(timeout=30)

    def _next(self, timeout: float | None) -> tuple[int, int, T | None, Future[R] | None]:
        """The next queue entry; raises ``queue.Empty`` on timeout."""
        if timeout is None:
            return self._queue.get()
        if timeout > 0:
            return self._queue.get(timeout=timeout)
        return self._queue.get_nowait()

    def _collect(
        self, first: tuple[int, int, T | None, Future[R] | None]
    ) -> tuple[list[tuple[T, Future[R]]], bool]:
        urgent = first[0] == 0
        assert first[2] is not None and first[3] is not None
        batch = [(first[2], first[3])]
        limit = self.max_batch if urgent else self.bulk_limit()
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < limit:
            try:
                entry = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            priority, _, item, fut = entry
            if fut is None:
                return batch, True
            if urgent and priority != 0:
                self._queue.put(entry)  # keeps its place: same priority and sequence
                break
            assert item is not None
            batch.append((item, fut))
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._next(None)
            if first[3] is None:
                break
            batch, stop = self._collect(first)
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = self.fn([item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch of {len(live)} gave {len(results)} results")
            except BaseException as exc:  # every waiter learns of the failure
                logger.exception("batch of %d failed", len(live))
                for _, fut in live:
                    fut.set_exception(exc)
                continue
            seconds = time.perf_counter() - start
            for (_, fut), result in zip(live, results, strict=True):
                fut.set_result(result)
            per_item = seconds / len(live)
            prev = self.per_item_s
            self.per_item_s = per_item if prev is None else prev + EMA_WEIGHT * (per_item - prev)
            if self.on_batch is not None:
                self.on_batch(len(live), seconds)
