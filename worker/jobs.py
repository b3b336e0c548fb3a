"""Running one job: the domain logic behind the Celery task.

Every message is handled idempotently (``JobStore.start`` decides): a finished job,
a vanished one, or one another worker holds a live lease on is left alone; a job whose
verdict is cached finishes without computing. Input the model can never accept fails
the job at once; any other error puts it back to queued for the reaper to send again
(``retry_later``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import Future
from typing import Any

import redis

from shared.errors import BadInputError
from shared.messages import EntailTask, ScanStatus, Verdict
from shared.store import StartAction, Started
from shared.submit import send_hooks
from worker.ofa.entail import Prediction, Prepared
from worker.runtime import Runtime, make_verdict

logger = logging.getLogger(__name__)

# Bulk chunks prepared at once: one core is always left to interactive jobs (on a
# 2-core machine, one chunk at a time; on a GPU host's many cores, many).
BULK_PREPARE = threading.BoundedSemaphore(max(1, (os.cpu_count() or 1) - 1))


def fail(rt: Runtime, msg: EntailTask, error: str) -> None:
    """Fail the job for good; the next identical submission may try again."""
    send_hooks(rt.celery, msg.job_id, rt.jobs.fail(msg.job_id, msg.key, error))
    logger.info("job %s failed: %s", msg.job_id, error)


def begin(rt: Runtime, msg: EntailTask) -> Verdict | Prepared | None:
    """Take the job: the verdict when it is already known (cached), the prepared item
    when it must be scored, None when there is nothing to do (finished, gone, running
    elsewhere, or failed here: a cancelled scan, a poison job, bad input)."""
    if cancelled_alone(rt, msg, msg.scan_id is not None and scan_cancelled(rt, msg.scan_id)):
        return None
    got = after_start(rt, msg, rt.jobs.start(msg.job_id, msg.key))
    if not isinstance(got, bytes):
        return got
    return prepared_or_fail(rt, msg, rt.decode(got))


def scan_cancelled(rt: Runtime, scan_id: str) -> bool:
    return rt.scans.status(scan_id) == ScanStatus.CANCELLED


def cancelled_alone(rt: Runtime, msg: EntailTask, cancelled: bool) -> bool:
    """Fail the job of a cancelled scan unless someone else joined it; True if failed."""
    if cancelled and not rt.jobs.is_shared(msg.job_id):
        fail(rt, msg, "scan cancelled")
        return True
    return False


def after_start(rt: Runtime, msg: EntailTask, started: Started) -> Verdict | bytes | None:
    """What ``JobStore.start`` decided, carried out: the verdict when cached, the image
    bytes when the item must be prepared and scored, None when nothing is left to do."""
    if started.action == StartAction.POISON:
        fail(rt, msg, f"gave up after {started.attempts - 1} attempts that did not finish")
        return None
    if started.action != StartAction.RUN:
        return None  # finished, gone, or running elsewhere
    if started.cached is not None:
        hooks = rt.jobs.succeed(msg.job_id, msg.key, started.cached, cached=True)
        send_hooks(rt.celery, msg.job_id, hooks)
        return Verdict.model_validate_json(started.cached)
    if started.blob is None:
        fail(rt, msg, "the image expired before a worker could take the job")
        return None
    return started.blob


def prepared_or_fail(rt: Runtime, msg: EntailTask, got: Future[Any] | bytes) -> Prepared | None:
    """The item ready for the batcher (decoded here, or by a preprocessing process whose
    future ``got`` is), or None after failing the job for bad input."""
    try:
        if isinstance(got, bytes):
            return rt.entailer.prepare(got, msg.text, msg.premise)
        return rt.entailer.prepare_resized(got.result(), msg.text, msg.premise)
    except BadInputError as exc:
        fail(rt, msg, f"{exc.title}: {exc.detail}")
        return None


def finish(rt: Runtime, msg: EntailTask, prediction: Prediction) -> Verdict:
    """Record the model's answer: the verdict cached, the job succeeded, its webhooks
    queued."""
    verdict = make_verdict(prediction, rt.model_tag, msg.key)
    send_hooks(rt.celery, msg.job_id, rt.jobs.succeed(msg.job_id, msg.key, verdict, cached=False))
    return verdict


def run_job(rt: Runtime, msg: EntailTask) -> Verdict | None:
    """Compute (or find) the verdict for one job and record it; None when there was
    nothing to do or the job failed. Idempotent: a message for a finished job, or for
    one another worker holds a live lease on, does nothing. Scan jobs yield to
    interactive ones in the batcher and are dropped when their scan is cancelled,
    unless someone else joined them."""
    got = begin(rt, msg)
    if not isinstance(got, Prepared):
        return got
    priority = 1 if msg.bulk else 0
    with rt.leases.holding(msg.job_id):
        prediction = rt.batcher.submit(got, priority).result(
            timeout=rt.settings.task_soft_time_limit_s
        )
    return finish(rt, msg, prediction)


def run_chunk(rt: Runtime, msgs: list[EntailTask]) -> dict[str, int]:
    """A chunk of scan jobs: each taken and prepared, all handed to the batcher at once
    (so they fill batches, behind any interactive work), each finished on its own. One
    item's error never touches the others: it goes back to queued (``retry_later``)
    or fails alone. Returns counts for the task's summary."""
    counts = {"scored": 0, "cached": 0, "skipped": 0, "retried": 0}
    todo: list[tuple[EntailTask, Prepared]] = []
    cancelled = {sid for sid in {m.scan_id for m in msgs if m.scan_id} if scan_cancelled(rt, sid)}
    live: list[EntailTask] = []
    for msg in msgs:
        if cancelled_alone(rt, msg, msg.scan_id in cancelled):
            counts["skipped"] += 1
        else:
            live.append(msg)
    # Chunks prepare at most cores - 1 at a time: an interactive job's thread competes
    # with that many bulk threads, not with every chunk in flight.
    with BULK_PREPARE:
        try:
            started = rt.jobs.start_many([(m.job_id, m.key) for m in live])
        except Exception as exc:
            for msg in live:
                retry_later(rt, msg, exc)
            counts["retried"] += len(live)
            return counts
        blobs: list[tuple[EntailTask, Future[Any] | bytes]] = []
        for msg, took in zip(live, started, strict=True):
            try:
                got = after_start(rt, msg, took)
            except Exception as exc:
                retry_later(rt, msg, exc)
                counts["retried"] += 1
                continue
            if isinstance(got, bytes):  # decoded by the pool's processes side by side
                blobs.append((msg, rt.decode(got)))
            else:
                counts["cached" if got is not None else "skipped"] += 1
        for msg, blob in blobs:
            try:
                item = prepared_or_fail(rt, msg, blob)
            except Exception as exc:
                retry_later(rt, msg, exc)
                counts["retried"] += 1
                continue
            if item is None:
                counts["skipped"] += 1
            else:
                todo.append((msg, item))
    with contextlib.ExitStack() as held:
        for msg, _ in todo:
            held.enter_context(rt.leases.holding(msg.job_id))
        futures = [(msg, rt.batcher.submit(item, 1)) for msg, item in todo]
        scored: list[tuple[EntailTask, Verdict]] = []
        for msg, future in futures:
            try:
                prediction = future.result(timeout=rt.settings.task_soft_time_limit_s)
                scored.append((msg, make_verdict(prediction, rt.model_tag, msg.key)))
            except Exception as exc:
                retry_later(rt, msg, exc)
                counts["retried"] += 1
        if scored:
            try:  # every verdict recorded in one transaction
                hooks = rt.jobs.succeed_many([(m.job_id, m.key, v) for m, v in scored])
            except Exception as exc:
                for msg, _ in scored:
                    retry_later(rt, msg, exc)
                counts["retried"] += len(scored)
            else:
                for (msg, _), theirs in zip(scored, hooks, strict=True):
                    send_hooks(rt.celery, msg.job_id, theirs)
                counts["scored"] += len(scored)
    return counts


def retry_later(rt: Runtime, msg: EntailTask, exc: Exception) -> None:
    """A transient failure: the job goes back to queued and the reaper sends it again
    after a backoff (counted against ``max_attempts``). No broker retry is involved, so
    an unreachable broker loses nothing; if Redis itself is unreachable, the job's
    lease runs out and the reaper takes it up all the same."""
    try:
        backoff = rt.jobs.release(msg.job_id)
        logger.warning("job %s: %s; sent again in %.0fs", msg.job_id, exc, backoff)
    except redis.RedisError as again:
        logger.warning("job %s: %s; left to its lease (%s)", msg.job_id, exc, again)
