"""Admission: whether a caller's parsed submission is answered from the cache, refused,
or becomes work, and what it came to. No HTTP here: the routes parse a request into a
``Submission``, call these, and map the outcome (or the refusal raised: a
``shared.errors`` error or ``RateLimitedError``) to a response.

Order of a job's admission, each refusal raised before anything is stored: the cache
(a hit charges the caller's ``hit`` bucket), the image check, load shedding, the
``miss`` bucket, then the job (created, or joined). A refused image, a shed
submission, or one refused because the payload store cannot take its image (the
charge refunded) costs the caller nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import IO, Any

import redis
from starlette.concurrency import run_in_threadpool

from api import metrics
from api.deps import Services, charge
from shared.errors import (
    BadInputError,
    ManifestError,
    OverloadedError,
    PayloadStoreUnavailable,
    PayloadTooLargeError,
    QueueUnavailableError,
)
from shared.images import check_image, decoded_pixels
from shared.keys import verdict_key
from shared.models import Job, ScanSummary
from shared.objects import (
    ObjectAccessDenied,
    ObjectMeta,
    ObjectNotFound,
    ObjectStoreError,
    ObjectUrl,
)
from shared.store.apikeys import Caller
from shared.store.limits import Decision
from shared.submit import asubmit_owned, submit_scan

logger = logging.getLogger(__name__)

# Uploads this small are checked on the event loop (a 2 KB JPEG in ~0.1 ms, 35 KB in
# ~0.8 ms): cheaper than the hop to a thread, short enough not to hold the loop up...
INLINE_CHECK_BYTES = 8 * 1024
# ...when their header also declares few pixels to decode: a 1 KB WEBP or PNG of one
# colour can declare 4000x4000 (~120 ms to decode); 65,536 (a JPEG's at 1/8 scale) take
# at most ~0.6 ms in any accepted format.
INLINE_CHECK_PIXELS = 256 * 256
# What a shed submission is told to wait before trying again.
SHED_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Submission:
    """A parsed, validated request: image bytes, texts, and an optional webhook."""

    image: bytes
    text: str
    premise: str | None
    callback_url: str | None = None


@dataclass(frozen=True)
class Admitted:
    """What one submission came to: a cached verdict, or a job (created or joined)."""

    cached: bytes | None = None  # the cached verdict's JSON
    job_id: str | None = None  # the caller's id for the job (its own handle on a join)
    created: bool = False
    limited: Decision | None = None  # the charge, for the RateLimit-* headers
    fresh: bool = False  # created with no await since: see wait_for
    computed_by: str | None = None  # the job announced when it ends (a handle's job)


async def admit(s: Services, caller: Caller, sub: Submission) -> Admitted:
    """The cache, the caller's rate limit, the image check, load shedding, then the
    job; each refusal raises before anything is stored."""
    model_id, revision = s.settings.model_tag
    tenant = caller.key_id if s.settings.cache_scope == "key" else None
    key = verdict_key(model_id, revision, sub.image, sub.text, sub.premise, tenant=tenant)
    cached = await s.reads.acached(key)
    if cached is not None:
        metrics.CACHE_HIT.inc()
        limited = await charge(s, caller, "hit", "cached verdicts")
        return Admitted(cached=cached, limited=limited)
    metrics.CACHE_MISS.inc()
    await check_upload(s, sub.image)
    await shed(s, key, len(sub.image))
    limited = await charge(s, caller, "miss", "new jobs")
    try:
        got = await asubmit_owned(
            s.jobs,
            s.celery,
            key,
            sub.image,
            sub.text,
            sub.premise,
            sub.callback_url,
            owner=caller.key_id,
            tenant=tenant,
        )
    except PayloadStoreUnavailable:
        # Nothing was stored: the caller is not charged for a job it did not get.
        if limited is not None:
            with contextlib.suppress(redis.RedisError):
                await s.limiter.refund(caller, "miss")
        raise
    (metrics.ENQUEUED if got.created else metrics.DEDUPLICATED).inc()
    fresh = got.created and not sub.callback_url  # adding a hook awaited a thread
    return Admitted(
        job_id=got.job_id,
        created=got.created,
        limited=limited,
        fresh=fresh,
        computed_by=got.job,
    )


async def check_upload(s: Services, image: bytes) -> None:
    """Refuse an image that will not decode, or declares too many pixels: on the event
    loop when it is small and declares few pixels (cheaper than a hop to a thread),
    else in the thread pool."""
    if len(image) <= INLINE_CHECK_BYTES and decoded_pixels(image) <= INLINE_CHECK_PIXELS:
        check_image(image, s.settings.max_pixels)
    else:
        await run_in_threadpool(check_image, image, s.settings.max_pixels)


async def shed(s: Services, key: str, image_bytes: int) -> None:
    """Load shedding (``OverloadedError``): past ``OFA_MAX_PENDING_JOBS`` unfinished
    interactive jobs, or past ``OFA_MAX_PENDING_IMAGE_BYTES`` of images held for them,
    unless the submission joins a job already computing its key (that adds nothing).
    Scans' jobs are not counted: bulk work never sheds another key's submission."""
    count_cap = s.settings.max_pending_jobs
    bytes_cap = s.settings.max_pending_image_bytes
    if not count_cap and not bytes_cap:
        return
    pending, held = await s.reads.aadmission()
    over_count = bool(count_cap) and pending >= count_cap
    over_bytes = bool(bytes_cap) and held + image_bytes > bytes_cap
    if (over_count or over_bytes) and not await s.reads.ain_flight(key):
        if over_count:
            raise OverloadedError(pending, count_cap, retry_after_s=SHED_RETRY_AFTER_S)
        raise OverloadedError(
            held, bytes_cap, retry_after_s=SHED_RETRY_AFTER_S, what="bytes of images"
        )


async def finished(s: Services, admitted: Admitted, wait_s: float) -> Job | None:
    """The admitted job once it has ended within ``wait_s`` (capped by
    ``OFA_MAX_WAIT_S``), or None: no wait asked, or the job still unfinished."""
    if wait_s <= 0 or admitted.job_id is None:
        return None
    return await wait_for(
        s,
        admitted.job_id,
        min(wait_s, s.settings.max_wait_s),
        admitted.fresh,
        admitted.computed_by,
    )


async def wait_for(
    s: Services, job_id: str, seconds: float, fresh: bool = False, watch: str | None = None
) -> Job | None:
    """The job once it has ended, or None after ``seconds``.

    Woken by the workers' pub/sub announcement, which carries the final record (no
    read then); the record is re-read at least once a second as well, so a
    notification lost in a reconnect costs latency, not a hang.
    A ``fresh`` job (created by this request, with no await since) cannot have ended
    unannounced: its first read waits for the announcement. ``watch``: the id that is
    announced, when ``job_id`` is a handle (the job it follows).
    """
    deadline = time.monotonic() + seconds
    watched = watch or job_id
    fut = s.waiter.register(watched)
    try:
        while True:
            if fut.done() and (record := fut.result()) is not None:
                return s.reads.job_of(job_id, record)  # the announcement carried it
            if not fresh:
                job = await s.reads.aget(job_id)
                if job is not None and job.status.finished:
                    return job
            fresh = False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), min(remaining, 1.0))
    finally:
        s.waiter.forget(watched, fut)


# --- scans ------------------------------------------------------------------------------

# A catalogue's name: what a key calls the set of rows its scans compare over.
CATALOGUE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# An Idempotency-Key: printable ASCII.
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# How long a start that finds its key reserved by a concurrent one waits for that one's
# scan id before answering 409 ("in progress, retry").
REPLAY_WAIT_S = 5.0


class IdempotencyConflict(Exception):
    """The Idempotency-Key is taken: by another request body, or by a start of the same
    body still creating its scan (``retry_after_s`` set: try again then)."""

    def __init__(self, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Idempotency:
    """A start's Idempotency-Key and the digest of everything that defines its scan."""

    key: str
    digest: str


