"""Submitting work: a job (from the API or a scan's coordinator) and a scan (from the
API). Both store their record first, then send the Celery message; if the broker
refuses, everything stored is removed again and ``QueueUnavailableError`` says so.
The messages the API and the coordinator push themselves are built by
``shared/wire.py``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import redis
from celery import Celery
from pydantic import PrivateAttr

from shared import tracing
from shared.errors import ManifestError, PayloadTooLargeError, QueueUnavailableError
from shared.models import JobStatus
from shared.objects import ObjectMeta
from shared.scans.folder import ScanFolder
from shared.scans.manifest import check_jsonl_head, csv_to_jsonl, file_under
from shared.settings import Settings
from shared.store import Created, Hook, JobStore, ScanStore
from shared.wire import (
    SCAN_QUEUE,
    TASK_ENTAIL,
    TASK_JOB_WEBHOOK,
    TASK_SCAN,
    TASK_SCAN_WEBHOOK,
    WEBHOOK_QUEUE,
    EntailTask,
    chunk_message,
    entail_message,
    queue_name,
)

logger = logging.getLogger(__name__)


def send_job(celery: Celery, msg: EntailTask) -> None:
    """Send the ``ofa.entail`` message to the model's interactive or bulk queue (with
    the job's trace context in its headers when its record has one: ``message_of``)."""
    headers = tracing.message_headers(getattr(msg, "_traceparent", None))
    celery.send_task(
        TASK_ENTAIL,
        kwargs={"msg": msg.model_dump()},
        task_id=msg.job_id,
        queue=queue_name(msg.model, msg.revision, bulk=msg.bulk),
        retry=False,
        # Job records carry the outcome: no result-backend subscription per task
        # (it costs a round trip, and ~19 s of reconnect attempts when Redis is down).
        ignore_result=True,
        **({"headers": headers} if headers else {}),
    )


def send_hooks(
    celery: Celery, job_id: str, hooks: list[Hook], traceparent: str | None = None
) -> None:
    """Queue the delivery of a finished job's webhooks (the coordinator POSTs them, on
    its webhook threads). Best effort: a broker outage here is logged, the job itself
    is already done. ``traceparent``: the job's trace, which each delivery continues."""
    extra = {"headers": {tracing.TRACEPARENT: traceparent}} if traceparent else {}
    for hook in hooks:
        try:
            celery.send_task(
                TASK_JOB_WEBHOOK,
                # A handle's hook reports the handle (the id its submitter knows).
                args=(hook.job_id or job_id, hook.url, hook.delivery_id),
                queue=WEBHOOK_QUEUE,
                retry=True,
                ignore_result=True,
                **extra,
            )
        except Exception as exc:
            logger.error("job %s: webhook to %s not queued: %s", job_id, hook.url, exc)


def send_scan_callback(celery: Celery, scan_id: str) -> str:
    """Queue the delivery of a finished scan's callback (on the coordinator's webhook
    threads) under a new delivery id, which every retry keeps; returns the id."""
    delivery_id = uuid.uuid4().hex
    celery.send_task(
        TASK_SCAN_WEBHOOK,
        args=(scan_id, delivery_id),
        queue=WEBHOOK_QUEUE,
        retry=True,
        ignore_result=True,
    )
    return delivery_id


def new_task(
    store: JobStore,
    job_id: str,
    key: str,
    text: str,
    premise: str | None,
    scan_id: str | None,
    tenant: str | None = None,
) -> EntailTask:
    """The message of a job just created for the store's model."""
    model_id, revision = store.settings.model_tag
    return EntailTask(
        job_id=job_id,
        key=key,
        model=model_id,
        revision=revision,
        text=text,
        premise=premise,
        scan_id=scan_id,
        tenant=tenant,
    )


class _Traced(EntailTask):
    """A message rebuilt from a record with a trace context: the context rides beside
    the body (``send_job`` puts it in the headers), never in it."""

    _traceparent: str | None = PrivateAttr(default=None)


