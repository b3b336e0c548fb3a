"""The scan coordinator: streams a manifest through the cache and the bulk queue.

Runs as short Celery tasks on its own queue (no GPU, no torch). Each task works on one
scan for ``scan_slice_s`` seconds, records everything it did in the scan's results
file (rows and the manifest cursor, in one transaction), then queues its own
continuation. A coordinator killed mid-slice loses nothing: its message comes back
after the visibility timeout and the next slice resumes from the file; a lock stops
two coordinators working on one scan.

Per chunk of rows: resolve each row (``resolver``); look keys up in one pipelined
MGET; hits are final at once; misses (deduplicated within the scan, and across scans
and interactive jobs through the in-flight marks) are queued as bulk jobs, never more
than ``scan_window`` distinct keys at a time, so Redis holds the window, not the
manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Coroutine
from dataclasses import replace
from functools import cache, partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis
from celery import Celery

from shared.errors import RowError
from shared.messages import JobStatus, RowState, ScanStatus
from shared.scans.folder import ScanFolder
from shared.scans.manifest import Row, gold_label, read_rows
from shared.scans.results import ResultsDB, RowResult
from shared.settings import Settings
from shared.store import JobStore, Outcome, ScanStore
from shared.submit import BulkItem, submit_bulk
from worker.scans.resolver import Resolved, RowResolver

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

    def __init__(self, jobs: JobStore) -> None:
        self._pubsub: redis.client.PubSub | None = None
        self._swept = 0.0
        try:
            pubsub = jobs.sync.durable.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(jobs.keys.done_channel())
            self._pubsub = pubsub
        except redis.RedisError as exc:
            logger.warning("no job announcements (%s): full re-reads only", exc)

    def take(self, wait: float = 0.0) -> dict[str, str] | None:
        """Job id -> the rest of its announcement (``JobStore.announcements``: the final
        record, or "" for a cancellation) since the last call, waiting up to ``wait``
        seconds for the first; None when a full re-read is due."""
        got: dict[str, str] = {}
        if self._pubsub is None:
            time.sleep(wait)
        else:
            try:
                while (m := self._pubsub.get_message(timeout=wait)) is not None:
                    got.update(JobStore.announcements(m["data"]))
                    wait = 0.0
            except redis.RedisError as exc:
                logger.warning("job announcements lost (%s): full re-reads only", exc)
                self.close()
        now = time.monotonic()
        if self._pubsub is None or now - self._swept >= FULL_SWEEP_S:
            self._swept = now
            return None
        return got

    def close(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            with contextlib.suppress(redis.RedisError):
                pubsub.close()


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
        jobs: JobStore,
        scans: ScanStore,
        resolver: RowResolver,
        celery: Celery,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.scans = scans
        self.resolver = resolver
        self.celery = celery

    # -- one slice -------------------------------------------------------------------

    def run(self, scan_id: str) -> str:
        """Work on ``scan_id`` for one slice: "more", "done" or "busy" (locked elsewhere)."""
        lock_ttl = int(2 * self.settings.scan_slice_s + 10)
        token = self.scans.lock(scan_id, lock_ttl)
        if token is None:
            return "busy"
        try:
            return self._slice(scan_id, lock_ttl)
        finally:
            self.scans.unlock(scan_id, token)

    def _slice(self, scan_id: str, lock_ttl: int) -> str:
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
        announced = Announcements(self.jobs)
        try:
            self.scans.hold(scan_id)
            if status == ScanStatus.QUEUED:
                self.scans.start(scan_id)
            manifest = Path(record["manifest"])
            total = int(record.get("total", 0))
            deadline = time.monotonic() + self.settings.scan_slice_s
            published = checked = 0.0
            cancelled = False
            finished = announced.take()  # None: the first turn re-reads every pending row
            while True:
                if time.monotonic() - checked >= CANCEL_CHECK_S:
                    checked = time.monotonic()
                    cancelled = self.scans.status(scan_id) == ScanStatus.CANCELLED
                if cancelled:
                    self._collect(db, scan_id)
                    db.cancel_pending()
                    self._finish(scan_id, record, db, ScanStatus.CANCELLED)
                    return "done"
                pending = self._collect(db, scan_id, finished)  # key -> job id: the window
                next_idx, offset = db.cursor_position()
                if next_idx >= total and not pending:
                    self._finish(scan_id, record, db)
                    return "done"
                room = self.settings.scan_window - len(pending)
                wait = 0.0
                if next_idx < total and room > 0:
                    limit = max(1, min(self.settings.scan_chunk_rows, room))
                    rows, new_offset = read_rows(manifest, offset, next_idx, limit)
                    if not rows:  # fewer rows than counted: the manifest changed
                        self.scans.set_total(scan_id, next_idx)
                        total = next_idx
                        continue
                    results = self._process(scan_id, rows, pending)
                    db.record(results, rows[-1].idx + 1, new_offset)
                else:
                    wait = 0.05  # the window is full: until a job ends, or this long
                finished = announced.take(wait)
                if time.monotonic() - published > 0.5:
                    self.scans.publish_counts(scan_id, db.counts())
                    self.scans.renew_lock(scan_id, lock_ttl)
                    self.scans.hold(scan_id)
                    published = time.monotonic()
                if time.monotonic() > deadline:
                    self.scans.publish_counts(scan_id, db.counts())
                    return "more"
        finally:
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
        known: dict[str, Outcome] = {}
        for job_id in pending.values():
            record = JobStore.announced_record(only.get(job_id, "")) if only else None
            if record is not None:
                known[job_id] = JobStore.outcome_of(record)
        unknown = [job_id for job_id in pending.values() if job_id not in known]
        known.update(zip(unknown, self.jobs.outcomes(unknown), strict=True))
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

    def _process(self, scan_id: str, rows: list[Row], already: dict[str, str]) -> list[RowResult]:
        """The rows' results; misses not ``already`` pending (key -> job id) are
        submitted."""
        with _Network(self.settings) as net:
            # Rows read one after the other (nothing to wait for); those that must
            # fetch their image then fetch concurrently.
            resolved = [self.resolver.read(row) for row in rows]
            remote = [i for i, r in enumerate(resolved) if r.to_fetch]
            if remote:
                fetched = net.run(self._fetch_all([resolved[i] for i in remote], net))
                for i, r in zip(remote, fetched, strict=True):
                    resolved[i] = r
            unique = list(dict.fromkeys(r.key for r in resolved if r.key is not None))
            hits = self.jobs.cached_many(unique)
            new: dict[str, BulkItem] = {}  # key -> work for a job not known yet
            results: list[RowResult] = []
            for r in resolved:
                row = r.row
                result = partial(_row_result, row)
                if r.error is not None or r.key is None:
                    results.append(result(RowState.FAILED, error=r.error or "no image"))
                elif r.key in hits:
                    verdict = hits[r.key].decode()
                    results.append(result(RowState.DONE, key=r.key, cached=True, verdict=verdict))
                elif r.key in already or r.key in new:
                    results.append(result(RowState.PENDING, key=r.key, job_id=already.get(r.key)))
                else:
                    try:
                        if r.remote:  # a URL: fetched now
                            image = net.run(self.resolver.image_for_job(r, net.client))
                        else:
                            image = self.resolver.local_image_for_job(r)
                    except RowError as exc:
                        results.append(result(RowState.FAILED, key=r.key, error=str(exc)))
                        continue
                    new[r.key] = BulkItem(r.key, image, r.text, r.premise)
                    results.append(result(RowState.PENDING, key=r.key))
            # The chunk's new work: jobs created (or joined) together, sent a chunk of
            # jobs to a Celery message; then its rows learn their job ids.
            if new:
                ids = dict(
                    zip(
                        new,
                        submit_bulk(
                            self.jobs,
                            self.celery,
                            scan_id,
                            list(new.values()),
                            self.settings.bulk_chunk_jobs,
                        ),
                        strict=True,
                    )
                )
                results = [
                    replace(res, job_id=ids[res.key])
                    if res.state == RowState.PENDING and res.job_id is None and res.key in ids
                    else res
                    for res in results
                ]
            return results

    async def _fetch_all(self, rows: list[Resolved], net: _Network) -> list[Resolved]:
        """``rows`` (each ``to_fetch``) fetched concurrently, at most
        ``scan_fetch_concurrency`` at a time."""
        sem = asyncio.Semaphore(self.settings.scan_fetch_concurrency)

        async def fetch(r: Resolved) -> Resolved:
            async with sem:
                return await self.resolver.fetch(r, net.client)

        return list(await asyncio.gather(*(fetch(r) for r in rows)))

    # -- the end ---------------------------------------------------------------------

    def _finish(
        self,
        scan_id: str,
        record: dict[str, str],
        db: ResultsDB,
        status: ScanStatus = ScanStatus.SUCCEEDED,
        error: str | None = None,
    ) -> None:
        counts = db.counts()
        self.scans.finish(scan_id, counts, status, error)
        logger.info("scan %s %s: %s", scan_id, status, counts)
        if record.get("callback_url"):
            from shared.celery_app import SCAN_QUEUE, TASK_CALLBACK

            self.celery.send_task(
                TASK_CALLBACK, args=(scan_id,), queue=SCAN_QUEUE, ignore_result=True
            )

    def fail(self, scan_id: str, error: str) -> None:
        """End a scan whose slices keep crashing: failed, with what was done so far."""
        record = self.scans.get(scan_id)
        if not record:
            return
        folder = ScanFolder(self.settings.scans_path, scan_id)
        db = ResultsDB(folder.results)
        try:
            self._finish(scan_id, record, db, ScanStatus.FAILED, error)
        finally:
            db.close()


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
