"""The scan coordinator's Celery app: slices of scans and signed completion callbacks.

No torch here: run it on any machine with ``ofa-entail coordinator``.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import Any

from celery import Task
from celery.signals import worker_init

from shared import wiring
from shared.celery_app import TASK_CALLBACK, TASK_JOB_CALLBACK, TASK_SCAN, make_celery
from shared.reaper import Reaper
from shared.settings import get_settings
from shared.store import JobStore, ScanStore
from shared.submit import send_slice
from worker.scans.callback import CallbackFailed, deliver, deliver_job
from worker.scans.coordinator import Coordinator, remove_expired_scans
from worker.scans.resolver import RowResolver

logger = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)


@cache
def coordinator() -> Coordinator:
    """The process's coordinator (Redis clients built once)."""
    clients = wiring.sync_redis(settings)
    keys = wiring.keys(settings)
    return Coordinator(
        settings,
        JobStore(settings, keys, clients),
        ScanStore(settings, keys, clients.durable),
        RowResolver(settings, keys, clients.cache, wiring.url_policy(settings)),
        app,
    )


@worker_init.connect
def _start_reaper(**_: Any) -> None:
    """Coordinators reap too: any live process heals what a dead one left."""
    coord = coordinator()
    Reaper(settings, coord.jobs, coord.scans, app).start()
    wiring.freeze_startup_objects()


_last_cleanup = 0.0


@app.task(name=TASK_SCAN, bind=True, acks_late=True)
def run_scan(self: Task, scan_id: str) -> str:
    """One slice of a scan; queues the next slice until the scan is done. At most once
    an hour, a coordinator also removes the folders of expired scans."""
    global _last_cleanup
    coord = coordinator()
    if time.monotonic() - _last_cleanup > 3600:
        _last_cleanup = time.monotonic()
        remove_expired_scans(settings, coord.scans)
    try:
        outcome = coord.run(scan_id)
    except Exception as exc:
        return _slice_crashed(coord, scan_id, exc)
    if outcome == "more":
        send_slice(app, scan_id)
        coord.scans.hold(scan_id, queued=True)
        coord.scans.slice_ok(scan_id)
    elif outcome == "busy":  # another coordinator holds the scan (or a dead one's lock)
        send_slice(app, scan_id, countdown=2)
    return outcome


def _slice_crashed(coord: Coordinator, scan_id: str, exc: Exception) -> str:
    """Try the slice again after a pause; a scan whose slices keep crashing fails (with
    its callback). If Redis itself is down, the scan's deadline runs out and the reaper
    sends the slice again."""
    logger.exception("scan %s: slice crashed", scan_id)
    failures = coord.scans.slice_failed(scan_id)
    if failures >= settings.scan_max_slice_failures:
        coord.fail(scan_id, f"the coordinator failed {failures} times in a row: {exc}")
        return "failed"
    send_slice(app, scan_id, countdown=min(2.0**failures, 60.0))
    coord.scans.hold(scan_id, queued=True)
    return "retry"


def _retry_or_give_up(task: Task, what: str, url: str, exc: CallbackFailed) -> None:
    """After a failed delivery: raise Celery's retry with backoff (1 s, 2 s, 4 s ... up
    to 5 min), or return once ``OFA_CALLBACK_MAX_RETRIES`` retries are spent."""
    retries = task.request.retries
    if retries >= settings.callback_max_retries:
        logger.error("%s: webhook to %s failed for good: %s", what, url, exc)
        return
    logger.warning("%s: webhook to %s failed (%s); retry %d", what, url, exc, retries + 1)
    raise task.retry(exc=exc, countdown=min(2**retries, 300)) from exc


@app.task(name=TASK_CALLBACK, bind=True, acks_late=True)
def send_callback(self: Task, scan_id: str) -> None:
    """POST the scan summary to its callback URL, signed; retried with backoff."""
    scans = coordinator().scans
    summary = scans.summary(scan_id)
    if summary is None or not summary.callback_url or settings.webhook_secret is None:
        return
    secret = settings.webhook_secret.get_secret_value().encode()
    try:
        deliver(summary, summary.callback_url, secret, wiring.url_policy(settings, 0))
    except CallbackFailed as exc:
        _retry_or_give_up(self, f"scan {scan_id}", summary.callback_url, exc)
        scans.callback_failed(scan_id, str(exc))
        return
    scans.callback_delivered(scan_id)


@app.task(name=TASK_JOB_CALLBACK, bind=True, acks_late=True)
def send_job_callback(self: Task, job_id: str, url: str, delivery_id: str) -> str:
    """POST a finished job to a webhook its submitter gave, signed; retried with
    backoff like scan callbacks."""
    job = coordinator().jobs.get(job_id)
    if job is None or settings.webhook_secret is None:
        return "job expired, or no webhook secret: nothing sent"
    secret = settings.webhook_secret.get_secret_value().encode()
    try:
        deliver_job(job, url, delivery_id, secret, wiring.url_policy(settings, 0))
    except CallbackFailed as exc:
        _retry_or_give_up(self, f"job {job_id}", url, exc)
        return f"failed for good: {exc}"
    return f"delivered {delivery_id} to {url}"