def message_of(job_id: str, record: dict[str, str]) -> EntailTask:
    """A job's message, rebuilt from its record (how the reaper sends it again), with
    the record's trace context for ``send_job``."""
    traceparent = record.get(tracing.TRACEPARENT)
    msg = (_Traced if traceparent else EntailTask)(
        job_id=job_id,
        key=record["key"],
        model=record["model"],
        revision=record["revision"],
        text=record["text"],
        premise=record.get("premise"),
        scan_id=record.get("scan"),
        tenant=record.get("tenant"),
    )
    if isinstance(msg, _Traced):
        msg._traceparent = traceparent
    return msg


def _new_job_message(
    store: JobStore,
    celery: Celery,
    key: str,
    text: str,
    premise: str | None,
    tenant: str | None = None,
    traceparent: str | None = None,
) -> tuple[str, str, bytes]:
    """A new interactive job's id, and the queue and bytes of its message."""
    job_id = uuid.uuid4().hex
    task = new_task(store, job_id, key, text, premise, None, tenant)
    queue, message = entail_message(celery, task, traceparent)
    return job_id, queue, message


async def asubmit_job(
    store: JobStore,
    celery: Celery,
    key: str,
    image: bytes,
    text: str,
    premise: str | None,
    callback_url: str | None = None,
) -> tuple[str, bool]:
    """Join the job computing ``key`` or create one; returns (job id, created). A
    ``callback_url`` is POSTed the finished job (signed) when it ends.

    The job's Celery message is built first (``entail_message``), the image written to
    the payload store (``PayloadStoreUnavailable`` if it cannot be: nothing is stored),
    then the message pushed onto the model's interactive queue by the same atomic
    script that stores the record (``JobStore.acreate_and_send``): a job is never stored
    unsent, nor sent unstored, nor stored without its image.
    Scan jobs go through ``submit_bulk`` instead."""
    got = await asubmit_owned(store, celery, key, image, text, premise, callback_url)
    return got.job_id, got.created


async def asubmit_owned(
    store: JobStore,
    celery: Celery,
    key: str,
    image: bytes,
    text: str,
    premise: str | None,
    callback_url: str | None = None,
    owner: str = "",
    tenant: str | None = None,
) -> Created:
    """``asubmit_job`` for a caller: the job records ``owner`` (the API key's id), and
    joining another key's job gives this caller a handle of its own (its own id,
    cancel and webhook); ``tenant``: the key whose private cache the verdict goes to
    (``OFA_CACHE_SCOPE=key``). Returns what was created or joined.

    With tracing on, this is the ``ofa.submit`` span: a new job's record and message
    carry its context, so the worker and the webhook continue this trace."""
    with tracing.span("ofa.submit") as traceparent:
        job_id, queue, message = _new_job_message(
            store, celery, key, text, premise, tenant, traceparent
        )
        try:
            got = await store.acreate_and_send(
                key, image, text, premise, job_id, queue, message, owner, tenant, traceparent
            )
        except redis.RedisError as exc:
            raise QueueUnavailableError(
                f"the job store is unavailable ({type(exc).__name__})"
            ) from exc
        if traceparent:
            tracing.set_attribute("ofa.job.id", got.job)
            tracing.set_attribute("ofa.job.created", got.created)
        if callback_url:
            await asyncio.to_thread(_hook, store, celery, got.job_id, callback_url)
        if got.overdue:  # an in-flight mark is never trusted past its job's deadline
            await asyncio.to_thread(_send_again, store, celery, got.job)
    return got


@dataclass(frozen=True)
class BulkItem:
    """One scan row's work: what ``submit_bulk`` needs to create or join its job.
    ``image``: the bytes (written to the payload store), or a reference the workers
    read in place (an object URL, or ``file:`` and a path under a shared
    ``OFA_IMAGE_ROOT``)."""

    key: str
    image: bytes | str
    text: str
    premise: str | None


