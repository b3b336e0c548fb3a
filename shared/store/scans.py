"""Scan records, their coordinator lock and their deadlines."""

from __future__ import annotations

import time
import uuid

import redis
import redis.asyncio as aioredis

from shared.errors import ScanLimitError, ScansBusyError
from shared.keys import Keys
from shared.models import ScanCounts, ScanStatus, ScanSummary
from shared.settings import Settings
from shared.store.codec import DELETE_IF_EQUAL, decode_hash, now, text_of
from shared.store.jobs import confirm_on_disk

# KEYS: scan, scans not finalised (the reaper's index), the owner's scans
# ARGV: mode ('check' or 'create'), global cap, per-key cap, per-key bytes cap (0: off),
#       this scan's stored bytes, scan key prefix; with 'create' also: scan id, ttl,
#       deadline, fields...
# A key's scans and scan storage, and the service's unfinished scans, counted and
# capped in one step with the creation, so concurrent starts cannot pass a cap
# together. A key's expired scans leave its index here. Reply: {verdict, count}.
_ADMIT_SCAN = """
local mode, cap_all, cap_key, cap_bytes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local stored, prefix = tonumber(ARGV[5]), ARGV[6]
local running = redis.call('ZCARD', KEYS[2])
if cap_all > 0 and running >= cap_all then return {'busy', running} end
if cap_key > 0 or cap_bytes > 0 then
  local mine = redis.call('HGETALL', KEYS[3])
  local active, bytes = 0, 0
  for i = 1, #mine, 2 do
    local status = redis.call('HGET', prefix .. mine[i], 'status')
    if not status then
      redis.call('HDEL', KEYS[3], mine[i])
    else
      bytes = bytes + tonumber(mine[i + 1])
      if status == 'queued' or status == 'running' then active = active + 1 end
    end
  end
  if cap_key > 0 and active >= cap_key then return {'key-scans', active} end
  if cap_bytes > 0 and bytes + stored > cap_bytes then return {'key-bytes', bytes} end
end
if mode ~= 'create' then return {'ok', 0} end
local scan_id, ttl = ARGV[7], ARGV[8]
redis.call('HSET', KEYS[1], unpack(ARGV, 10))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], ARGV[9], scan_id)
if cap_key > 0 or cap_bytes > 0 then
  redis.call('HSET', KEYS[3], scan_id, stored)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return {'ok', 0}
"""


# KEYS: the scan's lock, scans not finalised (the reaper's index)
# ARGV: the lock's token, its time to live (ms), scan id, the scan's next deadline
# The coordinator holding the lock extends it and the scan's deadline in one step,
# only while the lock is still its own (one that expired and was taken by another
# coordinator is left to that one). Reply: 1 when kept, 0 when no longer ours.
_KEEP_SCAN = """
local token, ttl_ms, scan_id, deadline = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', KEYS[1]) ~= token then return 0 end
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('ZADD', KEYS[2], 'XX', deadline, scan_id)
return 1
"""


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

    def create(
        self,
        scan_id: str,
        total: int,
        manifest: str,
        callback_url: str | None,
        owner: str = "",
        stored_bytes: int = 0,
    ) -> None:
        """A queued scan of ``total`` rows read from ``manifest``, started by ``owner``
        (the API key's id) with ``stored_bytes`` of manifest kept for it. The scan caps
        are checked in the same atomic step (``ScanLimitError``, ``ScansBusyError``)."""
        record: dict[str, str] = {
            "status": ScanStatus.QUEUED,
            "created_at": now(),
            "total": str(total),
            "manifest": manifest,
            **{name: "0" for name in ScanCounts.model_fields},
        }
        if callback_url:
            record["callback_url"] = callback_url
        if owner:
            record["owner"] = owner
            record["stored_bytes"] = str(stored_bytes)
        key = self.keys.scan(scan_id)
        fields = [x for pair in record.items() for x in pair]
        # One connection, in order (no MULTI: WAITAOF must follow the writes, not sit
        # inside a transaction): the record is on disk before the API answers 202.
        pipe = self.durable.pipeline(transaction=False)
        pipe.eval(
            _ADMIT_SCAN,
            3,
            key,
            self.keys.scan_deadlines(),
            self.keys.scans_of(owner or "-"),
            *self._admit_args(owner, stored_bytes, "create"),
            scan_id,
            self.settings.scan_ttl_s,
            self._deadline(queued=True),
            *fields,
        )
        if self.settings.durable_ack_on:
            # The primary's AOF, and with OFA_DURABLE_ACK=replica one replica's too.
            pipe.execute_command(
                "WAITAOF",
                1,
                self.settings.durable_ack_replicas,
                self.settings.durable_ack_timeout_ms,
            )
        replies = pipe.execute(raise_on_error=False)
        if isinstance(replies[0], Exception):
            raise replies[0]
        self._admitted(replies[0], owner)
        if self.settings.durable_ack_on:
            confirm_on_disk(
                replies[-1],
                lambda: self.discard(scan_id),
                "scan",
                self.settings.durable_ack_replicas,
            )

    async def aadmit(self, owner: str) -> None:
        """Refuse a new scan before its manifest is read when ``owner`` (an API key's
        id) or the service is at a scan cap (``create`` checks again, atomically)."""
        reply = await self.adurable.eval(
            _ADMIT_SCAN,
            3,
            self.keys.scan("-"),
            self.keys.scan_deadlines(),
            self.keys.scans_of(owner or "-"),
            *self._admit_args(owner, 0, "check"),
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

    def finish(
        self,
        scan_id: str,
        counts: ScanCounts,
        status: ScanStatus = ScanStatus.SUCCEEDED,
        error: str | None = None,
    ) -> None:
        """The end: succeeded, cancelled (kept) or failed, with the final counts; the
        scan leaves the reaper's index."""
        fields = {**self._count_fields(counts, True), "status": status}
        if error:
            fields["error"] = error
        pipe = self.durable.pipeline(transaction=True)
        pipe.hset(self.keys.scan(scan_id), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(self.keys.scan(scan_id), self.settings.scan_ttl_s)
        pipe.zrem(self.keys.scan_deadlines(), scan_id)
        pipe.execute()

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
        reply = self.durable.eval(
            _KEEP_SCAN,
            2,
            self.keys.scan_lock(scan_id),
            self.keys.scan_deadlines(),
            token,
            max(1, int(ttl_s * 1000)),
            scan_id,
            self._deadline(queued=False),
        )
        return bool(reply)

    def holds(self, scan_id: str, token: str) -> bool:
        """Whether ``token`` still holds the scan's lock."""
        return text_of(self.durable.get(self.keys.scan_lock(scan_id)) or b"") == token

    def unlock(self, scan_id: str, token: str) -> None:
        """Release the lock if it is still ours."""
        self.durable.eval(DELETE_IF_EQUAL, 1, self.keys.scan_lock(scan_id), token)


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