@dataclass(frozen=True)
class ScanStarted:
    """A scan stored and queued: its id, its rows, and the caller's charge; or, with
    ``replayed``, the scan an earlier start with the same Idempotency-Key made."""

    scan_id: str
    total: int
    limited: Decision | None
    replayed: ScanSummary | None = None


def check_catalogue(name: object) -> str | None:
    """A scan's ``catalogue``, checked (``BadInputError``); None when not given."""
    if name in (None, ""):
        return None
    if not isinstance(name, str) or not CATALOGUE_NAME.fullmatch(name):
        raise BadInputError("catalogue must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return name


def check_idempotency_key(key: str | None) -> str | None:
    """The Idempotency-Key header, checked (``BadInputError``); None when not sent."""
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise BadInputError("Idempotency-Key must be 1-255 printable ASCII characters")
    return key


def json_digest(body: dict[str, Any]) -> str:
    """What defines a scan started by a JSON body: the body, canonically written."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def upload_digest(upload: IO[bytes], fields: dict[str, Any]) -> str:
    """What defines a scan started by an upload: the manifest's bytes and the fields
    that shape the scan. Blocking (reads the spooled upload once, then rewinds it)."""
    h = hashlib.sha256(json_digest(fields).encode())
    while chunk := upload.read(1 << 20):
        h.update(chunk)
    upload.seek(0)
    return h.hexdigest()


async def admit_scan(s: Services, caller: Caller, idempotency_key: str | None = None) -> None:
    """Refuse a key (or the service) at a scan cap (``ScanLimitError``,
    ``ScansBusyError``) before its manifest is read; unless its Idempotency-Key is
    already held, when it may be a replay, which no cap refuses (a new scan is still
    capped when it is created)."""
    if idempotency_key and await s.scans.aheld(caller.key_id, idempotency_key):
        return
    await s.scans.aadmit(caller.key_id)


async def _reserve(s: Services, caller: Caller, idem: Idempotency) -> ScanStarted | None:
    """None when this start holds the key (it goes on to create the scan); the scan
    an earlier start with the same key and body made; or ``IdempotencyConflict``."""
    deadline = time.monotonic() + REPLAY_WAIT_S
    while True:
        held = await s.scans.areserve(caller.key_id, idem.key, idem.digest)
        if held is None:
            return None
        digest, scan_id = held
        if digest != idem.digest:
            raise IdempotencyConflict(
                "this Idempotency-Key was used within the last 24 hours with another "
                "request body: use a new key for a different scan"
            )
        if scan_id:
            got = await s.scans.aread(scan_id)
            if got is not None:
                return ScanStarted(scan_id, got[0].total, None, replayed=got[0])
            # The scan is gone (deleted): the key no longer names one; start afresh.
            await s.scans.arelease(caller.key_id, idem.key, idem.digest, scan_id)
            continue
        if time.monotonic() >= deadline:
            raise IdempotencyConflict(
                "a start with this Idempotency-Key is still creating its scan: retry",
                retry_after_s=1,
            )
        await asyncio.sleep(0.05)


async def start_scan(
    s: Services,
    caller: Caller,
    fmt: str,
    callback: str | None,
    catalogue: str | None = None,
    idempotency: Idempotency | None = None,
    **source: Any,
) -> ScanStarted:
    """Charge the caller's rate limit, then store and queue the scan (``source``:
    ``upload=`` a file object or ``server_path=``). The charge comes before anything
    is stored (a refused caller leaves nothing behind); a manifest refused while being
    stored, or a store that is down, gives it back: bad input changes nothing, not even
    the caller's budget.

    With an ``idempotency`` key, the key is reserved first (atomically, so of two
    concurrent starts one creates the scan and the other answers with it); a replay
    costs nothing, and a start that creates nothing frees the key."""
    if idempotency is not None:
        replay = await _reserve(s, caller, idempotency)
        if replay is not None:
            return replay
    limited: Decision | None = None
    # The key's own bucket list travels with the scan: its rows' object URLs are
    # checked against it (worker/scans/resolver.py).
    extra = {**source.pop("extra", {}), **_bucket_fields(caller)}
    try:
        limited = await charge(s, caller, "miss", "scans")
        try:
            scan_id, total = await run_in_threadpool(
                submit_scan,
                s.scans,
                s.celery,
                s.settings,
                fmt,
                callback,
                owner=caller.key_id,
                catalogue=catalogue,
                extra=extra or None,
                **source,
            )
        except Exception:
            if limited is not None:
                with contextlib.suppress(redis.RedisError):
                    await s.limiter.refund(caller, "miss")
            raise
    except BaseException:
        if idempotency is not None:
            with contextlib.suppress(redis.RedisError):
                await s.scans.arelease(caller.key_id, idempotency.key, idempotency.digest)
        raise
    if idempotency is not None:
        await s.scans.arecord(caller.key_id, idempotency.key, idempotency.digest, scan_id)
    return ScanStarted(scan_id, total, limited)


# --- scans in object storage ----------------------------------------------------------

RESULTS_FORMATS = ("jsonl", "csv", "parquet")


class BucketNotAllowed(Exception):
    """An object URL outside what the caller may name (403; nothing is stored)."""

    def __init__(self, what: str, url: str) -> None:
        self.detail = (
            f"{what} {url}: this API key may not name that bucket (OFA_OBJECT_BUCKETS, "
            "narrowed by the key's own --bucket list)"
        )
        super().__init__(self.detail)


class ObjectRefused(Exception):
    """The service's own credentials may not read the manifest (403)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