def send_chunk(store: JobStore, celery: Celery, msgs: list[EntailTask]) -> None:
    """Send scan jobs as one ``ofa.entail.chunk`` message on the model's bulk queue
    (``chunk_message``, pushed onto the broker: the durable store)."""
    queue, message = chunk_message(celery, msgs)
    store.sync.durable.lpush(queue, message)


def submit_bulk(
    store: JobStore,
    celery: Celery,
    scan_id: str,
    items: list[BulkItem],
    chunk: int,
    tenant: str | None = None,
) -> list[str]:
    """Join or create the job of each item (in order; returns their ids), then send
    the new ones ``chunk`` to a message. Records and dispatch deadlines are written
    before any message goes out, as for one job (the images given as bytes written to
    the payload store before them: ``PayloadStoreUnavailable``, nothing stored, if it
    cannot take them); if the broker refuses, the jobs of that message and of the ones
    not sent yet are removed and ``QueueUnavailableError`` raised (jobs already sent
    stay: they run)."""
    ids: list[str] = []
    new: list[EntailTask] = []
    try:
        created = store.create_or_join_many(
            [(i.key, i.image, i.text, i.premise) for i in items], scan_id, tenant
        )
    except redis.RedisError as exc:
        raise QueueUnavailableError(f"the job store is unavailable ({type(exc).__name__})") from exc
    for item, got in zip(items, created, strict=True):
        ids.append(got.job_id)
        if got.created:
            new.append(
                new_task(store, got.job_id, item.key, item.text, item.premise, scan_id, tenant)
            )
        elif got.overdue:
            _send_again(store, celery, got.job_id)
    for start in range(0, len(new), chunk):
        try:
            send_chunk(store, celery, new[start : start + chunk])
        except Exception as exc:
            _discard(store, new[start:])
            raise QueueUnavailableError(
                f"the job queue is unavailable ({type(exc).__name__})"
            ) from exc
    return ids


def _discard(store: JobStore, msgs: list[EntailTask]) -> None:
    for msg in msgs:
        try:
            store.discard(msg.job_id, msg.key)
        except redis.RedisError:
            logger.exception("could not clean up after a failed enqueue")


def _hook(store: JobStore, celery: Celery, job_id: str, url: str) -> None:
    try:
        outcome, hook = store.add_hook(job_id, url)
    except redis.RedisError as exc:
        raise QueueUnavailableError(f"the job store is unavailable ({type(exc).__name__})") from exc
    if outcome == "finished":  # ended meanwhile: nobody else will send it
        send_hooks(celery, job_id, [hook])


def _send_again(store: JobStore, celery: Celery, job_id: str) -> None:
    """Best effort: the reaper does the same on its next pass if this fails."""
    record = store.record(job_id)
    if not record or JobStatus(record.get("status", "queued")).finished:
        return
    try:
        if store.claim_overdue(job_id):
            send_job(celery, message_of(job_id, record))
    except Exception as exc:
        logger.warning("could not send overdue job %s again: %s", job_id, exc)


# --- scans -----------------------------------------------------------------------------


def send_slice(celery: Celery, scan_id: str, countdown: float | None = None) -> None:
    """Queue a slice of the scan's coordinator work."""
    celery.send_task(
        TASK_SCAN,
        args=(scan_id,),
        queue=SCAN_QUEUE,
        retry=False,
        ignore_result=True,
        countdown=countdown,
    )


def manifest_format(name: str, given: object) -> str:
    """``jsonl`` or ``csv``: as given, else from the file name."""
    if given in (None, ""):
        return "csv" if name.lower().endswith(".csv") else "jsonl"
    if not isinstance(given, str) or given.lower() not in ("jsonl", "csv"):
        raise ManifestError("format must be jsonl or csv")
    return given.lower()


