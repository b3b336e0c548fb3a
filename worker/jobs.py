"""Running jobs, alone or together (a scan's chunk, a group of interactive messages):
the domain logic behind the worker's consumers.

Every message is handled idempotently (``JobStore.start`` decides): a finished job,
a vanished one, or one another worker holds a live lease on is left alone; a job whose
verdict is cached finishes without computing. A job's image is read from the payload
store (or, for a scan row named by an object URL or a shared file, from there:
``read_payload``); an unreachable store puts the job back, a missing image fails it.
Input the model can never accept fails the job at once; any other error puts it back
to queued for the reaper to send again (``retry_later``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis
from celery.exceptions import Reject

from shared.errors import BadInputError, PayloadStoreUnavailable
from shared.keys import job_key_matches, payload_name
from shared.models import ScanStatus, Verdict
from shared.objects import (
    ObjectNotFound,
    ObjectStorage,
    ObjectStoreError,
    ObjectStoreUnavailable,
    is_object_url,
)
from shared.scans.manifest import file_under
from shared.store import StartAction, Started
from shared.submit import send_hooks
from shared.wire import EntailTask
from worker import tracing
from worker.ofa.entail import Prediction, Prepared
from worker.runtime import Runtime, make_verdict

logger = logging.getLogger(__name__)

# Bulk chunks prepared at once: one core is always left to interactive jobs (on a
# 2-core machine, one chunk at a time; on a GPU host's many cores, many).
BULK_PREPARE = threading.BoundedSemaphore(max(1, (os.cpu_count() or 1) - 1))
# A group's images are read this many at a time (an object store or a network volume
# answers each in milliseconds; side by side, a chunk waits for a few).
READ_THREADS = 8
_READ_POOL: ThreadPoolExecutor | None = None
_READ_POOL_LOCK = threading.Lock()

IMAGE_GONE = "the image expired before a worker could take the job"
# A reference that starts so names a file under a shared OFA_IMAGE_ROOT.
FILE_REFERENCE = "file:"
# Reading an image may fail for a while (the store unreachable): the job is put back.
TRANSIENT_READ_ERRORS = (PayloadStoreUnavailable, ObjectStoreUnavailable, OSError)
# An image's store unreachable: the job waits for it without using up its attempts.
STORE_UNREACHABLE = (PayloadStoreUnavailable, ObjectStoreUnavailable)


def fail(rt: Runtime, msg: EntailTask, error: str) -> None:
    """Fail the job for good; the next identical submission may try again."""
    send_hooks(rt.celery, msg.job_id, rt.jobs.fail(msg.job_id, msg.key, error))
    logger.info("job %s failed: %s", msg.job_id, error)


def ensure_ours(rt: Runtime, model: str, revision: str) -> None:
    """Raise ``Reject`` (back on the queue, for a worker serving that model) for
    another model's message."""
    if (model, revision) != rt.model_tag:
        raise Reject(f"this worker serves {rt.model_tag}, not {(model, revision)}", True)


def scan_cancelled(rt: Runtime, scan_id: str) -> bool:
    return rt.scans.status(scan_id) == ScanStatus.CANCELLED


def cancelled_alone(rt: Runtime, msg: EntailTask, cancelled: bool) -> bool:
    """Fail the job of a cancelled scan unless someone else joined it; True if failed."""
    if cancelled and not rt.reads.is_shared(msg.job_id):
        fail(rt, msg, "scan cancelled")
        return True
    return False


def after_start(rt: Runtime, msg: EntailTask, started: Started) -> Verdict | str | None:
    """What ``JobStore.start`` decided, carried out: the verdict when cached, where the
    image is (``Started.payload``, for ``read_payload``) when the item must be prepared
    and scored, None when nothing is left to do."""
    if started.action == StartAction.POISON:
        fail(rt, msg, f"gave up after {started.attempts - 1} attempts that did not finish")
        return None
    if started.action != StartAction.RUN:
        return None  # finished, gone, or running elsewhere
    if started.cached is not None:
        hooks = rt.jobs.succeed(msg.job_id, msg.key, started.cached, cached=True)
        send_hooks(rt.celery, msg.job_id, hooks)
        return Verdict.model_validate_json(started.cached)
    if started.payload is None:
        fail(rt, msg, IMAGE_GONE)
        return None
    return started.payload


