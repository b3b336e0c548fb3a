"""Reading jobs: the API's reads and load figures, the coordinator's outcomes and
verdict lookups, and the done channel every finish is announced on (one subscriber
class for the API's waiter and the scan coordinator)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.asyncio.client import PubSub as AsyncPubSub

from shared.keys import Keys
from shared.models import Job, JobStatus, Verdict
from shared.settings import Settings
from shared.store.clients import Clients, MissingClientError, Store
from shared.store.codec import bytes_of, decode_hash, text_of

logger = logging.getLogger(__name__)

# An asyncio subscription silent this long is probed with a PING, and given up (then
# made again, through Sentinel where configured) when the PING is not answered within
# as long.
QUIET_S = 5.0
RESUBSCRIBE_S = 0.5  # the pause before subscribing again after a failure


@dataclass(frozen=True)
class Read:
    """A job as one API key may see it: the job, who submitted it, and the id of the
    job that computes it (itself, or for a handle the job it follows)."""

    job: Job
    owner: str | None
    computed_by: str
    key: str | None = None  # the verdict key (what a cancel needs)


@dataclass(frozen=True)
class Collected:
    """A job's state as a scan coordinator collects it."""

    status: JobStatus | None  # None: the record is gone
    verdict: str | None
    error: str | None
    scan_id: str | None


class DoneSubscription:
    """A blocking subscription to the done channel (the scan coordinator's)."""

    def __init__(self, pubsub: redis.client.PubSub) -> None:
        self._pubsub = pubsub

    def take(self, wait: float = 0.0) -> dict[str, str]:
        """Job id -> the rest of its announcement (``DoneChannel.announcements``) for
        every job announced since the last call, waiting up to ``wait`` seconds for the
        first message. Raises ``redis.RedisError`` when the subscription is lost."""
        got: dict[str, str] = {}
        while (m := self._pubsub.get_message(timeout=wait)) is not None:
            got.update(DoneChannel.announcements(m["data"]))
            wait = 0.0
        return got

    def close(self) -> None:
        """Unsubscribe (never raises)."""
        with contextlib.suppress(redis.RedisError):
            self._pubsub.close()


class DoneChannel:
    """The channel every job's end is announced on (``finish.lua``, ``cancel.lua``):
    each message holds a line per job, the id, a space, and the final record as JSON
    (``announced_record``), or the id alone for a cancellation. The id comes first, so
    a listener waiting for other jobs, or wanting ids only, parses no JSON."""

    def __init__(self, channel: str, clients: Clients) -> None:
        self.channel = channel
        self.clients = clients

    @staticmethod
    def announcements(data: Any) -> list[tuple[str, str]]:
        """A message's announcements: (job id, the rest) for each job it names (the
        jobs one call finished come in one message); the rest is "" for a
        cancellation."""
        out = []
        for line in text_of(data).split("\n"):
            job_id, _, rest = line.partition(" ")
            out.append((job_id, rest))
        return out

    @staticmethod
    def announced_record(rest: str) -> dict[str, str] | None:
        """The record in the rest of an announcement, or None when there is none."""
        flat = json.loads(rest) if rest else None
        return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else None

    def subscribe(self) -> DoneSubscription:
        """A blocking subscription (raises ``redis.RedisError`` when Redis is down)."""
        if self.clients.blocking is None:
            raise MissingClientError("the done channel was built without blocking clients")
        pubsub = self.clients.blocking.durable.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        return DoneSubscription(pubsub)

    async def alisten(self) -> AsyncIterator[Any]:
        """Every message on the channel (its data, for ``announcements``), for as long
        as the caller iterates: a lost subscription is made again (with Sentinel, on
        the current primary) after ``RESUBSCRIBE_S``."""
        if self.clients.asyncio is None:
            raise MissingClientError("the done channel was built without asyncio clients")
        client = self.clients.asyncio.durable
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                async for data in self._relay(pubsub):
                    yield data
            except (redis.RedisError, OSError) as exc:
                logger.warning("job announcements interrupted (%s); resubscribing", exc)
                await asyncio.sleep(RESUBSCRIBE_S)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()

    @staticmethod
    async def _relay(pubsub: AsyncPubSub) -> AsyncIterator[Any]:
        """The messages' data on ``pubsub``, until it fails.

        A subscription waits without a deadline, so a primary whose host vanished
        (no reset, nothing to read) would hold it forever while the jobs finish on the
        promoted replica: after ``QUIET_S`` without a message it sends a PING, and a
        subscription that answers nothing for another ``QUIET_S`` is given up."""
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=QUIET_S / 2)
            now = loop.time()
            if message is None:
                if now - quiet_since < QUIET_S:
                    continue
                if pinged:
                    raise redis.ConnectionError(f"no answer to a PING in {QUIET_S} s")
                await pubsub.ping()
                pinged, quiet_since = True, now
                continue
            pinged, quiet_since = False, now
            if message.get("type") == "message":  # not a PONG
                yield message["data"]


