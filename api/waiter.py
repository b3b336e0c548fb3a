"""Waiting for jobs without polling: one pub/sub subscription per API process.

Workers publish each finished job on ``Keys.done_channel()``, its final record after
its id, the jobs finished together in one message (``JobStore.announcements``; a
record is parsed only for a job somebody here waits for). Requests that asked to
``wait`` register a future here, resolved with that record (or None when only the id
came: then they read it). The record is checked after registering, so a job that
finished just before is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from shared.store import JobStore

logger = logging.getLogger(__name__)

# A subscription silent this long is probed with a PING, and given up (then made again,
# through Sentinel where configured) when the PING is not answered within as long.
QUIET_S = 5.0
RESUBSCRIBE_S = 0.5  # the pause before subscribing again after a failure


class JobWaiter:
    """Resolves futures for job ids announced on a Redis channel."""

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._waiting: dict[str, list[asyncio.Future[dict[str, str] | None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def _ensure_listening(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="job-waiter")

    async def _listen(self) -> None:
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                await self._relay(pubsub)
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                # With Sentinel the next subscription asks for the current primary.
                logger.warning("job notifications interrupted (%s); resubscribing", exc)
                await asyncio.sleep(RESUBSCRIBE_S)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()

    async def _relay(self, pubsub: PubSub) -> None:
        """Resolve the futures of every job announced on ``pubsub``, until it fails.

        A subscription waits without a deadline, so a primary whose host vanished
        (no reset, nothing to read) would hold it forever while the jobs finish on the
        promoted replica: after ``QUIET_S`` without a message it sends a PING, and a
        subscription that answers nothing for another ``QUIET_S`` is given up."""
        quiet_since = asyncio.get_running_loop().time()
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=QUIET_S / 2)
            now = asyncio.get_running_loop().time()
            if message is None:
                if now - quiet_since < QUIET_S:
                    continue
                if pinged:
                    raise redis.ConnectionError(f"no answer to a PING in {QUIET_S} s")
                await pubsub.ping()
                pinged, quiet_since = True, now
                continue
            pinged, quiet_since = False, now
            if message.get("type") != "message" or not self._waiting:
                continue  # a PONG, or nobody here waits: nothing to look for
            for job_id, rest in JobStore.announcements(message["data"]):
                futures = self._waiting.pop(job_id, None)
                if not futures:  # nobody here waits for it: its record stays unread
                    continue
                record = JobStore.announced_record(rest)
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
