"""The owners of every record the service keeps in Redis.

``JobStore`` owns a job's record, its image blob, its in-flight mark and the verdict
cache; ``ScanStore`` owns a scan's record and its coordinator lock; ``WorkerRegistry``
owns the workers' heartbeats. Each knows its keys (through ``Keys``), how its fields
are encoded, its lifetimes and every state change; nothing else reads or writes those
keys. Blocking methods serve the workers, the coordinator and the API's thread pool;
the ``a``-prefixed ones serve the API's event loop.

Who writes what, in order (see docs/ARCHITECTURE.md):
job: ``create_or_join`` (API or coordinator) -> ``start`` -> ``succeed`` | ``fail`` (worker);
scan: ``create`` (API) -> ``start`` -> ``publish_counts``* -> ``finish`` (coordinator),
or ``acancel`` (API) at any point before the end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from shared.errors import QueueUnavailableError
from shared.keys import Keys
from shared.messages import (
    Job,
    JobStatus,
    ScanCounts,
    ScanStatus,
    ScanSummary,
    Verdict,
)
from shared.settings import Settings
from shared.wiring import AsyncRedis, SyncRedis


def text_of(value: Any) -> str:
    """A Redis value (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    """A Redis hash (bytes or str keys and values) as str -> str."""
    return {text_of(k): text_of(v) for k, v in raw.items()}


def bytes_of(value: Any) -> bytes | None:
    """A Redis value (bytes, str or None) as bytes or None."""
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()


def now() -> str:
    """A timestamp as records store it."""
    return f"{time.time():.6f}"


_DELETE_IF_EQUAL = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)

# Once a scan's coordinator has copied a job's outcome into the scan's results file,
# the job record and its in-flight mark linger this long (for anything that joined the
# job), then go: the durable store holds the scan's window, not its manifest.
SCAN_JOB_LINGER_S = 60


@dataclass(frozen=True)
class Outcome:
    """A job's state as a scan coordinator collects it."""

    status: JobStatus | None  # None: the record is gone
    verdict: str | None
    error: str | None
    scan_id: str | None