class JobReads(Store):
    """Jobs as the API shows them, what load shedding and /metrics measure, what a
    scan's coordinator collects, and the done channel (``done``)."""

    def __init__(self, settings: Settings, keys: Keys, clients: Clients) -> None:
        super().__init__(settings, keys, clients)
        self.done = DoneChannel(keys.done_channel(), clients)

    # -- one job ---------------------------------------------------------------------

    def job_of(self, job_id: str, record: dict[str, str]) -> Job:
        """The job a record (as ``DoneChannel.announced_record`` gives it) describes."""
        return self._decode(job_id, record)

    def _decode(self, job_id: str, raw: dict[Any, Any]) -> Job:
        fields = decode_hash(raw)

        def num(name: str) -> float | None:
            value = fields.get(name)
            return float(value) if value else None

        verdict = fields.get("verdict")
        return Job(
            job_id=job_id,
            status=JobStatus(fields.get("status") or JobStatus.QUEUED),
            cached=fields.get("cached") == "1",
            created_at=num("created_at"),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            verdict=Verdict.model_validate_json(verdict) if verdict else None,
            error=fields.get("error"),
        )

    def get(self, job_id: str) -> Job | None:
        """The job (a handle shows the job it follows), or None when unknown or
        expired."""
        raw = decode_hash(self.sync.durable.hgetall(self.keys.job(job_id)))
        of = raw.get("handle_of") if "status" not in raw else None
        if of:
            followed = decode_hash(self.sync.durable.hgetall(self.keys.job(of)))
            raw = self._as_handle(raw, followed)
        return self._decode(job_id, raw) if raw else None

    async def aget(self, job_id: str) -> Job | None:
        """The job (a handle shows the job it follows), or None when unknown or
        expired."""
        got = await self.aread(job_id)
        return got.job if got is not None else None

    async def aread(self, job_id: str) -> Read | None:
        """The job as ``aget`` shows it, with its owner and the id of the job computing
        it (announced on the done channel when it ends); None when unknown or expired.
        One read, two for a handle whose job has not ended."""
        raw = decode_hash(await self.aio.durable.hgetall(self.keys.job(job_id)))
        if not raw:
            return None
        owner = raw.get("owner")
        of = raw.get("handle_of")
        if of and "status" not in raw:
            followed = decode_hash(await self.aio.durable.hgetall(self.keys.job(of)))
            raw = self._as_handle(raw, followed)
            if not raw:
                return None
        return Read(self._decode(job_id, raw), owner, of or job_id, raw.get("key"))

    @staticmethod
    def _as_handle(handle: dict[str, str], followed: dict[str, str]) -> dict[str, str]:
        """A handle's record shown with the state of the job it follows ({} when that
        job is gone): the handle's own creation time, the job's progress."""
        if not followed:
            return {}
        return {**followed, "created_at": handle.get("created_at", "")}

    def is_shared(self, job_id: str) -> bool:
        """True while another submission (interactive, or another scan) shares the job."""
        return int(self.sync.durable.hget(self.keys.job(job_id), "shared") or 0) > 0

    async def ain_flight(self, key: str) -> bool:
        """Whether a job computing ``key`` exists (a submission would join it)."""
        return bool(await self.aio.durable.exists(self.keys.inflight(key)))

    # -- verdicts --------------------------------------------------------------------

    async def acached(self, key: str) -> bytes | None:
        """The cached verdict's JSON for ``key``, if any."""
        return bytes_of(await self.aio.cache.get(self.keys.verdict(key)))

    def cached_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Cached verdicts' JSON for those of ``keys`` that have one (one MGET)."""
        if not keys:
            return {}
        values = self.sync.cache.mget([self.keys.verdict(k) for k in keys])
        found = {k: bytes_of(v) for k, v in zip(keys, values, strict=True)}
        return {k: v for k, v in found.items() if v is not None}

    # -- a scan's collection ---------------------------------------------------------

    def outcomes(self, job_ids: Iterable[str]) -> list[Collected]:
        """Each job's status, verdict, error and scan (one pipelined round trip)."""
        pipe = self.sync.durable.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), "status", "verdict", "error", "scan")
        fields = ("status", "verdict", "error", "scan")
        return [
            self.outcome_of({f: text_of(v) for f, v in zip(fields, got, strict=True) if v})
            for got in pipe.execute()
        ]

    @staticmethod
    def outcome_of(record: dict[str, str]) -> Collected:
        """What a scan collects of a job's record (as read, or as announced): an empty
        record is a job gone."""
        status = record.get("status")
        return Collected(
            JobStatus(status) if status else None,
            record.get("verdict"),
            record.get("error"),
            record.get("scan"),
        )

    # -- load and /metrics -----------------------------------------------------------

    async def aadmission(self) -> tuple[int, int]:
        """(unfinished interactive jobs, image bytes held for them): what load shedding
        measures. Scans' jobs are not counted: their own admission bounds them."""
        pipe = self.aio.durable.pipeline(transaction=False)
        pipe.zcard(self.keys.job_pending_interactive())
        pipe.hget(self.keys.held_bytes(), "interactive_bytes")
        pending, held = await pipe.execute()
        return int(pending), int(held or 0)

    async def aheld(self) -> tuple[int, dict[str, int]]:
        """(unfinished interactive jobs, image bytes held by class: ``interactive``,
        ``bulk``) for /metrics."""
        pipe = self.aio.durable.pipeline(transaction=False)
        pipe.zcard(self.keys.job_pending_interactive())
        pipe.hgetall(self.keys.held_bytes())
        pending, raw = await pipe.execute()
        held = {k.removesuffix("_bytes"): int(v) for k, v in decode_hash(raw).items()}
        return int(pending), held

    async def abacklog(self) -> tuple[int, int, float | None]:
        """(unfinished jobs, jobs past their deadline, creation time of the oldest)."""
        pipe = self.aio.durable.pipeline(transaction=False)
        pipe.zcard(self.keys.job_pending())
        pipe.zcount(self.keys.job_deadlines(), "-inf", time.time())
        pipe.zrange(self.keys.job_pending(), 0, 0, withscores=True)
        pending, overdue, oldest = await pipe.execute()
        return int(pending), int(overdue), float(oldest[0][1]) if oldest else None

    async def abatch_stats(self) -> dict[str, int]:
        """{"batches": n, "items": m, "busy_us": t}: model passes counted so far
        (``JobStore.record_batch``)."""
        raw = decode_hash(await self.aio.durable.hgetall(self.keys.batch_stats()))
        return {k: int(v) for k, v in raw.items()}