def read_payload(rt: Runtime, msg: EntailTask, reference: str) -> bytes | None:
    """A job's image: its own payload (``reference`` '': by ``payload_name``), a scan
    row's object (an object URL) or file (``file:`` under ``OFA_IMAGE_ROOT``), at most
    the upload limit; None when it is gone. Raises ``TRANSIENT_READ_ERRORS`` while the
    store cannot be read, ``ObjectStoreError`` or ``ValueError`` for a reference that
    can never be read."""
    limit = rt.settings.max_upload_bytes
    if reference == "":
        return rt.jobs.payloads.get(payload_name(msg.key, msg.job_id))
    if reference.startswith(FILE_REFERENCE):
        name = reference.removeprefix(FILE_REFERENCE)
        try:
            path = file_under(rt.settings.image_root, name, "image", "OFA_IMAGE_ROOT")
        except ValueError:
            if rt.settings.image_root is not None and not os.path.exists(name):
                return None  # removed since the scan read it
            raise
        with open(path, "rb", buffering=0) as f:
            data = f.read(min(os.fstat(f.fileno()).st_size, limit) + 1)
        if len(data) > limit:
            raise ValueError(f"the image file is larger than {limit} bytes")
        return data
    if is_object_url(reference):
        if rt.objects is None:
            rt.objects = ObjectStorage.from_settings(rt.settings)
        try:
            body, _ = rt.objects.read_bytes(reference, limit)
        except ObjectNotFound:
            return None
        return body
    raise ValueError(f"not an image reference: {reference[:80]!r}")


def _read_pool() -> ThreadPoolExecutor:
    global _READ_POOL
    with _READ_POOL_LOCK:
        if _READ_POOL is None:
            _READ_POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="payload-read")
        return _READ_POOL


def read_payloads(
    rt: Runtime, items: Sequence[tuple[EntailTask, str]]
) -> list[bytes | Exception | None]:
    """``read_payload`` for each (message, reference), side by side when there are
    several; each item's error is its own (returned, not raised)."""

    def one(item: tuple[EntailTask, str]) -> bytes | Exception | None:
        try:
            return read_payload(rt, *item)
        except Exception as exc:
            return exc

    if len(items) <= 1:
        return [one(item) for item in items]
    return list(_read_pool().map(one, items))


def image_or_fail(rt: Runtime, msg: EntailTask, got: bytes | Exception | None) -> bytes | None:
    """The image ``read_payloads`` got, or None after failing the job for good (gone,
    unreadable, or not the bytes its key names). Raises what can pass (the store
    unreachable): the caller puts the job back."""
    if isinstance(got, TRANSIENT_READ_ERRORS) and not isinstance(got, FileNotFoundError):
        raise got
    if isinstance(got, FileNotFoundError) or got is None:
        logger.warning("job %s: its image is gone", msg.job_id)
        fail(rt, msg, IMAGE_GONE)
        return None
    if isinstance(got, (ObjectStoreError, ValueError)):
        fail(rt, msg, f"the image could not be read: {got}")
        return None
    if isinstance(got, Exception):
        raise got
    return got if image_matches_key(rt, msg, got) else None


KEY_MISMATCH = (
    "the image does not hash to the job's key (its bytes changed after the key was "
    "computed); it was not scored and nothing was cached"
)


