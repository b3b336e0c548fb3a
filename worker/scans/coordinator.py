"""The scan coordinator: streams a manifest through the cache and the bulk queue.

Runs as short Celery tasks on its own queue (no GPU, no torch). Each task works on one
scan for ``scan_slice_s`` seconds, records everything it did in the scan's results
file (rows and the manifest cursor, in one transaction), then queues its own
continuation. A coordinator killed mid-slice loses nothing: its message comes back
after the visibility timeout and the next slice resumes from the file; a lock stops
two coordinators working on one scan. The lock and the scan's deadline are renewed
by a thread of the slice's own (``_Keeper``) for as long as the slice runs, whatever
it is doing (one chunk of slow image hosts can outlast the lock), and a slice checks
the lock is still its own before it records anything.

Per chunk of rows: resolve each row (``resolver``); look keys up in one pipelined
MGET; hits are final at once; misses (deduplicated within the scan, and across scans
and interactive jobs through the in-flight marks) are queued as bulk jobs, never more
than ``scan_window`` distinct keys at a time, so Redis holds the window, not the
manifest. The image bytes a chunk holds meanwhile are bounded
(``scan_chunk_image_bytes``, ``_Chunk``): past it, the misses so far are submitted
before another image is read or fetched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from functools import cache
from typing import Any, TypeVar

import httpx
import redis
from celery import Celery

from shared.errors import RowError
from shared.models import JobStatus, RowState, ScanStatus
from shared.objects import ObjectStoreError, ObjectStoreUnavailable
from shared.scans.changes import compare_with_baseline
from shared.scans.folder import ScanFolder
from shared.scans.manifest import Row, gold_label
from shared.scans.results import ResultsDB, RowResult
from shared.settings import Settings
from shared.store import Collected, DoneChannel, JobReads, ScanStore
from shared.store.job_reads import DoneSubscription
from shared.submit import BulkItem, submit_bulk
from shared.wiring import Stores
from worker.scans.outputs import write_results
from worker.scans.resolver import Resolved, RowResolver
from worker.scans.source import ManifestChanged, ManifestSource

logger = logging.getLogger(__name__)

T = TypeVar("T")


@cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every slice's HTTP client: building one loads the system's
    CA certificates, which cost more than the rest of a small chunk."""
    return ssl.create_default_context()


def _row_result(row: Row, state: RowState, **fields: Any) -> RowResult:
    """A row's outcome, with its gold label (if the manifest line has one)."""
    return RowResult(row.idx, row.item_id, state, gold=gold_label(row.fields), **fields)


FULL_SWEEP_S = 1.0  # every pending row's job is re-read at least this often
CANCEL_CHECK_S = 0.2  # a slice looks for its scan's cancellation this often, not every turn


class Announcements:
    """Jobs announced finished on the job store's done channel (every finish is
    published there: by a worker, the reaper, a cancellation), so that a slice collects
    only the pending rows whose job has ended, not its whole window every turn, and
    reads none whose final record came with its announcement. Nothing depends on an
    announcement arriving: a full re-read is due every ``FULL_SWEEP_S``, and always
    when the subscription is lost."""

    def __init__(self, done: DoneChannel) -> None:
        self._subscription: DoneSubscription | None = None
        self._swept = 0.0
        try:
            self._subscription = done.subscribe()
        except redis.RedisError as exc:
            logger.warning("no job announcements (%s): full re-reads only", exc)

    def take(self, wait: float = 0.0) -> dict[str, str] | None:
        """Job id -> the rest of its announcement (``DoneChannel.announcements``: the
        final record, or "" for a cancellation) since the last call, waiting up to
        ``wait`` seconds for the first; None when a full re-read is due."""
        got: dict[str, str] = {}
        if self._subscription is None:
            time.sleep(wait)
        else:
            try:
                got = self._subscription.take(wait)
            except redis.RedisError as exc:
                logger.warning("job announcements lost (%s): full re-reads only", exc)
                self.close()
        now = time.monotonic()
        if self._subscription is None or now - self._swept >= FULL_SWEEP_S:
            self._swept = now
            return None
        return got

    def close(self) -> None:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            subscription.close()