class JobStore:
    """Jobs, their image blobs and in-flight marks (durable), and verdicts (cache)."""

    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        sync: SyncRedis | None = None,
        aio: AsyncRedis | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self._sync = sync
        self._aio = aio

    @property
    def sync(self) -> SyncRedis:
        assert self._sync is not None, "this JobStore was built without blocking clients"
        return self._sync

    @property
    def aio(self) -> AsyncRedis:
        assert self._aio is not None, "this JobStore was built without asyncio clients"
        return self._aio

    # -- creation --------------------------------------------------------------------

    def create_or_join(
        self, key: str, image: bytes, text: str, premise: str | None, scan_id: str | None = None
    ) -> tuple[str, bool]:
        """Join the job computing ``key``, or store a new queued job (record and image
        blob); returns (job id, created). A mark that outlived its job is replaced."""
        durable, ttl = self.sync.durable, self.settings.job_ttl_s
        job_id = uuid.uuid4().hex
        inflight = self.keys.inflight(key)
        for _ in range(3):
            if durable.set(inflight, job_id, nx=True, ex=ttl):
                break
            existing = durable.get(inflight)
            if existing:
                other = text_of(existing)
                if durable.exists(self.keys.job(other)):
                    return other, False
                durable.eval(_DELETE_IF_EQUAL, 1, inflight, other)
        else:
            raise QueueUnavailableError("could not register the job; try again")
        model_id, revision = self.settings.model_tag
        record: dict[str, str] = {
            "status": JobStatus.QUEUED,
            "key": key,
            "model": model_id,
            "revision": revision,
            "text": text,
            "created_at": now(),
        }
        if premise is not None:
            record["premise"] = premise
        if scan_id:
            record["scan"] = scan_id
        try:
            pipe = durable.pipeline(transaction=True)
            pipe.set(self.keys.blob(key), image, ex=self.settings.blob_ttl_s)
            pipe.hset(self.keys.job(job_id), mapping=record)  # type: ignore[arg-type]
            pipe.expire(self.keys.job(job_id), ttl)
            pipe.execute()
        except redis.RedisError:
            self.discard(job_id, key)
            raise
        return job_id, True

    def discard(self, job_id: str, key: str) -> None:
        """Remove a job that was never sent (its record, blob and mark)."""
        self.sync.durable.delete(
            self.keys.job(job_id), self.keys.blob(key), self.keys.inflight(key)
        )

    # -- the worker's transitions ----------------------------------------------------

    def start(self, job_id: str, key: str) -> tuple[bytes | None, bytes | None]:
        """Mark the job running; returns (cached verdict JSON, image blob). When the
        verdict is cached the blob is not read (the job finishes from the cache)."""
        r = self.sync
        running = {"status": JobStatus.RUNNING, "started_at": now()}
        if r.cache is r.durable:
            pipe = r.durable.pipeline()
            pipe.get(self.keys.verdict(key))
            pipe.get(self.keys.blob(key))
            pipe.hset(self.keys.job(job_id), mapping=running)  # type: ignore[arg-type]
            cached, blob, _ = pipe.execute()
            return bytes_of(cached), None if cached is not None else bytes_of(blob)
        cached = bytes_of(r.cache.get(self.keys.verdict(key)))
        if cached is not None:
            return cached, None
        pipe = r.durable.pipeline()
        pipe.get(self.keys.blob(key))
        pipe.hset(self.keys.job(job_id), mapping=running)  # type: ignore[arg-type]
        blob, _ = pipe.execute()
        return None, bytes_of(blob)

    def succeed(self, job_id: str, key: str, verdict: Verdict | bytes, cached: bool) -> None:
        """Cache the verdict and finish the job. The in-flight mark stays (as long as
        the record) pointing at this finished job: a submit that raced past the cache
        lookup joins it instead of starting another."""
        doc = verdict if isinstance(verdict, bytes) else verdict.model_dump_json().encode()
        fields = {
            "status": JobStatus.SUCCEEDED,
            "verdict": doc,
            "cached": "1" if cached else "0",
            "finished_at": now(),
        }
        r = self.sync
        if r.cache is r.durable:
            self._finish(job_id, key, fields, keep_mark=True, verdict=doc)
        else:
            # The verdict first: a job never reads as succeeded before it is cached.
            r.cache.set(self.keys.verdict(key), doc, ex=self.settings.verdict_ttl_s)
            self._finish(job_id, key, fields, keep_mark=True)

    def fail(self, job_id: str, key: str, error: str) -> None:
        """Fail the job for good; the next identical submission starts afresh."""
        fields = {"status": JobStatus.FAILED, "error": error, "finished_at": now()}
        self._finish(job_id, key, fields, keep_mark=False)

    def _finish(
        self,
        job_id: str,
        key: str,
        fields: dict[str, Any],
        keep_mark: bool,
        verdict: bytes | None = None,
    ) -> None:
        """Final fields, the blob gone, waiting API requests told; one round trip."""
        ttl = self.settings.job_ttl_s
        pipe = self.sync.durable.pipeline()
        if verdict is not None:
            pipe.set(self.keys.verdict(key), verdict, ex=self.settings.verdict_ttl_s)
        pipe.hset(self.keys.job(job_id), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(self.keys.job(job_id), ttl)
        if keep_mark:
            pipe.expire(self.keys.inflight(key), ttl)
        else:
            pipe.delete(self.keys.inflight(key))
        pipe.delete(self.keys.blob(key))
        pipe.publish(self.keys.done_channel(), job_id)
        pipe.execute()

    # -- reading ---------------------------------------------------------------------

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
        """The job, or None when unknown or expired."""
        raw = self.sync.durable.hgetall(self.keys.job(job_id))
        return self._decode(job_id, raw) if raw else None

    async def aget(self, job_id: str) -> Job | None:
        """The job, or None when unknown or expired."""
        raw = await self.aio.durable.hgetall(self.keys.job(job_id))
        return self._decode(job_id, raw) if raw else None

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

    def outcomes(self, job_ids: Iterable[str]) -> list[Outcome]:
        """Each job's status, verdict, error and scan (one pipelined round trip)."""
        pipe = self.sync.durable.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), "status", "verdict", "error", "scan")
        out = []
        for status, verdict, error, scan in pipe.execute():
            out.append(
                Outcome(
                    JobStatus(text_of(status)) if status is not None else None,
                    text_of(verdict) if verdict is not None else None,
                    text_of(error) if error is not None else None,
                    text_of(scan) if scan is not None else None,
                )
            )
        return out

    def linger(self, finished: Iterable[tuple[str, str]]) -> None:
        """(key, job id) pairs whose outcome a scan has copied: expire them soon."""
        pipe = self.sync.durable.pipeline(transaction=False)
        for key, job_id in finished:
            pipe.expire(self.keys.job(job_id), SCAN_JOB_LINGER_S)
            pipe.expire(self.keys.inflight(key), SCAN_JOB_LINGER_S)
        pipe.execute()

    def record_batch(self, size: int) -> None:
        """Count one model pass of ``size`` items (tests and benchmarks read it)."""
        pipe = self.sync.durable.pipeline(transaction=False)
        pipe.hincrby(self.keys.batch_stats(), "batches", 1)
        pipe.hincrby(self.keys.batch_stats(), "items", size)
        pipe.execute()

    def batch_stats(self) -> dict[str, int]:
        """{"batches": n, "items": m} counted so far."""
        raw = decode_hash(self.sync.durable.hgetall(self.keys.batch_stats()))
        return {k: int(v) for k, v in raw.items()}