def image_matches_key(rt: Runtime, msg: EntailTask, image: bytes) -> bool:
    """Whether the bytes about to be scored are the ones the job's key names
    (``shared.keys.job_key_matches``, under the model this worker runs); if not, the
    job fails for good and False: a verdict is stored only under the digest of the
    exact bytes the model scored, whoever wrote the blob (~0.1 ms per 160 KB JPEG)."""
    model_id, revision = rt.model_tag
    if job_key_matches(msg.key, model_id, revision, image, msg.text, msg.premise, msg.tenant):
        return True
    logger.warning("job %s: its image does not hash to its key %s", msg.job_id, msg.key)
    fail(rt, msg, KEY_MISMATCH)
    return False


def prepared_or_fail(
    rt: Runtime,
    msg: EntailTask,
    got: Future[Any] | bytes,
    source: list[int] | BadInputError | None = None,
) -> Prepared | None:
    """The item ready for the batcher (decoded here, or by a preprocessing process whose
    future ``got`` is; ``source``: its prompt ids when tokenised with the others, or
    why its text was refused), or None after failing the job for bad input."""
    try:
        if isinstance(source, BadInputError):
            raise source
        if isinstance(got, bytes):
            return rt.entailer.prepare(got, msg.text, msg.premise, source)
        return rt.entailer.prepare_resized(got.result(), msg.text, msg.premise, source)
    except BadInputError as exc:
        fail(rt, msg, f"{exc.title}: {exc.detail}")
        return None


class Handled(NamedTuple):
    """What became of one message's job: ``scored`` (by the model) or ``cached`` (the
    verdict was known), both with the verdict; ``skipped`` (finished, gone, running
    elsewhere, or failed here for good) or ``retried`` (back to queued), without."""

    kind: str
    verdict: Verdict | None = None


def run_job(rt: Runtime, msg: EntailTask, headers: Mapping[str, Any] | None = None) -> Handled:
    """One job alone (the ``ofa.entail`` task's body: a job the reaper sent again),
    at its own priority. Idempotent: a message for a finished job, or for one another
    worker holds a live lease on, does nothing. ``headers``: its message's (the trace
    it continues)."""
    return run_many(rt, [msg], 1 if msg.bulk else 0, None if headers is None else [headers])[0]


def run_chunk(rt: Runtime, msgs: list[EntailTask]) -> dict[str, int]:
    """A scan's chunk (bulk priority); counts of each outcome, for the task's summary."""
    counts = dict.fromkeys(("scored", "cached", "skipped", "retried"), 0)
    for outcome in run_many(rt, msgs, 1):
        counts[outcome.kind] += 1
    return counts