def _bucket_fields(caller: Caller) -> dict[str, str]:
    return {} if caller.buckets is None else {"buckets": json.dumps(list(caller.buckets))}


def check_object_url(s: Services, caller: Caller, value: object, what: str) -> ObjectUrl:
    """An object URL a request named, parsed (``BadInputError``) and within the
    caller's buckets (``BucketNotAllowed``)."""
    if not isinstance(value, str) or not value:
        raise BadInputError(f"{what} must be an object URL (s3://, gs://, az://)")
    try:
        url = ObjectUrl.parse(value)
    except ValueError as exc:
        raise BadInputError(f"{what}: {exc}") from None
    if not s.buckets.allows(url, caller.buckets):
        raise BucketNotAllowed(what, str(url))
    return url


def results_target(s: Services, caller: Caller, url: object, fmt: object) -> dict[str, str]:
    """The scan record's ``results_url`` and ``results_format`` (from the URL's suffix
    unless given: ``.parquet``, ``.csv``, else JSONL); empty when no URL is given."""
    if url in (None, ""):
        if fmt not in (None, ""):
            raise BadInputError("results_format needs a results_url")
        return {}
    target = check_object_url(s, caller, url, "results_url")
    if fmt in (None, ""):
        suffix = target.key.rsplit(".", 1)[-1].lower()
        fmt = suffix if suffix in ("parquet", "csv") else "jsonl"
    if not isinstance(fmt, str) or fmt.lower() not in RESULTS_FORMATS:
        raise BadInputError(f"results_format must be one of {', '.join(RESULTS_FORMATS)}")
    return {"results_url": str(target), "results_format": fmt.lower()}


