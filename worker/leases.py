"""The leases a worker holds on the jobs it is working on, renewed in one thread.

A job is held from the moment ``JobStore.start`` gives it a lease until it is recorded
(or put back), whatever step it is in: waiting for the bulk preparation slot, its
image being decoded, waiting in the batcher, in a forward pass. Every ``lease_s / 3``
one pipelined write extends the leases of everything held. A worker that dies stops
renewing, and the reaper sends its jobs again once their leases run out.

A hold older than the task's hard time limit is let go (with a warning): no step of
a job's work lasts that long unless its thread is stuck, and its message comes back
after the visibility timeout anyway, so the job is left to the reaper as a dead
worker's would be, rather than renewed for ever by a thread that will never finish it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import redis

from shared.store import JobStore

logger = logging.getLogger(__name__)


class Holding:
    """The jobs one piece of work holds (``Leases.hold``): their leases are renewed
    until ``release`` (or the end of a ``with`` block), or ``drop`` for those of them
    that ended early."""

    def __init__(self, leases: Leases, job_ids: Iterable[str]) -> None:
        self.leases = leases
        self.ids: Counter[str] = Counter(job_ids)
        self.taken = time.monotonic()

    def drop(self, job_ids: Iterable[str]) -> None:
        """Stop renewing ``job_ids`` (they ended, or went back to queued)."""
        with self.leases._lock:
            for job_id in job_ids:
                if self.ids[job_id] > 0:
                    self.ids[job_id] -= 1
                if self.ids[job_id] <= 0:
                    del self.ids[job_id]

    def keep_only(self, job_ids: Iterable[str]) -> None:
        """Stop renewing every job but ``job_ids``."""
        keep = set(job_ids)
        self.drop([job_id for job_id in self.held() if job_id not in keep])

    def held(self) -> list[str]:
        """The job ids this holding renews."""
        with self.leases._lock:
            return list(self.ids)

    def release(self) -> None:
        """Stop renewing all of them (idempotent)."""
        with self.leases._lock:
            self.leases._holdings.discard(self)
            self.ids.clear()

    @contextlib.contextmanager
    def on_error(self) -> Iterator[None]:
        """Release the holding if the block raises (the work will not go on)."""
        try:
            yield
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> Holding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Leases:
    """Jobs held by this process, and the thread that renews their leases."""

    def __init__(self, jobs: JobStore, lease_s: float, max_hold_s: float | None = None) -> None:
        self.jobs = jobs
        self.every_s = lease_s / 3
        self.max_hold_s = jobs.settings.task_time_limit_s if max_hold_s is None else max_hold_s
        self._holdings: set[Holding] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="leases", daemon=True)
        self._thread.start()

    def hold(self, job_ids: Iterable[str]) -> Holding:
        """Keep the leases of ``job_ids`` alive from now until the holding is released."""
        holding = Holding(self, job_ids)
        with self._lock:
            self._holdings.add(holding)
        return holding

    @contextlib.contextmanager
    def holding(self, *job_ids: str) -> Iterator[Holding]:
        """Keep the leases of ``job_ids`` alive while the block runs."""
        with self.hold(job_ids) as held:
            yield held

    def held(self) -> list[str]:
        """The job ids held right now."""
        with self._lock:
            return list({job_id for h in self._holdings for job_id in h.ids})

    def _current(self) -> list[str]:
        """The ids to renew; holdings past ``max_hold_s`` are let go."""
        now = time.monotonic()
        with self._lock:
            stale = [h for h in self._holdings if now - h.taken > self.max_hold_s]
            for h in stale:
                self._holdings.discard(h)
            ids = list({job_id for h in self._holdings for job_id in h.ids})
        for h in stale:
            logger.warning(
                "let go of %d leases held over %.0fs (a stuck thread?): the reaper takes them",
                len(h.ids),
                self.max_hold_s,
            )
        return ids

    def _renew(self) -> None:
        while not self._stop.wait(self.every_s):
            ids = self._current()
            try:
                self.jobs.renew(ids)
            except redis.RedisError as exc:
                logger.warning("could not renew %d leases: %s", len(ids), exc)

    def stop(self) -> None:
        """Stop renewing."""
        self._stop.set()
        self._thread.join(timeout=5)