class ScanStore:
    """Scan records (progress counters, status, callback state) and coordinator locks."""

    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        durable: redis.Redis | None = None,
        adurable: aioredis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self._durable = durable
        self._adurable = adurable

    @property
    def durable(self) -> redis.Redis:
        assert self._durable is not None, "this ScanStore was built without a blocking client"
        return self._durable

    @property
    def adurable(self) -> aioredis.Redis:
        assert self._adurable is not None, "this ScanStore was built without an asyncio client"
        return self._adurable

    # -- the API's side --------------------------------------------------------------

    def create(self, scan_id: str, total: int, manifest: str, callback_url: str | None) -> None:
        """A queued scan of ``total`` rows read from ``manifest``."""
        record: dict[str, str] = {
            "status": ScanStatus.QUEUED,
            "created_at": now(),
            "total": str(total),
            "manifest": manifest,
            **{name: "0" for name in ScanCounts.model_fields},
        }
        if callback_url:
            record["callback_url"] = callback_url
        key = self.keys.scan(scan_id)
        pipe = self.durable.pipeline(transaction=True)
        pipe.hset(key, mapping=record)  # type: ignore[arg-type]
        pipe.expire(key, self.settings.scan_ttl_s)
        pipe.execute()

    def discard(self, scan_id: str) -> None:
        """Remove a scan whose coordinator task could not be sent."""
        self.durable.delete(self.keys.scan(scan_id))

    async def asummary(self, scan_id: str) -> ScanSummary | None:
        """The scan's progress, or None when unknown or expired."""
        raw = await self.adurable.hgetall(self.keys.scan(scan_id))
        return summarize(scan_id, decode_hash(raw)) if raw else None

    async def acancel(self, scan_id: str) -> ScanSummary | None:
        """Cancel a queued or running scan (finished ones are left as they are)."""
        summary = await self.asummary(scan_id)
        if summary is not None and not summary.status.finished:
            await self.adurable.hset(
                self.keys.scan(scan_id),
                mapping={"status": ScanStatus.CANCELLED, "cancelled_at": now()},
            )
            summary.status = ScanStatus.CANCELLED
        return summary

    # -- the coordinator's side ------------------------------------------------------

    def get(self, scan_id: str) -> dict[str, str]:
        """The raw record ({} when unknown or expired)."""
        return decode_hash(self.durable.hgetall(self.keys.scan(scan_id)))

    def summary(self, scan_id: str) -> ScanSummary | None:
        """The scan's progress, or None when unknown or expired."""
        raw = self.get(scan_id)
        return summarize(scan_id, raw) if raw else None

    def status(self, scan_id: str) -> ScanStatus | None:
        """The scan's status alone."""
        value = self.durable.hget(self.keys.scan(scan_id), "status")
        return ScanStatus(text_of(value)) if value is not None else None

    def exists(self, scan_id: str) -> bool:
        """True while the scan's record lives."""
        return bool(self.durable.exists(self.keys.scan(scan_id)))

    def start(self, scan_id: str) -> None:
        """queued -> running."""
        self.durable.hset(
            self.keys.scan(scan_id), mapping={"status": ScanStatus.RUNNING, "started_at": now()}
        )

    def set_total(self, scan_id: str, total: int) -> None:
        """The manifest turned out shorter than counted."""
        self.durable.hset(self.keys.scan(scan_id), "total", str(total))

    @staticmethod
    def _count_fields(counts: ScanCounts, finished: bool) -> dict[str, str]:
        fields = {k: str(v) for k, v in counts.model_dump().items()}
        if finished:
            fields["finished_at"] = now()
        return fields

    def publish_counts(self, scan_id: str, counts: ScanCounts, finished: bool = False) -> None:
        """Progress counters from the results file (and the end time, when finished)."""
        fields = self._count_fields(counts, finished)
        self.durable.hset(self.keys.scan(scan_id), mapping=fields)  # type: ignore[arg-type]

    def finish(self, scan_id: str, counts: ScanCounts) -> None:
        """running -> succeeded, with the final counts."""
        fields = {**self._count_fields(counts, True), "status": ScanStatus.SUCCEEDED}
        pipe = self.durable.pipeline(transaction=True)
        pipe.hset(self.keys.scan(scan_id), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(self.keys.scan(scan_id), self.settings.scan_ttl_s)
        pipe.execute()

    def callback_delivered(self, scan_id: str) -> None:
        """The completion callback was accepted."""
        self.durable.hset(self.keys.scan(scan_id), "callback_delivered_at", now())

    def callback_failed(self, scan_id: str, error: str) -> None:
        """The completion callback failed for good."""
        self.durable.hset(self.keys.scan(scan_id), "callback_error", error)

    def lock(self, scan_id: str, ttl_s: int) -> str | None:
        """Take the scan's coordinator lock; returns its token, or None if held."""
        token = uuid.uuid4().hex
        ok = self.durable.set(self.keys.scan_lock(scan_id), token, nx=True, ex=ttl_s)
        return token if ok else None

    def renew_lock(self, scan_id: str, ttl_s: int) -> None:
        """Extend a lock this coordinator holds."""
        self.durable.expire(self.keys.scan_lock(scan_id), ttl_s)

    def unlock(self, scan_id: str, token: str) -> None:
        """Release the lock if it is still ours."""
        self.durable.eval(_DELETE_IF_EQUAL, 1, self.keys.scan_lock(scan_id), token)


def summarize(scan_id: str, raw: dict[str, str]) -> ScanSummary:
    """A decoded scan record as the API and callbacks report it: counts, rate
    (finished rows per second since the start) and ETA."""
    counts = {name: int(raw.get(name, 0)) for name in (*ScanCounts.model_fields, "total")}
    times = {
        name: float(raw[name]) if raw.get(name) else None
        for name in ("created_at", "started_at", "finished_at")
    }
    started = times["started_at"]
    end = times["finished_at"] or time.time()
    finished_rows = counts["done"] + counts["failed"]
    rate = finished_rows / (end - started) if started and end > started else 0.0
    remaining = counts["total"] - finished_rows
    eta = round(remaining / rate, 1) if rate > 0 and remaining > 0 else None
    if remaining <= 0:
        eta = 0.0
    return ScanSummary(
        scan_id=scan_id,
        status=ScanStatus(raw.get("status", ScanStatus.QUEUED)),
        **counts,
        **times,
        rate_rows_per_s=round(rate, 3),
        eta_s=eta,
        callback_url=raw.get("callback_url") or None,
        error=raw.get("error") or None,
    )


class WorkerRegistry:
    """Workers announce the model they serve; the API's readiness check counts them."""

    FRESH_S = 30.0

    def __init__(self, keys: Keys, model_tag: tuple[str, str]) -> None:
        self.key = keys.workers(*model_tag)

    def beat(self, durable: redis.Redis, name: str, interval_s: float) -> None:
        """Announce ``name``; forget workers silent for six intervals."""
        now_s = time.time()
        pipe = durable.pipeline()
        pipe.zadd(self.key, {name: now_s})
        pipe.zremrangebyscore(self.key, 0, now_s - 6 * interval_s)
        pipe.expire(self.key, int(10 * interval_s))
        pipe.execute()

    def withdraw(self, durable: redis.Redis, name: str) -> None:
        """A worker stopping cleanly leaves the set at once."""
        durable.zrem(self.key, name)

    async def acount(self, adurable: aioredis.Redis) -> int:
        """Workers heard from in the last ``FRESH_S`` seconds."""
        return int(await adurable.zcount(self.key, time.time() - self.FRESH_S, "+inf"))

    def members(self, durable: redis.Redis, within_s: float) -> list[str]:
        """Names of workers heard from in the last ``within_s`` seconds."""
        return [text_of(m) for m in durable.zrangebyscore(self.key, time.time() - within_s, "+inf")]