def run_many(
    rt: Runtime,
    msgs: Sequence[EntailTask],
    priority: int,
    headers: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[Handled]:
    """Jobs taken together, waited for in this thread: ``submit_many`` then
    ``finish_many``. Returns each message's outcome, in order."""
    group = submit_many(rt, msgs, priority, headers)
    return finish_many(rt, [group], rt.settings.task_soft_time_limit_s)[0]


@dataclass
class ScoringGroup:
    """Jobs handed to the batcher together (``submit_many``), until ``finish_many``
    records them: the outcomes known so far, the futures still to come, the leases
    held meanwhile."""

    size: int
    outcomes: dict[int, Handled]
    waiting: list[tuple[int, EntailTask, Future[Prediction]]]
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    # Each job's spans (worker/tracing.py) by position; empty while tracing is off.
    traces: list[tracing.JobTrace | None] = field(default_factory=list)

    def traceparent(self, i: int) -> str | None:
        """The job span of the ``i``-th job, for its webhooks; None if untraced."""
        job = self.traces[i] if self.traces else None
        return None if job is None else job.traceparent()


def submit_many(
    rt: Runtime,
    msgs: Sequence[EntailTask],
    priority: int,
    headers: Sequence[Mapping[str, Any] | None] | None = None,
) -> ScoringGroup:
    """Jobs taken together: a scan's chunk (``priority`` 1), or the interactive
    messages that arrived at once (0, ``worker/groups.py``). Each taken and prepared,
    all handed to the batcher at once (so they fill batches; bulk work behind any
    interactive work), their leases held from their start until ``finish_many``. One
    item's error never touches the others: it goes back to queued (``retry_later``) or
    fails alone. Scan jobs are dropped when their scan is cancelled, unless someone
    else joined them.
    ``headers``: the messages' headers, in order: each job continues the trace its
    message carries (with tracing on)."""
    traces = tracing.taken([m.job_id for m in msgs], headers) if headers else []
    outcomes: dict[int, Handled] = {}
    cancelled = {sid for sid in {m.scan_id for m in msgs if m.scan_id} if scan_cancelled(rt, sid)}
    live: list[tuple[int, EntailTask]] = []
    for i, msg in enumerate(msgs):
        if cancelled_alone(rt, msg, msg.scan_id in cancelled):
            outcomes[i] = Handled("skipped")
        else:
            live.append((i, msg))
    try:
        started = rt.jobs.start_many([(m.job_id, m.key) for _, m in live]) if live else []
    except Exception as exc:
        for i, msg in live:
            retry_later(rt, msg, exc)
            outcomes[i] = Handled("retried")
        started = []
        live = []
    # Each job taken is held (its lease renewed) from here until it is recorded, whatever
    # step it is in: waiting for the bulk preparation slot and decoding its image can
    # outlast a lease on a busy host, and a lease run out sends the job again.
    running = zip(live, started, strict=True)
    held = rt.leases.hold(m.job_id for (_, m), took in running if took.action == StartAction.RUN)
    to_read: list[tuple[int, EntailTask, str]] = []
    for (i, msg), took in zip(live, started, strict=True):
        try:
            got = after_start(rt, msg, took)
        except Exception as exc:
            retry_later(rt, msg, exc)
            outcomes[i] = Handled("retried")
            continue
        if isinstance(got, str):
            to_read.append((i, msg, got))
        else:
            outcomes[i] = Handled("skipped") if got is None else Handled("cached", got)
    images: list[tuple[int, EntailTask, bytes]] = []
    read = read_payloads(rt, [(msg, ref) for _, msg, ref in to_read])
    for (i, msg, _), payload in zip(to_read, read, strict=True):
        try:
            image = image_or_fail(rt, msg, payload)
        except Exception as exc:  # the store unreachable: back to queued, tried again
            retry_later(rt, msg, exc)
            outcomes[i] = Handled("retried")
            continue
        if image is None:  # failed for good: nothing scored, nothing cached
            outcomes[i] = Handled("skipped")
        else:
            images.append((i, msg, image))
    todo: list[tuple[int, EntailTask, Prepared]] = []
    # Bulk work prepares at most cores - 1 chunks at a time: an interactive job's
    # thread competes with that many bulk threads, not with every chunk being scored.
    # (With a preprocessing pool, the pool's size bounds that work instead, and every
    # bulk thread keeps a chunk queued for it.) Only the preparing counts: a chunk's
    # round trips to Redis run outside that limit.
    with (
        BULK_PREPARE if priority and rt.pool is None else contextlib.nullcontext(),
        held.on_error(),
    ):
        # With a preprocessing pool, its processes decode the images side by side.
        decoded = rt.decode_many([blob for _, _, blob in images])
        sources = source_ids_many(rt, [msg for _, msg, _ in images])
        for (i, msg, _), blob, source in zip(images, decoded, sources, strict=True):
            try:
                item = prepared_or_fail(rt, msg, blob, source)
            except Exception as exc:
                retry_later(rt, msg, exc)
                outcomes[i] = Handled("retried")
                continue
            if item is None:
                outcomes[i] = Handled("skipped")
            else:
                todo.append((i, msg, item))
    group = ScoringGroup(len(msgs), outcomes, [], traces=traces)
    held.keep_only(msg.job_id for _, msg, _ in todo)  # the others ended, or went back
    group.held.enter_context(held)
    if traces:
        tracing.handed(rt.batcher, [item for _, _, item in todo], [traces[i] for i, _, _ in todo])
    futures = rt.batcher.submit_many([item for _, _, item in todo], priority)
    group.waiting = [(i, msg, fut) for (i, msg, _), fut in zip(todo, futures, strict=True)]
    return group


def source_ids_many(
    rt: Runtime, msgs: Sequence[EntailTask]
) -> Sequence[list[int] | BadInputError | None]:
    """The items' prompt ids, tokenised together; Nones (each item tokenised alone, by
    ``prepare``) if that fails as a whole."""
    try:
        return rt.entailer.text.source_ids_many([(m.text, m.premise) for m in msgs])
    except Exception as exc:
        logger.warning("tokenising %d texts together failed (%s); one at a time", len(msgs), exc)
        return [None] * len(msgs)


def finish_many(rt: Runtime, groups: Sequence[ScoringGroup], timeout: float) -> list[list[Handled]]:
    """Wait up to ``timeout`` for the jobs ``submit_many`` handed to the batcher (one
    group of them, or several the batcher answered together) and record their verdicts
    in one round trip (one that failed or did not come in time goes back to queued);
    release their leases. Returns each group's outcomes, in order."""
    with contextlib.ExitStack() as held:
        for group in groups:
            held.enter_context(group.held)
        deadline = time.monotonic() + timeout
        scored: list[tuple[ScoringGroup, int, EntailTask, Verdict]] = []
        for group in groups:
            for i, msg, future in group.waiting:
                try:
                    prediction = future.result(timeout=max(0.0, deadline - time.monotonic()))
                    verdict = make_verdict(prediction, rt.model_tag, msg.key)
                    scored.append((group, i, msg, verdict))
                except Exception as exc:
                    retry_later(rt, msg, exc)
                    group.outcomes[i] = Handled("retried")
        if scored:
            try:  # every verdict recorded in one round trip
                hooks = rt.jobs.succeed_many([(m.job_id, m.key, v) for _, _, m, v in scored])
            except Exception as exc:
                for group, i, msg, _ in scored:
                    retry_later(rt, msg, exc)
                    group.outcomes[i] = Handled("retried")
            else:
                for (group, i, msg, verdict), theirs in zip(scored, hooks, strict=True):
                    send_hooks(rt.celery, msg.job_id, theirs, group.traceparent(i))
                    group.outcomes[i] = Handled("scored", verdict)
    for group in groups:
        for i, job in enumerate(group.traces):
            if job is not None:
                job.end(group.outcomes[i].kind)
    return [[f.outcomes[i] for i in range(f.size)] for f in groups]


def summary(outcome: Handled, job_id: str) -> str:
    """A one-line summary of a job's outcome: Celery's task events carry it, so
    Flower's task pages show each job's verdict (the job record stays the source of
    truth)."""
    if outcome.verdict is None:
        if outcome.kind == "retried":
            return "retrying later (see the worker's log)"
        return f"no new verdict (finished, failed or taken elsewhere): GET /v1/jobs/{job_id}"
    v, p = outcome.verdict, outcome.verdict.probabilities
    return (
        f"{v.label} ({v.answer}) entailment={p.entailment:.3f} "
        f"contradiction={p.contradiction:.3f} neutral={p.neutral:.3f}"
    )


def retry_later(rt: Runtime, msg: EntailTask, exc: Exception) -> None:
    """A transient failure: the job goes back to queued and the reaper sends it again
    after a backoff (counted against ``max_attempts``, unless the job only waited on
    its image's store: ``JobStore.release``). No broker retry is involved, so an
    unreachable broker loses nothing; if Redis itself is unreachable, the job's lease
    runs out and the reaper takes it up all the same."""
    waiting = isinstance(exc, STORE_UNREACHABLE)
    try:
        backoff = rt.jobs.release(msg.job_id, waiting_on_store=waiting)
        logger.warning("job %s: %s; sent again in %.0fs", msg.job_id, exc, backoff)
    except redis.RedisError as again:
        logger.warning("job %s: %s; left to its lease (%s)", msg.job_id, exc, again)
