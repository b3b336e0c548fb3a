"""Waiting for jobs without polling: one pub/sub subscription per API process.

Workers publish each finished job on ``Keys.done_channel()``, its final record after
its id, the jobs finished together in one message (``DoneChannel.announcements``; a
record is parsed only for a job somebody here waits for). Requests that asked to
``wait`` register a future here, resolved with that record (or None when only the id
came: then they read it). The record is checked after registering, so a job that
finished just before is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib

from shared.store import DoneChannel


class JobWaiter:
    """Resolves futures for job ids announced on the done channel."""

    def __init__(self, done: DoneChannel) -> None:
        self.done = done
        self._waiting: dict[str, list[asyncio.Future[dict[str, str] | None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def _ensure_listening(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="job-waiter")

    async def _listen(self) -> None:
        """Resolve the futures of every job announced (``DoneChannel.alisten`` keeps
        the subscription alive across a lost server)."""
        async for data in self.done.alisten():
            if not self._waiting:
                continue  # nobody here waits: nothing to look for
            for job_id, rest in DoneChannel.announcements(data):
                futures = self._waiting.pop(job_id, None)
                if not futures:  # nobody here waits for it: its record stays unread
                    continue
                record = DoneChannel.announced_record(rest)
                for fut in futures:
                    if not fut.done():
                        fut.set_result(record)

    def register(self, job_id: str) -> asyncio.Future[dict[str, str] | None]:
        """A future resolved when ``job_id`` is announced, with its final record when
        the announcement carried it (register before checking)."""
        self._ensure_listening()
        fut: asyncio.Future[dict[str, str] | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(fut)
        return fut

    def forget(self, job_id: str, fut: asyncio.Future[dict[str, str] | None]) -> None:
        """Drop a future whose request stopped waiting."""
        futures = self._waiting.get(job_id, [])
        with contextlib.suppress(ValueError):
            futures.remove(fut)
        if not futures:
            self._waiting.pop(job_id, None)

    async def close(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
