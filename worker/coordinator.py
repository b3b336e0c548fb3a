"""The scan coordinator: streams a manifest through the cache and the bulk queue.

Runs as short Celery tasks on its own queue (no GPU, no torch). Each task works on one
scan for ``scan_slice_s`` seconds, records everything it did in the scan's results
file (rows and the manifest cursor, in one transaction), then queues its own
continuation. A coordinator killed mid-slice loses nothing: its message comes back
after the visibility timeout and the next slice resumes from the file; a lock stops
two coordinators working on one scan.

Per chunk of rows: resolve each image (URL, path or base64) with bounded concurrency;
an unchanged remote image is not downloaded again (its ETag / Last-Modified and
SHA-256 are remembered, and asked about with If-None-Match / If-Modified-Since); a
row's own ``sha256`` is trusted for the lookup and checked when the image must be
fetched. Keys are looked up in one pipelined MGET; hits are final at once; misses
(deduplicated within the scan, and across scans and interactive jobs through the
in-flight marks) are queued as bulk jobs, never more than ``scan_window`` distinct
keys at a time, so Redis holds the window, not the manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from celery import Celery

from shared.enqueue import enqueue_job
from shared.errors import BadInputError, OfaEntailError
from shared.fetch import UrlPolicy, fetch
from shared.images import decode_base64, open_image
from shared.keys import Keys, image_digest, verdict_key_for_digest
from shared.scans import ResultsDB, Row, RowResult, file_under, now, read_rows, text_of
from shared.settings import Settings
from shared.text import check_text

logger = logging.getLogger(__name__)


SCAN_JOB_LINGER_S = 60


class RowError(Exception):
    """This row cannot succeed; the message becomes its result."""


@dataclass
class Resolved:
    """A row with its image identified (bytes may still be unfetched)."""

    row: Row
    text: str
    premise: str | None
    digest: bytes | None = None
    image: bytes | None = None
    url: str | None = None
    expected: bytes | None = None  # the row's own sha256, to verify on fetch
    error: str | None = None
    key: str | None = None


class Coordinator:
    """Works on scans in slices; one instance per coordinator process."""

    def __init__(
        self, settings: Settings, durable: redis.Redis, cache: redis.Redis, celery: Celery
    ) -> None:
        self.settings = settings
        self.durable = durable
        self.cache = cache
        self.celery = celery
        self.keys = Keys(settings.key_prefix)
        self.policy = UrlPolicy(
            timeout_s=settings.url_timeout_s,
            max_redirects=settings.url_max_redirects,
            max_bytes=settings.max_upload_bytes,
            allow_hosts=tuple(settings.url_allow_hosts),
        )

    # -- one slice -------------------------------------------------------------------

    def run(self, scan_id: str) -> str:
        """Work on ``scan_id`` for one slice: "more", "done" or "busy" (locked elsewhere)."""
        lock_key = self.keys.scan_lock(scan_id)
        token = uuid.uuid4().hex
        lock_ttl = int(2 * self.settings.scan_slice_s + 10)
        if not self.durable.set(lock_key, token, nx=True, ex=lock_ttl):
            return "busy"
        try:
            return self._slice(scan_id, lock_key, token, lock_ttl)
        finally:
            if self.durable.get(lock_key) == token.encode():
                self.durable.delete(lock_key)

    def _slice(self, scan_id: str, lock_key: str, token: str, lock_ttl: int) -> str:
        scan_key = self.keys.scan(scan_id)
        record = {text_of(k): text_of(v) for k, v in self.durable.hgetall(scan_key).items()}
        if not record:
            logger.warning("scan %s has no record (expired?)", scan_id)
            return "done"
        if record.get("status") in ("succeeded", "failed"):
            return "done"
        folder = self.settings.scans_path / scan_id
        db = ResultsDB(folder / "results.db")
        try:
            if record.get("status") == "queued":
                self.durable.hset(scan_key, mapping={"status": "running", "started_at": now()})
            manifest = Path(record["manifest"])
            total = int(record.get("total", 0))
            deadline = time.monotonic() + self.settings.scan_slice_s
            published = 0.0
            while True:
                if self.durable.hget(scan_key, "status") == b"cancelled":
                    self._collect(db, scan_id)
                    db.cancel_pending()
                    self._publish_counts(scan_id, db, finished=True)
                    return "done"
                self._collect(db, scan_id)
                next_idx, offset = db.cursor_position()
                pending = db.pending_count()
                if next_idx >= total and pending == 0:
                    self._finish(scan_id, record, db)
                    return "done"
                room = self.settings.scan_window - pending
                if next_idx < total and room > 0:
                    limit = max(1, min(self.settings.scan_chunk_rows, room))
                    rows, new_offset = read_rows(manifest, offset, next_idx, limit)
                    if not rows:  # fewer rows than counted: the manifest changed
                        self.durable.hset(scan_key, "total", str(next_idx))
                        total = next_idx
                        continue
                    results = asyncio.run(self._process(scan_id, rows, db))
                    db.record(results, rows[-1].idx + 1, new_offset)
                else:
                    time.sleep(0.05)
                if time.monotonic() - published > 0.5:
                    self._publish_counts(scan_id, db)
                    self.durable.expire(lock_key, lock_ttl)
                    published = time.monotonic()
                if time.monotonic() > deadline:
                    self._publish_counts(scan_id, db)
                    return "more"
        finally:
            db.close()

    # -- completions -----------------------------------------------------------------

    def _collect(self, db: ResultsDB, scan_id: str) -> None:
        """Finish pending rows whose job has ended (its record is the source of truth:
        the verdict cache may already have evicted the verdict)."""
        pending = db.pending()
        if not pending:
            return
        pipe = self.durable.pipeline(transaction=False)
        for job_id in pending.values():
            pipe.hmget(self.keys.job(job_id), "status", "verdict", "error", "scan")
        outcomes: dict[str, tuple[str, str | None, str | None]] = {}
        ours: list[tuple[str, str]] = []
        for (key, job_id), (status, verdict, error, scan) in zip(
            pending.items(), pipe.execute(), strict=True
        ):
            if status == b"succeeded":
                outcomes[key] = ("done", text_of(verdict), None)
            elif status == b"failed":
                outcomes[key] = ("failed", None, text_of(error or b"failed"))
            elif status is None:
                outcomes[key] = ("failed", None, "the job record expired before it finished")
            if status in (b"succeeded", b"failed") and scan == scan_id.encode():
                ours.append((key, job_id))
        if outcomes:
            db.complete(outcomes)
        if ours:
            # The result now lives in the scan's file: this scan's finished job records
            # and in-flight marks linger briefly (for anything that joined them), then
            # go, so the durable store holds the window, not the manifest.
            pipe = self.durable.pipeline(transaction=False)
            for key, job_id in ours:
                pipe.expire(self.keys.job(job_id), SCAN_JOB_LINGER_S)
                pipe.expire(self.keys.inflight(key), SCAN_JOB_LINGER_S)
            pipe.execute()

    # -- new rows --------------------------------------------------------------------

    async def _process(self, scan_id: str, rows: list[Row], db: ResultsDB) -> list[RowResult]:
        limits = httpx.Limits(max_connections=self.settings.scan_fetch_concurrency)
        async with httpx.AsyncClient(
            follow_redirects=False, trust_env=False, limits=limits
        ) as client:
            sem = asyncio.Semaphore(self.settings.scan_fetch_concurrency)

            async def resolve(row: Row) -> Resolved:
                async with sem:
                    return await self._resolve(row, client)

            resolved = await asyncio.gather(*(resolve(r) for r in rows))
            model_id, revision = self.settings.model_tag
            for r in resolved:
                if r.error is None and r.digest is not None:
                    r.key = verdict_key_for_digest(model_id, revision, r.digest, r.text, r.premise)
            keyed = [r for r in resolved if r.key is not None]
            hits: dict[str, Any] = {}
            if keyed:
                unique = list(dict.fromkeys(r.key for r in keyed if r.key))
                values = self.cache.mget([self.keys.verdict(k) for k in unique])
                hits = {k: v for k, v in zip(unique, values, strict=True) if v is not None}
            already = db.pending()
            jobs: dict[str, str] = {}
            results: list[RowResult] = []
            for r in resolved:
                row = r.row
                if r.error is not None or r.key is None:
                    results.append(
                        RowResult(row.idx, row.item_id, "failed", error=r.error or "no image")
                    )
                    continue
                if r.key in hits:
                    results.append(
                        RowResult(
                            row.idx,
                            row.item_id,
                            "done",
                            key=r.key,
                            cached=True,
                            verdict=hits[r.key].decode(),
                        )
                    )
                    continue
                job_id = already.get(r.key) or jobs.get(r.key)
                if job_id is None:
                    try:
                        job_id = await self._submit(scan_id, r, client)
                    except RowError as exc:
                        results.append(
                            RowResult(row.idx, row.item_id, "failed", key=r.key, error=str(exc))
                        )
                        continue
                    jobs[r.key] = job_id
                results.append(RowResult(row.idx, row.item_id, "pending", key=r.key, job_id=job_id))
            return results

    async def _resolve(self, row: Row, client: httpx.AsyncClient) -> Resolved:
        fields = row.fields
        s = self.settings
        try:
            if "__error__" in fields:
                raise RowError(fields["__error__"])
            if not row.item_id:
                raise RowError("missing id")
            text = check_text(fields.get("text"), "text", s.max_text_chars, required=True)
            premise = check_text(fields.get("premise"), "premise", s.max_text_chars, False)
            assert text is not None
            r = Resolved(row, text, premise)
            expected = fields.get("sha256")
            if expected is not None:
                try:
                    r.expected = bytes.fromhex(str(expected))
                except ValueError:
                    r.expected = b""
                if len(r.expected) != 32:
                    raise RowError("sha256 must be 64 hexadecimal characters")
            source, kind = self._image_source(fields)
            if kind == "base64":
                r.image = decode_base64(source, s.max_upload_bytes)
            elif kind == "path":
                r.image = self._read_path(source)
            else:
                r.url = source
                if r.expected is not None:
                    r.digest = r.expected  # trusted for the lookup; verified if fetched
                    return r
                await self._fetch_url(r, client)
            if r.image is not None:
                r.digest = image_digest(r.image)
                if r.expected is not None and r.digest != r.expected:
                    raise RowError("the image does not match the row's sha256")
            return r
        except RowError as exc:
            return Resolved(row, "", None, error=str(exc))
        except (BadInputError, OfaEntailError) as exc:
            return Resolved(row, "", None, error=str(exc))

    def _image_source(self, fields: dict[str, Any]) -> tuple[str, str]:
        for name, kind in (
            ("image_url", "url"),
            ("image_path", "path"),
            ("image_base64", "base64"),
        ):
            if fields.get(name):
                return str(fields[name]), kind
        image = fields.get("image")
        if not image or not isinstance(image, str):
            raise RowError("missing image")
        if image.startswith(("http://", "https://")):
            return image, "url"
        if image.startswith("data:"):
            return image, "base64"
        if "://" in image:
            raise RowError("image URLs must be http or https")
        return image, "path"

    def _read_path(self, name: str) -> bytes:
        try:
            path = file_under(self.settings.image_root, name, "image", "OFA_IMAGE_ROOT")
        except ValueError as exc:
            raise RowError(str(exc)) from exc
        if path.stat().st_size > self.settings.max_upload_bytes:
            raise RowError(f"image is larger than {self.settings.max_upload_bytes} bytes")
        return path.read_bytes()

    async def _fetch_url(self, r: Resolved, client: httpx.AsyncClient) -> None:
        """Conditional GET when the URL was seen before; fills digest (and image on 200)."""
        assert r.url is not None
        meta_key = self.keys.url_meta(hashlib.sha256(r.url.encode()).hexdigest())
        meta = {text_of(k): text_of(v) for k, v in self.cache.hgetall(meta_key).items()}
        known = meta.get("sha256")
        found = await fetch(
            r.url,
            self.policy,
            client,
            etag=meta.get("etag") if known else None,
            last_modified=meta.get("last_modified") if known else None,
        )
        if found.not_modified and known:
            r.digest = bytes.fromhex(known)
            return
        assert found.body is not None
        r.image = found.body
        fields: dict[Any, Any] = {"sha256": hashlib.sha256(found.body).hexdigest()}
        if found.etag:
            fields["etag"] = found.etag
        if found.last_modified:
            fields["last_modified"] = found.last_modified
        if found.etag or found.last_modified:
            pipe = self.cache.pipeline(transaction=False)
            pipe.delete(meta_key)
            pipe.hset(meta_key, mapping=fields)
            pipe.expire(meta_key, self.settings.url_meta_ttl_s)
            pipe.execute()

    async def _submit(self, scan_id: str, r: Resolved, client: httpx.AsyncClient) -> str:
        """Queue a bulk job for a miss (fetching the image if only its digest is known)."""
        assert r.key is not None
        if r.image is None:
            assert r.url is not None
            try:
                found = await fetch(r.url, self.policy, client)
            except OfaEntailError as exc:
                raise RowError(str(exc)) from exc
            assert found.body is not None
            if r.expected is not None and image_digest(found.body) != r.expected:
                raise RowError("the image does not match the row's sha256")
            r.image = found.body
        try:
            open_image(r.image, self.settings.max_pixels)
        except BadInputError as exc:
            raise RowError(f"{exc.title}: {exc.detail}") from exc
        job_id, _ = enqueue_job(
            self.durable,
            self.celery,
            self.keys,
            self.settings,
            r.key,
            r.image,
            r.text,
            r.premise,
            scan_id=scan_id,
        )
        return job_id

    # -- bookkeeping -----------------------------------------------------------------

    def _publish_counts(self, scan_id: str, db: ResultsDB, finished: bool = False) -> None:
        counts = db.counts()
        fields: dict[Any, Any] = {k: str(v) for k, v in counts.items()}
        if finished:
            fields["finished_at"] = now()
        self.durable.hset(self.keys.scan(scan_id), mapping=fields)

    def _finish(self, scan_id: str, record: dict[str, str], db: ResultsDB) -> None:
        self._publish_counts(scan_id, db, finished=True)
        scan_key = self.keys.scan(scan_id)
        self.durable.hset(scan_key, "status", "succeeded")
        self.durable.expire(scan_key, self.settings.scan_ttl_s)
        logger.info("scan %s finished: %s", scan_id, db.counts())
        if record.get("callback_url"):
            from shared.celery_app import SCAN_QUEUE, TASK_CALLBACK

            self.celery.send_task(TASK_CALLBACK, args=(scan_id,), queue=SCAN_QUEUE)


def remove_expired_scans(
    scans_path: Path, durable: redis.Redis, keys: Keys, min_age_s: float = 3600
) -> list[str]:
    """Delete scan folders (manifest copy, results file) whose scan record has expired.

    Folders younger than ``min_age_s`` are left alone: the API creates the folder just
    before the record. Returns the ids removed.
    """
    import shutil

    removed: list[str] = []
    if not scans_path.is_dir():
        return removed
    now_s = time.time()
    for folder in scans_path.iterdir():
        if not folder.is_dir() or now_s - folder.stat().st_mtime < min_age_s:
            continue
        if durable.exists(keys.scan(folder.name)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    if removed:
        logger.info("removed %d expired scan folders", len(removed))
    return removed


__all__ = ["Coordinator", "remove_expired_scans"]
