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
waits at most about that long for the bulk batch ahead of it. The estimate is a line,
a batch of n items taking ``a + b * n`` seconds, fitted to recent batches of every
size (``BatchCost``): a batch's fixed cost (on a GPU, kernel launches and copies,
often most of a small batch's time) is not charged to every item, so the interactive
batches of one that run meanwhile do not make bulk items look dearer than they are.
On a GPU, bulk batches keep most of their size; on a CPU, where a full batch can take
hundreds of milliseconds, they shrink to a few items, and grow back to ``max_batch``
once interactive work stops (a nightly scan alone runs at full size).
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
EMA_WEIGHT = 0.1  # the newest batch's share of the cost estimate


class BatchCost:
    """Seconds for a batch of n items, ``a + b * n``, fitted by least squares to recent
    batches with exponentially decaying weights (each batch's weight ``EMA_WEIGHT``).
    While every recent batch had about the same size the line's slope is unknown, and
    the estimate is proportional (``a`` = 0, ``b`` = seconds per item), as it is when
    noise makes larger batches look cheaper."""

    def __init__(self) -> None:
        self._w = self._n = self._t = self._nn = self._nt = 0.0  # weighted sums

    def add(self, n: int, seconds: float) -> None:
        keep = 1.0 - EMA_WEIGHT
        self._w = keep * self._w + EMA_WEIGHT
        self._n = keep * self._n + EMA_WEIGHT * n
        self._t = keep * self._t + EMA_WEIGHT * seconds
        self._nn = keep * self._nn + EMA_WEIGHT * n * n
        self._nt = keep * self._nt + EMA_WEIGHT * n * seconds

    def line(self) -> tuple[float, float] | None:
        """(a, b), or None before the first batch."""
        if not self._w:
            return None
        n, t = self._n / self._w, self._t / self._w
        var = self._nn / self._w - n * n
        cov = self._nt / self._w - n * t
        if var > 0.25 and cov > 0:  # sizes that differ by about an item or more
            b = cov / var
            return max(0.0, t - b * n), b
        return 0.0, t / max(n, 1e-9)

    def items_within(self, seconds: float) -> int | None:
        """The most items a batch can hold and finish within ``seconds`` (at least 1),
        or None before the first batch."""
        got = self.line()
        if got is None:
            return None
        a, b = got
        return max(1, int((seconds - a) / max(b, 1e-9) + 1e-6))  # 9.99999... is 10


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
        self.cost = BatchCost()
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
        return self.submit_many([item], priority)[0]

    def submit_many(self, items: Sequence[T], priority: int = 0) -> list[Future[R]]:
        """``submit`` for several items at once (a group's, a chunk's): queued under one
        lock with one wake-up of the batcher's thread, not one each."""
        if not items:
            return []
        futures: list[Future[R]] = [Future() for _ in items]
        if priority == 0:
            self._urgent_at = time.monotonic()
        q = self._queue
        with q.mutex:  # what Queue.put does, once for all of them
            for item, fut in zip(items, futures, strict=True):
                q._put((priority, next(self._seq), item, fut))
            q.unfinished_tasks += len(items)
            q.not_empty.notify()
        return futures

    def bulk_limit(self) -> int:
        """How many items a batch of bulk work may take now: ``max_batch``, or fewer
        while interactive work is about (see the module's docstring)."""
        if not self.bulk_budget_s or time.monotonic() - self._urgent_at > URGENT_WINDOW_S:
            return self.max_batch
        fits = self.cost.items_within(self.bulk_budget_s)
        return self.max_batch if fits is None else min(self.max_batch, fits)

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
            self.cost.add(len(live), seconds)
            if self.on_batch is not None:
                self.on_batch(len(live), seconds)