async def object_manifest(s: Services, caller: Caller, value: object, fmt: str) -> ObjectMeta:
    """The manifest object a scan names: allowed for the caller, JSONL, there, and
    within ``OFA_MAX_MANIFEST_BYTES`` (a HEAD; nothing is read, nothing stored).
    Refusals: ``BucketNotAllowed`` or ``ObjectRefused`` (403), ``BadInputError`` (no
    such object: 422), ``PayloadTooLargeError`` (413), ``QueueUnavailableError`` (the
    store unreachable: 503)."""
    url = check_object_url(s, caller, value, "manifest_url")
    if fmt != "jsonl":
        raise ManifestError("a manifest in object storage must be JSONL")
    try:
        meta = await s.objects.ahead(url)
    except ObjectNotFound:
        raise BadInputError(f"manifest_url: no object at {url}") from None
    except ObjectAccessDenied:
        raise ObjectRefused(
            f"manifest_url {url}: the service's credentials may not read it"
        ) from None
    except ObjectStoreError as exc:
        raise QueueUnavailableError(f"the object store is unavailable: {exc.detail}") from exc
    limit = s.settings.max_manifest_bytes
    if meta.size > limit:
        raise PayloadTooLargeError(f"the manifest is larger than {limit} bytes")
    if meta.size == 0:
        raise ManifestError("the manifest has no rows")
    return meta
