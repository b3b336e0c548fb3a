"""Jobs' state changes: creation (the API, a scan's coordinator), start, lease renewal,
release and end (the worker), cancellation (the API), the reaper's re-send, and the
short lingering of jobs a scan has copied.

Reads are ``job_reads.py``'s, the reaper's own look ``reaping.py``'s. Every change
that touches more than one key is one script in ``lua/``.

A job's image is never in Redis: it is a payload (``shared/payloads.py``) named
``{key}.{job id}`` (``shared/keys.py:payload_name``), written before the record that
names it and removed after the script that ends the job (``payload`` on the record is
'' for such a payload; a scan row's object URL or ``file:`` path is a reference the
worker reads in place, never copied). A submission that joins another job removes the
payload it wrote; whatever a crash leaves is swept by the reaper (``orphans``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import redis

from shared.errors import PayloadStoreUnavailable, QueueUnavailableError
from shared.keys import Keys, payload_name
from shared.models import JobStatus, Verdict
from shared.settings import Settings
from shared.store.clients import Clients, Store
from shared.store.codec import bytes_of, decode_hash, now, text_of
from shared.store.durability import confirm_on_disk, wait_on_disk
from shared.store.job_reads import Read
from shared.store.scripts import ITEMS_PER_CALL, Batch, Script, each_reply

if TYPE_CHECKING:
    from shared.payloads import PayloadStore

logger = logging.getLogger(__name__)

# Once a scan's coordinator has copied a job's outcome into the scan's results file,
# the job record and its in-flight mark linger this long (for anything that joined the
# job), then go: the durable store holds the scan's window, not its manifest.
SCAN_JOB_LINGER_S = 60
# The longest wait between tries of a job whose image store is unreachable.
STORE_WAIT_MAX_S = 60.0

_CREATE_OR_JOIN = Script("create_or_join", lib=True)
_START = Script("start", lib=True)
_FINISH = Script("finish", lib=True)
_CANCEL = Script("cancel", lib=True)
_CANCEL_HANDLE = Script("cancel_handle")
_DISCARD = Script("discard", lib=True)
_ADD_HOOK = Script("add_hook")
_CLAIM_OVERDUE = Script("claim_overdue")
_EXPIRE_ALL = Script("expire_all")

# A job's image: its bytes (written to the payload store under the job's name), or a
# reference (str) to a scan row's object URL or ``file:`` path the workers read in place.
Image = bytes | str
# A chunk's payloads are written this many at a time (an object store or a network
# volume answers each write in milliseconds; side by side, a chunk waits for a few).
PUT_THREADS = 8
_PUT_POOL: ThreadPoolExecutor | None = None


def _put_pool() -> ThreadPoolExecutor:
    global _PUT_POOL
    if _PUT_POOL is None:
        _PUT_POOL = ThreadPoolExecutor(PUT_THREADS, thread_name_prefix="payload-put")
    return _PUT_POOL


@dataclass(frozen=True)
class Hook:
    """A webhook waiting for a job: where to POST, and the delivery's id (the same on
    every retry, so receivers can drop replays)."""

    url: str
    delivery_id: str
    # The id its submitter knows, when that is not the finished job's own (a handle).
    job_id: str | None = None

    def encode(self) -> str:
        doc = {"url": self.url, "delivery": self.delivery_id}
        if self.job_id:
            doc["job"] = self.job_id
        return json.dumps(doc)

    @classmethod
    def decode(cls, raw: Any) -> Hook:
        doc = json.loads(text_of(raw))
        return cls(doc["url"], doc["delivery"], doc.get("job"))


@dataclass(frozen=True)
class Created:
    """What ``create_or_join`` did."""

    job_id: str  # what the submitter is told: the job's id, or its own handle's
    created: bool
    overdue: bool = False  # joined a job past its deadline: send it again now
    computed_by: str = ""  # the job that computes it (differs from job_id for a handle)

    @property
    def job(self) -> str:
        """The id of the job doing the work (its announcement on the done channel)."""
        return self.computed_by or self.job_id


class StartAction(StrEnum):
    """What a worker should do with a message for a job."""

    RUN = "run"  # compute it (or finish it from the cached verdict)
    FINISHED = "finished"  # nothing: it has ended
    GONE = "gone"  # nothing: its record expired
    BUSY = "busy"  # nothing: another worker holds a live lease on it
    POISON = "poison"  # fail it: started too many times without finishing


@dataclass(frozen=True)
class Started:
    """What ``start`` decided, with the cached verdict or where the image is when it is
    RUN: ``payload`` '' for the job's own in the payload store (``JobStore.payloads``,
    under ``payload_name``), else the reference the worker reads (an object URL, a
    ``file:`` path); None when there is nothing to read."""

    action: StartAction
    cached: bytes | None = None
    payload: str | None = None
    attempts: int = 0


class JobStore(Store):
    """Jobs' state changes: records and in-flight marks (durable), verdicts (cache), and
    the images of unfinished jobs (``payloads``, written and removed around the
    scripts)."""

    def __init__(
        self, settings: Settings, keys: Keys, clients: Clients, payloads: PayloadStore
    ) -> None:
        super().__init__(settings, keys, clients)
        self.payloads = payloads

    # -- payloads --------------------------------------------------------------------

    def _put(self, named: Sequence[tuple[str, bytes]]) -> None:
        """Write payloads (several side by side); if any write fails, the others are
        removed again (best effort) and ``PayloadStoreUnavailable`` raised."""
        if len(named) == 1:
            self.payloads.put(*named[0])
            return
        futures = [_put_pool().submit(self.payloads.put, n, data) for n, data in named]
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            self.drop([n for n, _ in named])
            raise failed[0]  # type: ignore[misc]

    def drop(self, names: Collection[str]) -> None:
        """Remove payloads nothing names any more (best effort: the reaper's sweep
        removes what an unreachable store keeps)."""
        if not names:
            return
        try:
            self.payloads.delete_many(list(names))
        except (PayloadStoreUnavailable, OSError) as exc:
            logger.warning("%d payloads not removed (swept later): %s", len(names), exc)

    def sweep_payloads(self, grace_s: float) -> int:
        """Remove payloads older than the blob lifetime (``OFA_BLOB_TTL_S``), and those
        older than ``grace_s`` whose job is not unfinished (a crash between the write
        and the record, or between a job's end and its payload's removal); the reaper
        calls this. Returns how many went."""
        removed = self.payloads.sweep(self.settings.blob_ttl_s)
        return removed + self.payloads.sweep(grace_s, self.unfinished)

    def unfinished(self, names: Sequence[str]) -> set[str]:
        """The payload names (``payload_name``) whose job is queued or running (one
        pipelined HGET per name)."""
        ids = {name: name.partition(".")[2] for name in names}
        named = [name for name, job_id in ids.items() if job_id]
        if not named:
            return set()
        pipe = self.sync.durable.pipeline(transaction=False)
        for name in named:
            pipe.hget(self.keys.job(ids[name]), "status")
        live = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
        return {n for n, st in zip(named, pipe.execute(), strict=True) if text_of(st) in live}

    async def adrop(self, names: Collection[str]) -> None:
        """``drop`` from the event loop (in a thread)."""
        if names:
            await asyncio.to_thread(self.drop, names)

    # -- creation --------------------------------------------------------------------

    def create_or_join(
        self,
        key: str,
        image: Image,
        text: str,
        premise: str | None,
        scan_id: str | None = None,
        owner: str | None = None,
    ) -> Created:
        """Join the job computing ``key`` (counting one more sharer), or store a new
        queued job: its image in the payload store first (bytes; a reference is only
        recorded), then mark, record and dispatch deadline, atomically. A mark
        whose job record is gone is replaced. An ``owner`` (the API key's id) is
        recorded on a new job; joining another owner's job gives a handle of its own.
        With durable acknowledgement on, returns only once the durable store has
        fsynced the write (WAITAOF on the connection that wrote)."""
        return self.create_or_join_many([(key, image, text, premise)], scan_id, owner=owner)[0]

    def create_or_join_many(
        self,
        items: Sequence[tuple[str, Image, str, str | None]],
        scan_id: str | None = None,
        tenant: str | None = None,
        owner: str | None = None,
    ) -> list[Created]:
        """``create_or_join`` for several (key, image, text, premise) in one round trip
        (a scan's chunk), with one WAITAOF for all of them when it is on. A scan's jobs
        have no owner: nobody reads them by id but the scan's coordinator. The images
        given as bytes are written to the payload store first
        (``PayloadStoreUnavailable`` if it cannot take them: nothing is stored); those
        of submissions that joined a job are removed again."""
        t = time.time()
        ids = [uuid.uuid4().hex for _ in items]
        named = {
            i: payload_name(key, job_id)
            for i, ((key, image, *_), job_id) in enumerate(zip(items, ids, strict=True))
            if isinstance(image, bytes)
        }
        self._put([(name, items[i][1]) for i, name in named.items()])  # type: ignore[misc]
        calls = [
            self._create_call(k, i, tx, p, scan_id, t, job_id, tenant=tenant, owner=owner)
            for (k, i, tx, p), job_id in zip(items, ids, strict=True)
        ]
        try:
            batch = Batch(self.sync.durable)
            commands = batch.each(_CREATE_OR_JOIN, calls)
            waits = wait_on_disk(batch, self.settings)
            replies = batch.execute()
            out = [self._created(reply, t) for reply in each_reply(replies[:commands])]
        except redis.ResponseError:  # refused: nothing was written
            self.drop(named.values())
            raise
        # Any other failure (the connection lost, a failover) may come after the records
        # were written: the payloads stay, and the sweep removes those whose job never
        # was (``sweep_payloads``).
        self.drop([name for i, name in named.items() if not out[i].created])
        if waits and any(c.created for c in out):

            def undo() -> None:
                for c, (key, *_) in zip(out, items, strict=True):
                    if c.created:
                        self.discard(c.job_id, key, keep_payload=True)

            confirm_on_disk(replies[commands], undo, "job", self.settings.durable_ack_replicas)
        return out

    async def acreate_and_send(
        self,
        key: str,
        image: bytes,
        text: str,
        premise: str | None,
        job_id: str,
        queue: str,
        message: bytes,
        owner: str = "",
        tenant: str | None = None,
        traceparent: str | None = None,
    ) -> Created:
        """``create_or_join`` from the event loop for a job whose Celery ``message``
        (built for ``job_id``) goes onto ``queue`` in the same atomic step when the job
        is new: the image written to the payload store (in a thread), then one round
        trip for record, deadlines and message. ``owner``: the
        submitting API key's id (a join of another key's job gets its own handle);
        ``tenant``: the key whose private cache the verdict goes to, if any.
        ``PayloadStoreUnavailable`` when the image cannot be stored: nothing is."""
        t = time.time()
        name = payload_name(key, job_id)
        await asyncio.to_thread(self.payloads.put, name, image)
        call = self._create_call(
            key, image, text, premise, None, t, job_id, queue, message, owner, tenant, traceparent
        )
        try:
            batch = Batch(self.aio.durable)
            batch.each(_CREATE_OR_JOIN, [call])
            waits = wait_on_disk(batch, self.settings)
            replies = await batch.aexecute()
            got = self._created(each_reply(replies[:1])[0], t)
        except redis.ResponseError:  # refused: nothing was written
            await self.adrop([name])
            raise
        # Any other failure may come after the record was written (a failover): the
        # payload stays for the job; the sweep removes it if the job never was.
        if not got.created:  # joined: the job it joined has its own payload
            await self.adrop([name])
        if waits and got.created:
            try:
                confirm_on_disk(replies[1], lambda: None, "job", self.settings.durable_ack_replicas)
            except QueueUnavailableError:
                await self.adiscard(got.job_id, key, (queue, message), keep_payload=True)
                raise
        return got

    def _create_call(
        self,
        key: str,
        image: Image,
        text: str,
        premise: str | None,
        scan_id: str | None,
        t: float,
        job_id: str | None = None,
        queue: str | None = None,
        message: bytes = b"",
        owner: str | None = None,
        tenant: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[list[str], list[str | bytes | float]]:
        """KEYS and ARGV of one job's ``create_or_join.lua``. An ``owner`` (interactive
        submissions) is recorded, and a join of another owner's job makes a handle.
        ``image``: bytes already in the payload store under the job's name, or a
        reference (recorded as ``payload``; it holds no bytes here)."""
        model_id, revision = self.settings.model_tag
        k = self.keys
        job_id = job_id or uuid.uuid4().hex
        record: dict[str, str] = {
            "status": JobStatus.QUEUED,
            "key": key,
            "model": model_id,
            "revision": revision,
            "text": text,
            "created_at": f"{t:.6f}",
            "payload": "" if isinstance(image, bytes) else image,
            "size": str(len(image)) if isinstance(image, bytes) else "0",
        }
        if premise is not None:
            record["premise"] = premise
        if scan_id:
            record["scan"] = scan_id
        if owner:
            record["owner"] = owner
        if tenant:
            record["tenant"] = tenant
        if traceparent:  # the job's trace (shared/tracing.py): the reaper's re-send keeps it
            record["traceparent"] = traceparent
        fields = [x for pair in record.items() for x in pair]
        args: list[str | bytes | float] = [
            job_id,
            self.settings.job_ttl_s,
            record["size"],
            t + self.settings.dispatch_deadline_s,
            t,
            k.job_prefix(),
            message,
            owner or "",
            uuid.uuid4().hex if owner else "",
            "bulk" if scan_id else "interactive",
            *fields,
        ]
        keys = [
            k.inflight(key),
            k.job(job_id),
            k.job_deadlines(),
            k.job_pending(),
            queue or k.job(job_id),  # no message: an unused key of the same job
            k.job_pending_interactive(),
            k.held_bytes(),
        ]
        return keys, args

    @staticmethod
    def _created(reply: Any, t: float) -> Created:
        if isinstance(reply, Exception):
            raise reply
        got, created, deadline, computed_by = reply
        overdue = deadline is not None and float(deadline) < t
        return Created(text_of(got), bool(created), overdue, text_of(computed_by))

    def discard(
        self,
        job_id: str,
        key: str,
        sent: tuple[str, bytes] | None = None,
        keep_payload: bool = False,
    ) -> None:
        """Remove a job that was never sent (its record, mark and deadlines, then its
        payload); ``sent``: the (queue, message) pushed with the record, taken back too.
        ``keep_payload``: the job is undone because no replica confirmed it, and a replica
        may still hold the record (and be promoted): its payload is left for the sweep,
        which removes it only if no such job exists."""
        if _DISCARD(self.sync.durable, *self._discard_call(job_id, key, sent)) and not keep_payload:
            self.drop([payload_name(key, job_id)])

    async def adiscard(
        self,
        job_id: str,
        key: str,
        sent: tuple[str, bytes] | None = None,
        keep_payload: bool = False,
    ) -> None:
        """``discard`` from the event loop; ``sent``: the (queue, message) pushed with
        the record, taken back too if no worker has taken it yet (one that has finds no
        job and does nothing); ``keep_payload`` as for ``discard``."""
        if (
            await _DISCARD.acall(self.aio.durable, *self._discard_call(job_id, key, sent))
            and not keep_payload
        ):
            await self.adrop([payload_name(key, job_id)])

    def _discard_call(
        self, job_id: str, key: str, sent: tuple[str, bytes] | None
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``discard.lua``."""
        keys = self._ending_keys(job_id, key, sent[0] if sent else self.keys.job(job_id))
        return keys, [job_id, sent[1] if sent else b""]

    def _ending_keys(self, job_id: str, key: str, seventh: str) -> list[str]:
        """KEYS of the scripts that end a job (``finish``, ``cancel``, ``discard``), one
        layout for all three: job, in-flight mark, deadlines, pending, hooks,
        ``seventh`` (the script's own: verdict, queue, or the job again where it has
        none), held bytes, interactive pending."""
        k = self.keys
        return [
            k.job(job_id),
            k.inflight(key),
            k.job_deadlines(),
            k.job_pending(),
            k.job_hooks(job_id),
            seventh,
            k.held_bytes(),
            k.job_pending_interactive(),
        ]

    # -- the worker's transitions ----------------------------------------------------

    def start(self, job_id: str, key: str) -> Started:
        """Take the job (a message for it arrived): what the worker should do.

        Finished, vanished, or running under another worker's live lease: nothing
        (duplicate messages are harmless). Otherwise the job is running under a lease
        of ``lease_s``; the cached verdict is returned if there is one (a redelivery
        finishes without computing), else where its image is (``Started.payload``). A
        job started more than
        ``max_attempts`` times is reported as poison.
        """
        return self.start_many([(job_id, key)])[0]

    def start_many(self, jobs: Sequence[tuple[str, str]]) -> list[Started]:
        """``start`` for several (job id, key) pairs in one round trip (a chunk)."""
        r, k = self.sync, self.keys
        t = time.time()
        same = r.cache is r.durable
        calls = [
            (
                [k.job(job_id), k.job_deadlines(), k.verdict(key)],
                [job_id, t, t + self.settings.lease_s, 1 if same else 0, key],
            )
            for job_id, key in jobs
        ]
        batch = Batch(r.durable)
        batch.each(_START, calls)
        replies = each_reply(batch.execute())
        running = [i for i, reply in enumerate(replies) if text_of(reply[0]) == StartAction.RUN]
        cached: dict[int, bytes | None] = {i: bytes_of(replies[i][2]) for i in running}
        if not same and running:
            got = r.cache.mget([k.verdict(jobs[i][1]) for i in running])
            cached = {i: bytes_of(v) for i, v in zip(running, got, strict=True)}
        out = []
        for i, reply in enumerate(replies):
            action = StartAction(text_of(reply[0]))
            if action != StartAction.RUN:
                out.append(Started(action))
                continue
            attempts, verdict, payload = int(reply[1]), cached[i], text_of(reply[3])
            if attempts > self.settings.max_attempts and verdict is None:
                out.append(Started(StartAction.POISON, attempts=attempts))
                continue
            out.append(
                Started(
                    StartAction.RUN,
                    cached=verdict,
                    payload=None if verdict is not None else payload,
                    attempts=attempts,
                )
            )
        return out

    def renew(self, job_ids: Iterable[str]) -> None:
        """Extend the leases of jobs this worker is computing (only while unfinished)."""
        ids = list(job_ids)
        if ids:
            deadline = time.time() + self.settings.lease_s
            self.sync.durable.zadd(self.keys.job_deadlines(), dict.fromkeys(ids, deadline), xx=True)

    def release(self, job_id: str, waiting_on_store: bool = False) -> float:
        """A transient failure: back to queued, to be sent again by the reaper after a
        backoff that doubles with each attempt. Returns the backoff.

        ``waiting_on_store``: the job could not even read its image (the payload or
        object store unreachable). That start, and the send that led to it, do not count
        against ``max_attempts`` and ``max_dispatches`` (``store_waits`` is taken off
        both), so an outage never uses up a job's tries however long it lasts; the
        backoff doubles with each such wait instead, up to ``STORE_WAIT_MAX_S``."""
        job = self.keys.job(job_id)
        if waiting_on_store:
            waits = int(self.sync.durable.hincrby(job, "store_waits", 1))
            backoff = min(self.settings.retry_backoff_s * 2 ** (waits - 1), STORE_WAIT_MAX_S)
        else:
            attempts = int(self.sync.durable.hget(job, "attempts") or 1)
            backoff = min(self.settings.retry_backoff_s * 2 ** max(attempts - 1, 0), 300.0)
        pipe = self.sync.durable.pipeline()
        pipe.hset(job, "status", JobStatus.QUEUED)
        pipe.zadd(self.keys.job_deadlines(), {job_id: time.time() + backoff}, xx=True)
        pipe.execute()
        return backoff

    def add_hook(self, job_id: str, url: str) -> tuple[str, Hook]:
        """Ask for ``url`` to be told when the job ends: ('added', hook) when the
        finisher will send it, ('finished', hook) when the job already ended (the
        caller sends it), ('gone', hook) when the job is unknown."""
        hook = Hook(url, uuid.uuid4().hex, job_id)
        got = _ADD_HOOK(
            self.sync.durable,
            [self.keys.job(job_id), self.keys.job_hooks(job_id)],
            [hook.encode(), self.settings.job_ttl_s, self.keys.job_prefix()],
        )
        return text_of(got), hook

    def succeed(self, job_id: str, key: str, verdict: Verdict | bytes, cached: bool) -> list[Hook]:
        """Cache the verdict and finish the job. The in-flight mark stays (as long as
        the record) pointing at this finished job: a submit that raced past the cache
        lookup joins it instead of starting another."""
        return self.succeed_many([(job_id, key, verdict)], cached)[0]

    def fail(self, job_id: str, key: str, error: str) -> list[Hook]:
        """Fail the job for good; the next identical submission starts afresh."""
        fields = {"status": JobStatus.FAILED, "error": error, "finished_at": now()}
        batch = Batch(self.sync.durable)
        batch.each(_FINISH, [self._finish_call(job_id, key, fields, False, None)])
        return self._ended([(job_id, key)], each_reply(batch.execute()))[0]

    def succeed_many(
        self, items: Sequence[tuple[str, str, Verdict | bytes]], cached: bool = False
    ) -> list[list[Hook]]:
        """``succeed`` for several (job id, key, verdict) in one transaction (a chunk's
        verdicts). Returns each job's webhooks, in order."""
        r = self.sync
        docs = [v if isinstance(v, bytes) else v.model_dump_json().encode() for _, _, v in items]
        same = r.cache is r.durable
        if not same:  # the verdicts first: a job never reads as succeeded before
            cache = r.cache.pipeline(transaction=False)
            for (_, key, _), doc in zip(items, docs, strict=True):
                cache.set(self.keys.verdict(key), doc, ex=self.settings.verdict_ttl_s)
            cache.execute()
        # A chunk's jobs finish in one script call (up to ``ITEMS_PER_CALL``; a longer
        # list's calls are one transaction besides).
        batch = Batch(r.durable, transaction=len(items) > ITEMS_PER_CALL)
        calls = [
            self._finish_call(
                job_id,
                key,
                {
                    "status": JobStatus.SUCCEEDED,
                    "verdict": doc,
                    "cached": "1" if cached else "0",
                    "finished_at": now(),
                },
                True,
                doc if same else None,
            )
            for (job_id, key, _), doc in zip(items, docs, strict=True)
        ]
        batch.each(_FINISH, calls)
        return self._ended([(j, k) for j, k, _ in items], each_reply(batch.execute()))

    def _ended(self, jobs: Sequence[tuple[str, str]], replies: list[Any]) -> list[list[Hook]]:
        """Each ended job's webhooks from ``finish.lua``'s replies, once the payloads
        that were the jobs' own are removed (in one call)."""
        self.drop(
            [
                payload_name(key, job_id)
                for (job_id, key), r in zip(jobs, replies, strict=True)
                if r[1]
            ]
        )
        return [[Hook.decode(h) for h in r[0]] for r in replies]

    def _finish_call(
        self,
        job_id: str,
        key: str,
        fields: dict[str, Any],
        keep_mark: bool,
        verdict: bytes | None,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one job's ``finish.lua``; its reply lists the job's
        webhooks. ``keep_mark``: the in-flight mark stays (a verdict to join)."""
        k = self.keys
        keys = self._ending_keys(job_id, key, k.verdict(key))
        args = [
            job_id,
            self.settings.job_ttl_s,
            1 if keep_mark else 0,
            k.done_channel(),
            self.settings.verdict_ttl_s,
            b"" if verdict is None else verdict,
            k.job_prefix(),
            *(x for pair in fields.items() for x in pair),
        ]
        return keys, args

    # -- cancellation (the API) ------------------------------------------------------

    async def acancel(
        self, job_id: str, read: Read | None = None
    ) -> tuple[str, str, list[Hook]] | None:
        """Cancel a queued job nobody else joined (it fails as "cancelled" and its key
        is free again); a joined one is left for its other waiters ("detached"), a
        running or finished one is left to finish, its verdict cached ("unchanged").
        A handle (another key's share in a job) is cancelled alone while the job is
        queued. Returns (outcome, status, the webhooks taken: the caller sends them),
        or None when the job is unknown. ``read``: the job as ``JobReads.aread`` just
        gave it (the API checked its owner), which spares reading it again."""
        if read is not None:
            if read.computed_by != job_id:
                return await self._acancel(job_id, {"handle_of": read.computed_by})
            return await self._acancel(job_id, {"key": read.key} if read.key else {})
        got = await self.aio.durable.hmget(self.keys.job(job_id), "key", "handle_of")
        record = {n: text_of(v) for n, v in zip(("key", "handle_of"), got, strict=True) if v}
        return await self._acancel(job_id, record)

    async def _acancel(
        self, job_id: str, record: dict[str, str]
    ) -> tuple[str, str, list[Hook]] | None:
        k = self.keys
        if record.get("handle_of"):
            reply = await _CANCEL_HANDLE.acall(
                self.aio.durable,
                [k.job(job_id), k.job_hooks(job_id)],
                [k.job_prefix(), now(), k.done_channel(), job_id],
            )
        elif record.get("key"):
            reply = await _CANCEL.acall(
                self.aio.durable,
                self._ending_keys(job_id, record["key"], k.job(job_id)),
                [job_id, now(), self.settings.job_ttl_s, k.done_channel()],
            )
        else:
            return None
        outcome, status, hooks, *ours = reply
        if text_of(outcome) == "gone":
            return None
        if ours and ours[0] and record.get("key"):
            await self.adrop([payload_name(record["key"], job_id)])
        return text_of(outcome), text_of(status), [Hook.decode(h) for h in hooks]

    # -- sending again (the reaper, or a submission that joined an overdue job) -------

    def record(self, job_id: str) -> dict[str, str]:
        """The raw record ({} when gone): what a message sent again is rebuilt from."""
        return decode_hash(self.sync.durable.hgetall(self.keys.job(job_id)))

    def claim_overdue(self, job_id: str) -> bool:
        """Atomically take an overdue job for sending again: queued, one more dispatch,
        a new dispatch deadline. False when its deadline moved meanwhile (a worker
        started it, or it finished): then nothing is to be sent."""
        t = time.time()
        deadline = t + self.settings.dispatch_deadline_s
        k = self.keys
        return bool(
            _CLAIM_OVERDUE(
                self.sync.durable, [k.job(job_id), k.job_deadlines()], [job_id, t, deadline]
            )
        )

    # -- scans' copies, and counters -------------------------------------------------

    def linger(self, finished: Iterable[tuple[str, str]]) -> None:
        """(key, job id) pairs whose outcome a scan has copied: expire them soon."""
        keys = [
            k for key, job_id in finished for k in (self.keys.job(job_id), self.keys.inflight(key))
        ]
        if keys:  # one command for the lot, not two per job
            _EXPIRE_ALL(self.sync.durable, keys, [SCAN_JOB_LINGER_S])

    def record_batch(self, items: int, batches: int = 1, busy_s: float = 0.0) -> None:
        """Count ``batches`` model passes of ``items`` items in all, which kept the
        device busy ``busy_s`` seconds (/metrics reads them: ``JobReads.abatch_stats``)."""
        pipe = self.sync.durable.pipeline(transaction=False)
        pipe.hincrby(self.keys.batch_stats(), "batches", batches)
        pipe.hincrby(self.keys.batch_stats(), "items", items)
        if busy_s > 0:  # whole microseconds: HINCRBY, no float to round in Redis
            pipe.hincrby(self.keys.batch_stats(), "busy_us", round(busy_s * 1e6))
        pipe.execute()
