"""Waiting for jobs without polling: one pub/sub subscription per API process.

Workers publish each finished job id on ``Keys.done_channel()``; requests that asked
to ``wait`` register a future here and read the job record once it resolves. The
record is checked after registering, so a job that finished just before is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
import redis.asyncio as aioredis

from shared.store import text_of

logger = logging.getLogger(__name__)


class JobWaiter:
    """Resolves futures for job ids announced on a Redis channel."""

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def _ensure_listening(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="job-waiter")

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel)
                async for message in pubsub.listen():
                    job_id = message["data"]
                    job_id = text_of(job_id)
                    for fut in self._waiting.pop(job_id, []):
                        if not fut.done():
                            fut.set_result(None)
            except asyncio.CancelledError:
                raise
            except redis.RedisError as exc:
                logger.warning("job notifications interrupted (%s); resubscribing", exc)
                await asyncio.sleep(1)

    def register(self, job_id: str) -> asyncio.Future[None]:
        """A future resolved when ``job_id`` is announced (register before checking)."""
        self._ensure_listening()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(fut)
        return fut

    def forget(self, job_id: str, fut: asyncio.Future[None]) -> None:
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