def save_manifest(src: IO[bytes], dst: Path, fmt: str, settings: Settings) -> int:
    """Stream an upload to ``dst`` as JSONL (CSV converted on the way); returns the
    number of rows. Never holds the whole manifest, nor any line of it, in memory:
    ``OFA_MAX_MANIFEST_BYTES`` in all, lines of ``OFA_MAX_MANIFEST_LINE_BYTES``, a CSV
    cell a base64 image at the upload limit."""
    max_bytes, max_line = settings.max_manifest_bytes, settings.manifest_line_bytes
    if fmt == "csv":
        import io

        text = io.TextIOWrapper(src, encoding="utf-8", newline="")
        with dst.open("w", encoding="utf-8") as out:
            try:
                cell = (settings.max_upload_bytes * 4) // 3 + 1024
                rows = csv_to_jsonl(text, out, cell, max_line, max_chars=max_bytes)
            except (UnicodeDecodeError, ValueError) as exc:
                raise ManifestError(f"the CSV manifest could not be read ({exc})") from exc
            finally:
                text.detach()
    else:
        written = 0
        with dst.open("wb") as out:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise PayloadTooLargeError(f"the manifest is larger than {max_bytes} bytes")
                out.write(chunk)
        rows = check_jsonl_head(dst, max_line)
    if dst.stat().st_size > max_bytes:
        raise PayloadTooLargeError(f"the manifest is larger than {max_bytes} bytes")
    if rows == 0:
        raise ManifestError("the manifest has no rows")
    return rows


def submit_scan(
    store: ScanStore,
    celery: Celery,
    settings: Settings,
    fmt: str,
    callback_url: str | None,
    upload: IO[bytes] | None = None,
    server_path: str | None = None,
    owner: str = "",
    catalogue: str | None = None,
    manifest_object: ObjectMeta | None = None,
    extra: dict[str, str] | None = None,
) -> tuple[str, int]:
    """Store a manifest (an upload, or a file under ``OFA_MANIFEST_ROOT``; or name the
    object ``manifest_object``, already checked and HEADed: read in place by the
    coordinator, its rows counted as they are read, so 0 is returned), write the
    scan record (started by ``owner``, the API key's id: only it, and admin keys, see
    the scan; its stored manifest counts toward the key's scan storage; of the key's
    ``catalogue`` when named) and queue the
    coordinator; returns (scan id, rows).

    Blocking (file I/O): the API calls it from its thread pool. Nothing is left behind
    when anything fails.
    """
    folder = ScanFolder(settings.scans_path, uuid.uuid4().hex)
    try:
        folder.create()
        if manifest_object is not None:
            # The object's ETag is what the coordinator holds it to; its size counts
            # against the key's stored manifest bytes (it is never copied here, but a
            # scan's results grow with it).
            total, stored = 0, manifest_object.size
            extra = {
                **(extra or {}),
                "manifest_etag": manifest_object.etag or "",
                "manifest_size": str(manifest_object.size),
                "total_known": "0",
            }
            manifest_name = str(manifest_object.url)
        elif upload is not None:
            manifest = folder.manifest
            total = save_manifest(upload, manifest, fmt, settings)
        else:
            assert server_path is not None
            try:
                path = file_under(
                    settings.manifest_root, server_path, "manifest", "OFA_MANIFEST_ROOT"
                )
            except ValueError as exc:
                raise ManifestError(str(exc)) from exc
            if fmt == "csv":
                manifest = folder.manifest
                with path.open("rb") as src:
                    total = save_manifest(src, manifest, fmt, settings)
            else:  # read in place
                manifest, total = path, check_jsonl_head(path, settings.manifest_line_bytes)
        if manifest_object is None:
            stored = manifest.stat().st_size if manifest.parent == folder.path else 0
            manifest_name = str(manifest)
        try:
            store.create(
                folder.scan_id,
                total,
                manifest_name,
                callback_url,
                owner,
                stored,
                catalogue,
                extra,
            )
        except redis.RedisError as exc:
            raise QueueUnavailableError(
                f"the scan store is unavailable ({type(exc).__name__})"
            ) from exc
        try:
            send_slice(celery, folder.scan_id)
        except Exception as exc:
            store.discard(folder.scan_id)
            raise QueueUnavailableError(
                f"the scan queue is unavailable ({type(exc).__name__})"
            ) from exc
    except BaseException:
        folder.remove()
        raise
    return folder.scan_id, total