class _Keeper:
    """The scan's lock and deadline, renewed every ``every_s`` in a thread of their own
    from the moment a slice takes the lock until it ends, whatever the slice is doing
    (a chunk of URL rows, its fetches and refetches, can take longer than the lock's
    time to live: renewed between chunks only, the lock ran out and a second
    coordinator took the same scan). Should the lock be lost all the same (this
    process frozen past its time to live, Redis unreachable that long), ``ours``
    turns false and the slice stops before writing anything."""

    def __init__(self, scans: ScanStore, scan_id: str, token: str, ttl_s: float, every_s: float):
        self.scans = scans
        self.scan_id = scan_id
        self.token = token
        self.ttl_s = ttl_s
        self.every_s = every_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"keep-{scan_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not self.scans.keep(self.scan_id, self.token, self.ttl_s):
                    logger.warning("scan %s: the lock was lost; the slice stops", self.scan_id)
                    self.lost = True
                    return
            except redis.RedisError as exc:  # down: the next renewal may still be in time
                logger.warning("scan %s: the lock was not renewed (%s)", self.scan_id, exc)

    def ours(self) -> bool:
        """Whether this slice still holds the lock (asked of Redis: a check before each
        write to the results file)."""
        if not self.lost and not self.scans.holds(self.scan_id, self.token):
            self.lost = True
        return not self.lost

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Network:
    """A chunk's event loop and HTTP client, made only when one of its rows needs the
    network (an image URL): a manifest of local files or inline images pays for
    neither (an event loop and a client cost ~0.5 ms a chunk, ~4% of the coordinator
    on small chunks)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._runner: asyncio.Runner | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=self.settings.scan_fetch_concurrency)
            self._client = httpx.AsyncClient(
                follow_redirects=False, trust_env=False, limits=limits, verify=tls_context()
            )
        return self._client

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro`` run to its end on this chunk's event loop."""
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(coro)

    def __enter__(self) -> _Network:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._client is not None:
                self.run(self._client.aclose())
        finally:
            if self._runner is not None:
                self._runner.close()


