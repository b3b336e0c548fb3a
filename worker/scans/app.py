"""The scan coordinator's Celery app: slices of scans, and signed webhooks on a consumer
of their own (``worker/scans/webhooks.py``).

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
from shared.settings import get_settings
from shared.submit import send_slice
from shared.wire import TASK_JOB_WEBHOOK, TASK_SCAN, TASK_SCAN_WEBHOOK, WEBHOOK_QUEUE
from worker.broker import worker_celery
from worker.reaper import Reaper
from worker.scans.coordinator import Coordinator, remove_expired_scans
from worker.scans.resolver import RowResolver
from worker.scans.webhooks import WebhookConsumer

logger = logging.getLogger(__name__)

settings = get_settings()
app = worker_celery(settings)  # kombu patched, Celery's consumer ours: worker/broker.py


@cache
def coordinator() -> Coordinator:
    """The process's coordinator (Redis clients built once)."""
    clients = wiring.sync_redis(settings)
    return Coordinator(
        settings,
        wiring.stores(settings, sync=clients),
        RowResolver(settings, wiring.keys(settings), clients.cache, wiring.url_policy(settings)),
        app,
    )


@worker_init.connect
def _start_reaper(**_: Any) -> None:
    """Coordinators reap too: any live process heals what a dead one left."""
    coord = coordinator()
    Reaper(settings, coord.stores, app).start()
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
    # "lost": the lock ran out mid-slice (this process frozen past its life) and another
    # coordinator holds the scan now; its slices go on, so nothing is sent from here.
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


# Deliveries run on the webhook queue's own consumer and threads (worker/scans/webhooks.py),
# never on the threads that run scan slices. These tasks only take the messages an
# older version queued on the scans queue, and move them there.


@app.task(name=TASK_SCAN_WEBHOOK, acks_late=True)
def send_callback(scan_id: str, delivery_id: str = "") -> str:
    """A scan callback queued on the scans queue: moved to the webhook queue."""
    return _to_webhook_queue(TASK_SCAN_WEBHOOK, [scan_id, delivery_id])


@app.task(name=TASK_JOB_WEBHOOK, acks_late=True)
def send_job_callback(job_id: str, url: str, delivery_id: str) -> str:
    """A job webhook queued on the scans queue: moved to the webhook queue."""
    return _to_webhook_queue(TASK_JOB_WEBHOOK, [job_id, url, delivery_id])


def _to_webhook_queue(name: str, args: list[str]) -> str:
    app.send_task(name, args=args, queue=WEBHOOK_QUEUE, retry=True, ignore_result=True)
    return f"moved to {WEBHOOK_QUEUE}"


# The webhook queue's consumer, with threads of its own, in this same process.
app.steps["consumer"].add(WebhookConsumer)
