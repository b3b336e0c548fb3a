"""Scan records, their coordinator lock and their deadlines."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from shared.errors import ScanLimitError, ScansBusyError
from shared.models import ChangeCounts, ScanCounts, ScanStatus, ScanSummary
from shared.store.clients import Store
from shared.store.codec import decode_hash, now, text_of
from shared.store.durability import confirm_on_disk, wait_on_disk
from shared.store.scripts import Batch, Script

_ADMIT_SCAN = Script("admit_scan")
_KEEP_SCAN = Script("keep_scan")
_DELETE_IF_EQUAL = Script("delete_if_equal")

# How long an Idempotency-Key is remembered: a day, so a nightly job's retries (and a
# rerun the same day) find the scan their first try started.
IDEMPOTENCY_TTL_S = 24 * 3600


class ScanStore(Store):
    """Scan records (progress counters, status, callback state) and coordinator locks."""

    @property
    def durable(self) -> redis.Redis:
        """The blocking durable client."""
        return self.sync.durable

    @property
    def adurable(self) -> aioredis.Redis:
        """The asyncio durable client."""
        return self.aio.durable

    # -- the API's side --------------------------------------------------------------

    def create(
        self,
        scan_id: str,
        total: int,
        manifest: str,
        callback_url: str | None,
        owner: str = "",
        stored_bytes: int = 0,
        catalogue: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        """A queued scan of ``total`` rows read from ``manifest``, started by ``owner``
        (the API key's id) with ``stored_bytes`` of manifest kept for it, of ``owner``'s
        ``catalogue`` when named; ``extra``: more fields of the record (an object
        manifest's ETag, the results' URL). The scan caps are checked in the same atomic
        step (``ScanLimitError``, ``ScansBusyError``)."""
        record: dict[str, str] = {
            "status": ScanStatus.QUEUED,
            "created_at": now(),
            "total": str(total),
            "manifest": manifest,
            **{name: "0" for name in ScanCounts.model_fields},
        }
        if callback_url:
            record["callback_url"] = callback_url
        if catalogue:
            record["catalogue"] = catalogue
        record.update(extra or {})
        if owner:
            record["owner"] = owner
            record["stored_bytes"] = str(stored_bytes)
        key = self.keys.scan(scan_id)
        fields = [x for pair in record.items() for x in pair]
        # One connection, in order (no MULTI: WAITAOF must follow the writes, not sit
        # inside a transaction): the record is on disk before the API answers 202.
        batch = Batch(self.durable)
        batch.script(
            _ADMIT_SCAN,
            [key, self.keys.scan_deadlines(), self.keys.scans_of(owner or "-")],
            [
                *self._admit_args(owner, stored_bytes, "create"),
                scan_id,
                self.settings.scan_ttl_s,
                self._deadline(queued=True),
                *fields,
            ],
        )
        waits = wait_on_disk(batch, self.settings)
        replies = batch.execute()
        if isinstance(replies[0], Exception):
            raise replies[0]
        self._admitted(replies[0], owner)
        if waits:
            confirm_on_disk(
                replies[-1],
                lambda: self.discard(scan_id),
                "scan",
                self.settings.durable_ack_replicas,
            )

    async def aadmit(self, owner: str) -> None:
        """Refuse a new scan before its manifest is read when ``owner`` (an API key's
        id) or the service is at a scan cap (``create`` checks again, atomically)."""
        reply = await _ADMIT_SCAN.acall(
            self.adurable,
            [self.keys.scan("-"), self.keys.scan_deadlines(), self.keys.scans_of(owner or "-")],
            self._admit_args(owner, 0, "check"),
        )
        self._admitted(reply, owner)

    def _admit_args(self, owner: str, stored_bytes: int, mode: str) -> list[str | int]:
        s = self.settings
        return [
            mode,
            s.max_active_scans,
            s.max_scans_per_key if owner else 0,
            s.max_scan_bytes_per_key if owner else 0,
            stored_bytes,
            self.keys.scan(""),
        ]

    def _admitted(self, reply: list[object], owner: str) -> None:
        verdict, count = text_of(reply[0]), int(reply[1])  # type: ignore[call-overload]
        s = self.settings
        if verdict == "busy":
            raise ScansBusyError(count, s.max_active_scans)
        if verdict == "key-scans":
            raise ScanLimitError(
                f"this API key has {count} scans unfinished (the limit is "
                f"{s.max_scans_per_key}): wait for one to end, or cancel one"
            )
        if verdict == "key-bytes":
            raise ScanLimitError(
                f"this API key's scans keep {count} bytes of manifests (the limit is "
                f"{s.max_scan_bytes_per_key}); they are freed as its scans expire "
                f"(OFA_SCAN_TTL_S)",
                retry_after_s=3600,
            )

    def discard(self, scan_id: str) -> None:
        """Remove a scan whose coordinator task could not be sent."""
        pipe = self.durable.pipeline()
        pipe.delete(self.keys.scan(scan_id))
        pipe.zrem(self.keys.scan_deadlines(), scan_id)
        pipe.execute()

    def _deadline(self, queued: bool) -> float:
        """When a scan nobody is working on is taken up again by the reaper: a queued
        slice message has the dispatch deadline; a running slice renews a lease."""
        s = self.settings
        return time.time() + (s.dispatch_deadline_s if queued else 2 * s.scan_slice_s + s.lease_s)

    def hold(self, scan_id: str, queued: bool = False) -> None:
        """A coordinator is working on the scan (or has just queued its next slice)."""
        self.durable.zadd(self.keys.scan_deadlines(), {scan_id: self._deadline(queued)}, xx=True)

    def overdue(self, limit: int = 100) -> list[str]:
        """Scans not yet finalised whose coordinator has gone quiet, most overdue first."""
        ids = self.durable.zrangebyscore(
            self.keys.scan_deadlines(), "-inf", time.time(), start=0, num=limit
        )
        return [text_of(i) for i in ids]

    def slice_failed(self, scan_id: str) -> int:
        """Count a slice that crashed; returns the failures in a row."""
        return int(self.durable.hincrby(self.keys.scan(scan_id), "slice_failures", 1))

    def slice_ok(self, scan_id: str) -> None:
        """A slice ran to its end: the failure count starts again."""
        self.durable.hset(self.keys.scan(scan_id), "slice_failures", "0")

    async def aprogress(self, limit: int = 200) -> tuple[int, int, dict[str, int]]:
        """For /metrics: (scans not yet finalised, those whose coordinator has gone
        quiet, finished rows (done + failed) of each unfinished scan, the ``limit`` most
        urgent ones). Reads only."""
        pipe = self.adurable.pipeline(transaction=False)
        pipe.zcard(self.keys.scan_deadlines())
        pipe.zcount(self.keys.scan_deadlines(), "-inf", time.time())
        pipe.zrange(self.keys.scan_deadlines(), 0, limit - 1)
        unfinished, overdue, ids = await pipe.execute()
        names = [text_of(i) for i in ids]
        pipe = self.adurable.pipeline(transaction=False)
        for scan_id in names:
            pipe.hmget(self.keys.scan(scan_id), "done", "failed")
        rows = {
            scan_id: int(done or 0) + int(failed or 0)
            for scan_id, (done, failed) in zip(names, await pipe.execute(), strict=True)
        }
        return int(unfinished), int(overdue), rows

    async def aread(self, scan_id: str) -> tuple[ScanSummary, str | None] | None:
        """The scan's progress and its owner (the API key that started it), or None
        when unknown or expired."""
        raw = decode_hash(await self.adurable.hgetall(self.keys.scan(scan_id)))
        return (summarize(scan_id, raw), raw.get("owner")) if raw else None

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
        """The manifest turned out shorter than counted, or (an object manifest, whose
        rows are not counted before the scan) was read to its end."""
        mapping = {"total": str(total), "total_known": "1"}
        self.durable.hset(self.keys.scan(scan_id), mapping=mapping)  # type: ignore[arg-type]

    def results_written(self, scan_id: str, error: str | None = None) -> None:
        """The outcome of writing the scan's results to its ``results_url``."""
        fields = {"results_written": "0" if error else "1", "results_error": error or ""}
        self.durable.hset(self.keys.scan(scan_id), mapping=fields)  # type: ignore[arg-type]

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

    def finish(
        self,
        scan_id: str,
        counts: ScanCounts,
        status: ScanStatus = ScanStatus.SUCCEEDED,
        error: str | None = None,
        catalogue: Catalogued | None = None,
    ) -> None:
        """The end: succeeded, cancelled (kept) or failed, with the final counts; the
        scan leaves the reaper's index. A succeeded scan of a catalogue (``catalogue``:
        its changes, counted first) becomes, in the same transaction, the baseline of
        the catalogue's next scan."""
        fields = {**self._count_fields(counts, True), "status": status}
        if error:
            fields["error"] = error
        if catalogue is not None and catalogue.baseline_scan:
            fields["baseline_scan"] = catalogue.baseline_scan
        if catalogue is not None and catalogue.changes is not None:
            fields["changes"] = catalogue.changes.model_dump_json()
        pipe = self.durable.pipeline(transaction=True)
        pipe.hset(self.keys.scan(scan_id), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(self.keys.scan(scan_id), self.settings.scan_ttl_s)
        pipe.zrem(self.keys.scan_deadlines(), scan_id)
        if catalogue is not None and status == ScanStatus.SUCCEEDED:
            name = self.keys.catalogue(catalogue.owner, catalogue.name)
            pipe.hset(name, mapping={"scan": scan_id, "finished_at": fields["finished_at"]})
            pipe.expire(name, self.settings.scan_ttl_s)
        pipe.execute()

    def baseline(self, owner: str, catalogue: str) -> str | None:
        """The catalogue's last succeeded scan (None: none yet, or it expired)."""
        got = self.durable.hget(self.keys.catalogue(owner, catalogue), "scan")
        return text_of(got) if got is not None else None

    # -- Idempotency-Key ---------------------------------------------------------------

    async def areserve(self, owner: str, key: str, digest: str) -> tuple[str, str] | None:
        """Reserve ``owner``'s idempotency ``key`` for a request whose body has
        ``digest``, for ``IDEMPOTENCY_TTL_S``: None when this request won it; otherwise
        what the key holds, (body digest, scan id or "" while its winner is creating)."""
        name = self.keys.idempotency(owner, _key_digest(key))
        ok = await self.adurable.set(name, f"{digest} ", nx=True, ex=IDEMPOTENCY_TTL_S)
        if ok:
            return None
        held = await self.adurable.get(name)
        if held is None:  # expired between the two calls: try once more
            ok = await self.adurable.set(name, f"{digest} ", nx=True, ex=IDEMPOTENCY_TTL_S)
            if ok:
                return None
            held = await self.adurable.get(name) or b" "
        got, _, scan_id = text_of(held).partition(" ")
        return got, scan_id

    async def arecord(self, owner: str, key: str, digest: str, scan_id: str) -> None:
        """The reserved key's request created ``scan_id``: what its replays answer."""
        name = self.keys.idempotency(owner, _key_digest(key))
        await self.adurable.set(name, f"{digest} {scan_id}", xx=True, keepttl=True)

    async def arelease(self, owner: str, key: str, digest: str, scan_id: str = "") -> None:
        """The key is free again: its reserving request created nothing (or the
        ``scan_id`` it names is gone). Left alone if it has come to hold anything else."""
        name = self.keys.idempotency(owner, _key_digest(key))
        await _DELETE_IF_EQUAL.acall(self.adurable, [name], [f"{digest} {scan_id}"])

    async def aheld(self, owner: str, key: str) -> bool:
        """Whether ``owner``'s idempotency ``key`` is reserved or names a scan."""
        return bool(await self.adurable.exists(self.keys.idempotency(owner, _key_digest(key))))

    def forget(self, scan_id: str) -> None:
        """Drop a vanished scan from the reaper's index."""
        self.durable.zrem(self.keys.scan_deadlines(), scan_id)

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

    def keep(self, scan_id: str, token: str, ttl_s: float) -> bool:
        """Extend the scan's lock (while ``token`` still holds it) by ``ttl_s`` and its
        deadline as a running slice's, in one step; False when the lock is no longer
        this coordinator's."""
        reply = _KEEP_SCAN(
            self.durable,
            [self.keys.scan_lock(scan_id), self.keys.scan_deadlines()],
            [token, max(1, int(ttl_s * 1000)), scan_id, self._deadline(queued=False)],
        )
        return bool(reply)

    def holds(self, scan_id: str, token: str) -> bool:
        """Whether ``token`` still holds the scan's lock."""
        return text_of(self.durable.get(self.keys.scan_lock(scan_id)) or b"") == token

    def unlock(self, scan_id: str, token: str) -> None:
        """Release the lock if it is still ours."""
        _DELETE_IF_EQUAL(self.durable, [self.keys.scan_lock(scan_id)], [token])


@dataclass(frozen=True)
class Catalogued:
    """A catalogue scan's end: its owner's catalogue, the baseline it was compared with
    and the changes (None: nothing to compare with)."""

    owner: str
    name: str
    baseline_scan: str | None = None
    changes: ChangeCounts | None = None


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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
    total_known = raw.get("total_known") != "0"
    if not total_known:  # an object manifest still being read: the rows so far
        counts["total"] = max(counts["total"], counts["read"])
    finished_rows = counts["done"] + counts["failed"]
    rate = finished_rows / (end - started) if started and end > started else 0.0
    remaining = counts["total"] - finished_rows
    eta = round(remaining / rate, 1) if rate > 0 and remaining > 0 else None
    if remaining <= 0:
        eta = 0.0
    if not total_known:
        eta = None
    written = raw.get("results_written")
    return ScanSummary(
        scan_id=scan_id,
        status=ScanStatus(raw.get("status", ScanStatus.QUEUED)),
        **counts,
        **times,
        rate_rows_per_s=round(rate, 3),
        eta_s=eta,
        callback_url=raw.get("callback_url") or None,
        error=raw.get("error") or None,
        catalogue=raw.get("catalogue") or None,
        baseline_scan=raw.get("baseline_scan") or None,
        changes=ChangeCounts.model_validate_json(raw["changes"]) if raw.get("changes") else None,
        total_known=total_known,
        manifest_url=raw.get("manifest") if raw.get("manifest_etag") is not None else None,
        results_url=raw.get("results_url") or None,
        results_format=raw.get("results_format") or None,
        results_written=None if written is None else written == "1",
        results_error=raw.get("results_error") or None,
    )