class Coordinator:
    """Works on scans in slices; one instance per coordinator process."""

    def __init__(
        self,
        settings: Settings,
        stores: Stores,
        resolver: RowResolver,
        celery: Celery,
    ) -> None:
        self.settings = settings
        self.stores = stores
        self.jobs = stores.jobs
        self.reads = stores.reads
        self.scans = stores.scans
        self.resolver = resolver
        self.celery = celery
        # The scan lock's time to live: a coordinator that dies mid-slice holds its scan
        # this long at most (the slice itself renews it, ``_Keeper``).
        self.lock_ttl_s = int(2 * settings.scan_slice_s + 10)

    # -- one slice -------------------------------------------------------------------

    def run(self, scan_id: str) -> str:
        """Work on ``scan_id`` for one slice: "more", "done", "busy" (locked elsewhere)
        or "lost" (the lock was lost mid-slice: its new holder goes on)."""
        token = self.scans.lock(scan_id, self.lock_ttl_s)
        if token is None:
            return "busy"
        # Renewed well within both the lock's time to live and the running scan's
        # deadline (``ScanStore.hold``), whichever is shorter.
        span = min(self.lock_ttl_s, 2 * self.settings.scan_slice_s + self.settings.lease_s)
        keeper = _Keeper(self.scans, scan_id, token, self.lock_ttl_s, span / 3)
        try:
            return self._slice(scan_id, keeper)
        finally:
            keeper.stop()
            self.scans.unlock(scan_id, token)

    def _slice(self, scan_id: str, keeper: _Keeper) -> str:
        record = self.scans.get(scan_id)
        if not record:
            logger.warning("scan %s has no record (expired?)", scan_id)
            return "done"
        status = ScanStatus(record.get("status", ScanStatus.QUEUED))
        if status.finished and record.get("finished_at"):
            self.scans.forget(scan_id)  # finalised already (a duplicate message)
            return "done"
        folder = ScanFolder(self.settings.scans_path, scan_id)
        db = ResultsDB(folder.results)
        announced = Announcements(self.reads.done)
        source = ManifestSource(self.settings, self.resolver.objects, record)
        try:
            self.scans.hold(scan_id)
            if status == ScanStatus.QUEUED:
                self.scans.start(scan_id)
            # An object manifest's rows are counted as they are read: its total is
            # known once the stream has reached the object's end.
            total = int(record.get("total", 0))
            if record.get("total_known") == "0":
                total = sys.maxsize
            buckets = json.loads(record["buckets"]) if record.get("buckets") else None
            # A private verdict cache per API key: the scan's rows in its owner's.
            tenant = record.get("owner") if self.settings.cache_scope == "key" else None
            deadline = time.monotonic() + self.settings.scan_slice_s
            published = checked = 0.0
            cancelled = False
            finished = announced.take()  # None: the first turn re-reads every pending row
            while True:
                if time.monotonic() - checked >= CANCEL_CHECK_S:
                    checked = time.monotonic()
                    cancelled = self.scans.status(scan_id) == ScanStatus.CANCELLED
                if keeper.lost:
                    return "lost"  # nothing more written: the lock's new holder goes on
                if cancelled:
                    if not keeper.ours():
                        return "lost"
                    self._collect(db, scan_id)
                    db.cancel_pending()
                    self._finish(scan_id, record, db, ScanStatus.CANCELLED)
                    return "done"
                pending = self._collect(db, scan_id, finished)  # key -> job id: the window
                next_idx, offset = db.cursor_position()
                if next_idx >= total and not pending:
                    if not keeper.ours():
                        return "lost"
                    self._finish(scan_id, record, db)
                    return "done"
                room = self.settings.scan_window - len(pending)
                wait = 0.0
                if next_idx < total and room > 0:
                    limit = max(1, min(self.settings.scan_chunk_rows, room))
                    try:
                        rows, new_offset = source.read(offset, next_idx, limit)
                    except ManifestChanged as exc:
                        if not keeper.ours():
                            return "lost"
                        self._finish(scan_id, record, db, ScanStatus.FAILED, str(exc))
                        return "done"
                    if not rows:  # fewer rows than counted: the manifest changed
                        self.scans.set_total(scan_id, next_idx)
                        total = next_idx
                        continue
                    results = self._process(scan_id, rows, pending, tenant, buckets)
                    if not keeper.ours():
                        return "lost"
                    db.record(results, rows[-1].idx + 1, new_offset)
                else:
                    wait = 0.05  # the window is full: until a job ends, or this long
                finished = announced.take(wait)
                if time.monotonic() - published > 0.5:
                    self.scans.publish_counts(scan_id, db.counts())
                    published = time.monotonic()
                if time.monotonic() > deadline:
                    self.scans.publish_counts(scan_id, db.counts())
                    return "more"
        finally:
            source.close()
            announced.close()
            db.close()

    # -- completions -----------------------------------------------------------------

    def _collect(
        self, db: ResultsDB, scan_id: str, only: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Finish pending rows whose job has ended (its record is the source of truth:
        the verdict cache may already have evicted the verdict): those whose job is in
        ``only`` (announced finished, with its final record when the announcement
        carried one), or every pending row when it is None. Records not announced are
        read, in one round trip. Returns the rows still pending (key -> job id): the
        window, read once."""
        window = db.pending()
        pending = window
        if only is not None:
            pending = {key: job_id for key, job_id in window.items() if job_id in only}
        if not pending:
            return window
        known: dict[str, Collected] = {}
        for job_id in pending.values():
            record = DoneChannel.announced_record(only.get(job_id, "")) if only else None
            if record is not None:
                known[job_id] = JobReads.outcome_of(record)
        unknown = [job_id for job_id in pending.values() if job_id not in known]
        known.update(zip(unknown, self.reads.outcomes(unknown), strict=True))
        outcomes: dict[str, tuple[RowState, str | None, str | None]] = {}
        ours: list[tuple[str, str]] = []
        for key, job_id in pending.items():
            got = known[job_id]
            if got.status == JobStatus.SUCCEEDED:
                outcomes[key] = (RowState.DONE, got.verdict, None)
            elif got.status == JobStatus.FAILED:
                outcomes[key] = (RowState.FAILED, None, got.error or "failed")
            elif got.status is None:
                outcomes[key] = (RowState.FAILED, None, "the job record expired before it finished")
            if got.status is not None and got.status.finished and got.scan_id == scan_id:
                ours.append((key, job_id))
        if outcomes:
            db.complete(outcomes)
        if ours:
            self.jobs.linger(ours)
        return {key: job_id for key, job_id in window.items() if key not in outcomes}

    # -- new rows --------------------------------------------------------------------

    def _process(
        self,
        scan_id: str,
        rows: list[Row],
        already: dict[str, str],
        tenant: str | None = None,
        buckets: list[str] | None = None,
    ) -> list[RowResult]:
        """The rows' results; misses not ``already`` pending (key -> job id) are
        submitted. Holds at most ``scan_chunk_image_bytes`` of image data (``_Chunk``):
        rows are read, and their images fetched, only while there is room; when there
        is none, the rows so far are looked up and their misses submitted first. With
        ``OFA_CACHE_SCOPE=key`` the rows are keyed in the scan owner's (``tenant``'s)
        cache; rows' object URLs must lie in ``buckets`` (the owner's list, if any) as
        well as in ``OFA_OBJECT_BUCKETS``."""
        with _Network(self.settings) as net:
            chunk = _Chunk(self, scan_id, already, net, tenant)
            waiting: list[Resolved] = []  # read, not yet looked up
            for row in rows:
                if not chunk.held.room():  # reading a row may bring a whole image
                    chunk.settle(waiting)
                    waiting = []
                    chunk.make_room()
                r = self.resolver.read(row, tenant, buckets)
                chunk.held.add(_size(r))
                waiting.append(r)
            chunk.settle(waiting)
            return chunk.finish()

    # -- the end ---------------------------------------------------------------------

    def _finish(
        self,
        scan_id: str,
        record: dict[str, str],
        db: ResultsDB,
        status: ScanStatus = ScanStatus.SUCCEEDED,
        error: str | None = None,
        last_try: bool = False,
    ) -> None:
        self._write_results(scan_id, record, db, status, last_try)
        counts = db.counts()
        catalogue = None
        if record.get("catalogue"):
            catalogue = compare_with_baseline(
                self.scans, self.settings, scan_id, record, db.path, status
            )
        self.scans.finish(scan_id, counts, status, error, catalogue)
        logger.info("scan %s %s: %s", scan_id, status, counts)
        if record.get("callback_url"):
            from shared.submit import send_scan_callback

            send_scan_callback(self.celery, scan_id)

    def fail(self, scan_id: str, error: str) -> None:
        """End a scan whose slices keep crashing: failed, with what was done so far."""
        record = self.scans.get(scan_id)
        if not record:
            return
        folder = ScanFolder(self.settings.scans_path, scan_id)
        db = ResultsDB(folder.results)
        try:
            self._finish(scan_id, record, db, ScanStatus.FAILED, error, last_try=True)
        finally:
            db.close()

    def _write_results(
        self, scan_id: str, record: dict[str, str], db: ResultsDB, status: ScanStatus, last: bool
    ) -> None:
        """A finished (not cancelled) scan's results written to its ``results_url``, the
        outcome recorded on the scan. An unreachable store raises, so the slice is
        retried (backed off, as a crashed one: ``worker/scans/app.py``) before the scan
        finishes; on the ``last`` try, and for any other failure (access denied, no such
        bucket), the scan finishes with ``results_written`` false and the error."""
        url = record.get("results_url")
        if not url or status == ScanStatus.CANCELLED:
            return
        folder = ScanFolder(self.settings.scans_path, scan_id)
        error: str | None = None
        try:
            write_results(self.resolver.objects, url, record.get("results_format", ""), db, folder)
        except ObjectStoreUnavailable as exc:
            if not last:
                raise
            error = str(exc)
        except (ObjectStoreError, OSError) as exc:
            error = str(exc)
        if error:
            logger.warning("scan %s: results not written to %s: %s", scan_id, url, error)
        self.scans.results_written(scan_id, error)


def remove_expired_scans(
    settings: Settings, scans: ScanStore, min_age_s: float = 3600
) -> list[str]:
    """Delete scan folders (manifest copy, results file) whose scan record has expired.

    Folders younger than ``min_age_s`` are left alone: the API creates the folder just
    before the record. Returns the ids removed.
    """
    removed: list[str] = []
    for folder in ScanFolder.stale(settings.scans_path, min_age_s):
        if scans.exists(folder.scan_id):
            continue
        folder.remove()
        removed.append(folder.scan_id)
    if removed:
        logger.info("removed %d expired scan folders", len(removed))
    return removed


def _size(r: Resolved) -> int:
    return len(r.image) if r.image is not None else 0


class _Held:
    """Bytes of image data one chunk holds: images waiting for their lookup or their
    job, and ``most`` (the upload limit) reserved for each fetch or read in progress.
    Room is always there when nothing is held, so a limit under one image still takes
    one at a time. ``peak`` is what tests check the bound with."""

    def __init__(self, limit: int, most: int) -> None:
        self.limit = limit
        self.most = most
        self.bytes = 0
        self.peak = 0

    def room(self) -> bool:
        """Whether one more image of up to ``most`` bytes fits."""
        return self.bytes == 0 or self.bytes + self.most <= self.limit

    def add(self, n: int) -> None:
        self.bytes += n
        self.peak = max(self.peak, self.bytes)

    def drop(self, n: int) -> None:
        self.bytes -= n


class _Chunk:
    """One chunk's rows on their way to results: looked up in batches, misses turned
    into jobs, the image bytes held meanwhile bounded by ``_Held``. Whatever it holds
    leaves by a lookup (hits, failures and rows of a key already pending drop their
    bytes) or by ``make_room`` (the misses so far submitted: their bytes go to Redis
    as blobs)."""

    def __init__(
        self,
        coord: Coordinator,
        scan_id: str,
        already: dict[str, str],
        net: _Network,
        tenant: str | None = None,
    ) -> None:
        self.coord = coord
        self.tenant = tenant
        self.settings = coord.settings
        self.scan_id = scan_id
        self.net = net
        self.held = _Held(self.settings.scan_chunk_image_bytes, self.settings.max_upload_bytes)
        self.known: dict[str, str] = dict(already)  # key -> job id: pending, or submitted here
        self.new: dict[str, BulkItem] = {}  # key -> work for a job not submitted yet
        self.new_bytes = 0
        self.results: list[RowResult] = []

    def settle(self, rows: list[Resolved]) -> None:
        """``rows`` (just read) fetched where their image must be, looked up, and
        their misses queued for ``make_room`` or ``finish`` to submit."""
        while rows:
            ready = [r for r in rows if not r.to_fetch]
            remote = [r for r in rows if r.to_fetch]
            done: list[Resolved] = []
            if remote:
                done, remote = self.net.run(self._admitted(remote, self._identify))
            self._lookup(ready + done)
            rows = remote  # left for lack of room: the misses so far go first
            if rows:
                self.make_room()

    def make_room(self) -> None:
        """Submit the misses so far if another image would not fit beside them."""
        if not self.held.room():
            self._submit()

    def finish(self) -> list[RowResult]:
        """Every row's result, in manifest order, pending ones with their job ids."""
        self._submit()
        results = [
            replace(res, job_id=self.known.get(res.key))
            if res.state == RowState.PENDING and res.job_id is None and res.key is not None
            else res
            for res in self.results
        ]
        return sorted(results, key=lambda res: res.idx)

    # -- inside ----------------------------------------------------------------------

    def _result(self, r: Resolved, state: RowState, **fields: Any) -> None:
        self.results.append(_row_result(r.row, state, **fields))

    def _release(self, r: Resolved) -> None:
        self.held.drop(_size(r))
        r.image = None

    def _lookup(self, rows: list[Resolved]) -> None:
        """Hits, failures and rows already pending become results (their bytes
        dropped); misses get their image (read or fetched now) and join ``new``. A row
        whose URL served other bytes than remembered is keyed anew
        (``RowResolver.image_for_job``) and looked up again."""
        if not rows:
            return
        unique = list(dict.fromkeys(r.key for r in rows if r.key is not None))
        hits = self.coord.reads.cached_many(unique)
        misses: list[Resolved] = []
        for r in rows:
            if r.error is not None or r.key is None:
                self._release(r)
                self._result(r, RowState.FAILED, error=r.error or "no image")
            elif r.key in hits:
                self._release(r)
                verdict = hits[r.key].decode()
                self._result(r, RowState.DONE, key=r.key, cached=True, verdict=verdict)
            elif r.key in self.known or r.key in self.new:
                self._release(r)
                self._result(r, RowState.PENDING, key=r.key, job_id=self.known.get(r.key))
            else:
                misses.append(r)
        remote: list[Resolved] = []
        again: list[Resolved] = []  # a key another remote miss here is fetching
        fetching: set[str] = set()
        for r in misses:
            assert r.key is not None
            if r.key in self.new:  # a duplicate within these misses
                self._release(r)
                self._result(r, RowState.PENDING, key=r.key)
            elif self._by_reference(r):
                continue
            elif r.remote:
                (again if r.key in fetching else remote).append(r)
                fetching.add(r.key)
            else:
                self._local_miss(r)
        keys = {id(r): r.key for r in remote}
        rekeyed: list[Resolved] = []  # fetched bytes other than remembered: another key
        while remote:
            done, remote = self.net.run(self._admitted(remote, self._job_image))
            for r in done:
                if r.error is not None:
                    self._result(r, RowState.FAILED, key=r.key, error=r.error)
                elif r.key != keys[id(r)]:
                    rekeyed.append(r)
                else:
                    self._add(r)
            if remote:  # out of room: what is held goes first, then the rest
                self._lookup(rekeyed)
                rekeyed = []
                self.make_room()
        # Looked up again: the new keys, and the duplicates of a key whose fetch failed
        # or changed key (the others now find their key pending).
        self._lookup(rekeyed + again)

    def _local_miss(self, r: Resolved) -> None:
        """A miss whose image is in hand, or in a file read only now: checked, added."""
        counted = _size(r)
        if r.image is None:
            self.make_room()  # the file may be as large as the upload limit
        try:
            image = self.coord.resolver.local_image_for_job(r)
        except RowError as exc:
            self.held.drop(counted)
            r.image = None
            self._result(r, RowState.FAILED, key=r.key, error=str(exc))
            return
        self.held.add(len(image) - counted)
        self._add(r)

    def _by_reference(self, r: Resolved) -> bool:
        """A miss whose image the workers read in place (an object URL, a file on a
        shared image root): its job names it, nothing is copied, its bytes (if fetched
        to key the row) are let go. False when the job must carry the bytes."""
        try:
            reference = self.coord.resolver.reference_for_job(r)
        except RowError as exc:
            self._release(r)
            self._result(r, RowState.FAILED, key=r.key, error=str(exc))
            return True
        if reference is None:
            return False
        assert r.key is not None
        self._release(r)
        self.new[r.key] = BulkItem(r.key, reference, r.text, r.premise)
        self._result(r, RowState.PENDING, key=r.key)
        return True

    def _add(self, r: Resolved) -> None:
        """A miss with its image checked: a job to create (or join), bytes held until
        it is submitted."""
        assert r.key is not None and r.image is not None
        self.new[r.key] = BulkItem(r.key, r.image, r.text, r.premise)
        self.new_bytes += len(r.image)
        r.image = None  # the item holds it now, and lets go of it once submitted
        self._result(r, RowState.PENDING, key=r.key)

    def _submit(self) -> None:
        """The misses so far created (or joined) as jobs and sent; their bytes are the
        job store's now."""
        if not self.new:
            return
        items = list(self.new.values())
        ids = submit_bulk(
            self.coord.jobs,
            self.coord.celery,
            self.scan_id,
            items,
            self.settings.bulk_chunk_jobs,
            self.tenant,
        )
        self.known.update(zip(self.new, ids, strict=True))
        self.held.drop(self.new_bytes)
        self.new, self.new_bytes = {}, 0

    async def _identify(self, r: Resolved) -> Resolved:
        return await self.coord.resolver.fetch(r, self.net.client)

    async def _job_image(self, r: Resolved) -> Resolved:
        try:
            await self.coord.resolver.image_for_job(r, self.net.client)
        except RowError as exc:
            r.image, r.error = None, str(exc)
        return r

    async def _admitted(
        self, rows: list[Resolved], one: Callable[[Resolved], Awaitable[Resolved]]
    ) -> tuple[list[Resolved], list[Resolved]]:
        """``one`` run on each row, at most ``scan_fetch_concurrency`` at a time, each
        started only while its image (up to the upload limit) fits in what the chunk
        may hold (what it brings is held, the rest of its reservation given back).
        Returns the rows done and those left for lack of room once nothing was in
        flight to make any (the caller submits, then calls again)."""
        held = self.held
        sem = asyncio.Semaphore(self.settings.scan_fetch_concurrency)
        freed = asyncio.Condition()
        in_flight = 0
        done: list[Resolved] = []
        left: list[Resolved] = []

        async def run(r: Resolved) -> None:
            nonlocal in_flight
            async with sem:
                async with freed:
                    await freed.wait_for(lambda: held.room() or in_flight == 0)
                    if not held.room():
                        left.append(r)
                        return
                    held.add(held.most)
                    in_flight += 1
                got: Resolved | None = None
                try:
                    got = await one(r)
                finally:
                    in_flight -= 1
                    held.drop(held.most)
                    if got is not None:
                        held.add(_size(got))
                    async with freed:
                        freed.notify_all()
                assert got is not None
                done.append(got)

        await asyncio.gather(*(run(r) for r in rows))
        return done, left
