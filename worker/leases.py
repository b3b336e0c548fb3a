"""The leases a worker holds on the jobs it is computing, renewed in one thread.

A job waiting in the batcher or in a forward pass is held here; every ``lease_s / 3``
one pipelined write extends the leases of everything held. A worker that dies stops
renewing, and the reaper sends its jobs again once their leases run out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator

import redis

from shared.store import JobStore

logger = logging.getLogger(__name__)


class Leases:
    """Jobs held by this process, and the thread that renews their leases."""

    def __init__(self, jobs: JobStore, lease_s: float) -> None:
        self.jobs = jobs
        self.every_s = lease_s / 3
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="leases", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def holding(self, *job_ids: str) -> Iterator[None]:
        """Keep the leases of ``job_ids`` alive while the block runs."""
        with self._lock:
            self._held.update(job_ids)
        try:
            yield
        finally:
            with self._lock:
                for job_id in job_ids:
                    self._held[job_id] -= 1
                    if self._held[job_id] <= 0:
                        del self._held[job_id]

    def held(self) -> list[str]:
        """The job ids held right now."""
        with self._lock:
            return list(self._held)

    def _renew(self) -> None:
        while not self._stop.wait(self.every_s):
            ids = self.held()
            try:
                self.jobs.renew(ids)
            except redis.RedisError as exc:
                logger.warning("could not renew %d leases: %s", len(ids), exc)

    def stop(self) -> None:
        """Stop renewing."""
        self._stop.set()
        self._thread.join(timeout=5)
