"""An in-process dynamic batcher, like Triton's dynamic batching or Ray Serve's
``@serve.batch``: callers hand in one item each and wait on a future; one thread
collects items until ``max_batch`` or until ``max_wait_s`` has passed since the
first, runs them together, and resolves every future. Items with a lower priority
number go first (interactive jobs before bulk scan jobs).
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


class Batcher(Generic[T, R]):
    """Runs ``fn`` on batches of submitted items in one background thread."""

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
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
        self._queue.put((priority, next(self._seq), item, fut))
        return fut

    def close(self) -> None:
        """Finish the items already queued, then stop the thread."""
        self._queue.put((STOP, next(self._seq), None, None))
        self._thread.join(timeout=30)

    def _next(self, timeout: float | None) -> tuple[T, Future[R]] | None:
        """The next item (None: the stop sentinel); raises ``queue.Empty`` on timeout."""
        if timeout is None:
            _, _, item, fut = self._queue.get()
        elif timeout > 0:
            _, _, item, fut = self._queue.get(timeout=timeout)
        else:
            _, _, item, fut = self._queue.get_nowait()
        if fut is None:
            return None
        assert item is not None
        return item, fut

    def _collect(self, first: tuple[T, Future[R]]) -> tuple[list[tuple[T, Future[R]]], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                nxt = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._next(None)
            if first is None:
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
            for (_, fut), result in zip(live, results, strict=True):
                fut.set_result(result)
            if self.on_batch is not None:
                self.on_batch(len(live), time.perf_counter() - start)
