"""The reaper: the job record is the source of truth, the broker is a hint.

Every worker and coordinator runs one in a thread; a lock lets one act per period.
Each pass takes the jobs past their deadline (a queued job whose message never got to
a worker, or a running job whose worker stopped renewing its lease) and sends them
again; a job started ``max_attempts`` times without finishing, or sent
``max_dispatches`` times without ever starting, fails with a clear error and frees its
key. Scans whose coordinator went quiet get their next slice sent again. Every
handler on the other end is idempotent, so a message sent twice costs nothing.

A queued job's message can also be lost long before its dispatch deadline: kombu pops
a message with BRPOP and only then enters it in its unacked hash, so a worker that
dies in between (frozen, then killed, with its BRPOP answered) takes the message with
it. Each pass therefore also looks for queued jobs whose message is nowhere: not on
its queue, not in the unacked hash (``JobReaping.lost_messages``), looked for twice
``LOST_CONFIRM_S`` apart so that a message on its way between the two is not taken for
lost, and sends them again at once, counted as a send like any other.

The pass also sweeps the payload store (``JobStore.sweep_payloads``, at most once per
``PAYLOAD_SWEEP_EVERY_S`` in a process): images older than the blob lifetime, and
those older than ``ORPHAN_GRACE_S`` whose job is not unfinished (written by a
submission that crashed before its record, or left by a job's end whose removal
failed). Redis-backed payloads expire by themselves and sweep nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import redis
from celery import Celery

from shared.errors import PayloadStoreUnavailable
from shared.models import JobStatus
from shared.settings import Settings
from shared.submit import message_of, send_hooks, send_job, send_slice
from shared.wire import queue_name
from shared.wiring import Stores
from worker.broker import OperationalError

logger = logging.getLogger(__name__)

# A job whose message was missing from every place it can be is looked for again this
# much later before it is sent again: a worker takes a message off its queue and
# enters it in kombu's unacked hash within milliseconds, so one that is still missing
# a second later is lost.
LOST_CONFIRM_S = 1.0
# A payload is written just before its job's record (milliseconds apart, or a WAITAOF
# later): one this old without an unfinished job was orphaned by a crash, or by a
# removal that failed, never by a submission still on its way.
ORPHAN_GRACE_S = 300.0
# Listing a folder or a bucket prefix every reaper period would cost more than what
# it frees; orphans are rare and small.
PAYLOAD_SWEEP_EVERY_S = 60.0


class Reaper:
    """Re-sends overdue work; one pass per ``reaper_interval_s`` across all processes."""

    def __init__(self, settings: Settings, stores: Stores, celery: Celery):
        self.settings = settings
        self.jobs = stores.jobs
        self.reaping = stores.reaping
        self.scans = stores.scans
        self.celery = celery
        self.log = stores.reaper_log
        self.token = uuid.uuid4().hex
        # kombu's Redis transport keeps taken, unacknowledged messages in this hash.
        options = celery.conf.broker_transport_options or {}
        self.unacked_key = options.get("global_keyprefix", "") + options.get(
            "unacked_key", "unacked"
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept_at = float("-inf")  # monotonic: this process's last payload sweep

    # -- one pass --------------------------------------------------------------------

    def run_once(self) -> dict[str, int] | None:
        """Reap if this process holds the period's lock; the counts of what it did."""
        if not self.log.take_turn(self.token, self.settings.reaper_interval_s):
            return None
        done = {"resent": 0, "poisoned": 0, "scans_resent": 0, "lost": 0}
        try:
            done["lost"] = self._reap_lost()
        except Exception:  # the deadlines below still bring such jobs back, later
            logger.exception("the look for lost messages failed")
        done["resent"] += done["lost"]
        for job_id in self.reaping.overdue():
            outcome = self._reap_job(job_id)
            done[outcome] = done.get(outcome, 0) + 1
        for scan_id in self.scans.overdue():
            if self._reap_scan(scan_id):
                done["scans_resent"] += 1
        self.log.record(done)
        if done["resent"] or done["poisoned"] or done["scans_resent"]:
            logger.warning("reaper: %s", done)
        self.sweep_payloads()
        return done

    def sweep_payloads(self, grace_s: float = ORPHAN_GRACE_S, force: bool = False) -> int:
        """Sweep the payload store if this process has not for ``PAYLOAD_SWEEP_EVERY_S``
        (``force``: now); how many payloads went. A store that cannot be reached is
        swept next time."""
        now = time.monotonic()
        if not force and now - self._swept_at < PAYLOAD_SWEEP_EVERY_S:
            return 0
        self._swept_at = now
        try:
            removed = self.jobs.sweep_payloads(grace_s)
        except (PayloadStoreUnavailable, redis.RedisError) as exc:
            logger.warning("payload sweep failed: %s", exc)
            return 0
        if removed:
            logger.warning("reaper: %d orphaned payloads removed", removed)
        return removed

    def _reap_job(self, job_id: str) -> str:
        record = self.jobs.record(job_id)
        status = JobStatus(record["status"]) if record.get("status") else None
        if status is None or status.finished:
            self.reaping.forget(job_id)
            return "forgotten"
        s = self.settings
        # Starts and sends that only waited on the image's store are not tries.
        waits = int(record.get("store_waits", 0))
        attempts = int(record.get("attempts", 0)) - waits
        dispatches = int(record.get("dispatches", 0)) - waits
        if status == JobStatus.RUNNING and attempts >= s.max_attempts:
            error = (
                f"gave up after {attempts} attempts: the worker running this job stopped "
                "each time (a poison input, or a failing worker)"
            )
        elif dispatches >= s.max_dispatches:
            error = f"no worker took this job after {dispatches + 1} sends"
        elif self.jobs.claim_overdue(job_id):  # claim first: never two senders at once
            send_job(self.celery, message_of(job_id, record))
            return "resent"
        else:
            return "moved"  # a worker started it (or it ended) since we looked
        logger.error("job %s: %s", job_id, error)
        send_hooks(self.celery, job_id, self.jobs.fail(job_id, record["key"], error))
        return "poisoned"

    def _reap_lost(self) -> int:
        """Send again, at once, the queued jobs whose message is lost (seen missing
        twice, ``LOST_CONFIRM_S`` apart); returns how many were sent."""
        first = self._lost()
        if not first:
            return 0
        self._stop.wait(LOST_CONFIRM_S)
        sent = 0
        for job_id, record in self._lost([job_id for job_id, _ in first]):
            sends = int(record.get("dispatches", 0)) - int(record.get("store_waits", 0))
            if sends >= self.settings.max_dispatches:
                continue  # its dispatch deadline fails it, as any job sent too often
            if self.reaping.claim_lost(job_id, record):  # nothing happened to it meanwhile
                logger.warning("job %s: its message was lost (taken by a dead worker?)", job_id)
                # The whole record: the message carries whatever it holds (its trace).
                send_job(self.celery, message_of(job_id, self.jobs.record(job_id) or record))
                sent += 1
        return sent

    def _lost(self, only: list[str] | None = None) -> list[tuple[str, dict[str, str]]]:
        return self.reaping.lost_messages(
            lambda r: queue_name(r["model"], r["revision"], bulk=bool(r.get("scan"))),
            self.unacked_key,
            self.settings.lost_message_grace_s,
            only,
        )

    def _reap_scan(self, scan_id: str) -> bool:
        if not self.scans.exists(scan_id):
            self.scans.forget(scan_id)
            return False
        send_slice(self.celery, scan_id)
        self.scans.hold(scan_id, queued=True)
        return True

    # -- the thread ------------------------------------------------------------------

    def start(self) -> None:
        """Run passes in a daemon thread until ``stop``."""
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_s):
            try:
                self.run_once()
            except (redis.RedisError, OSError, OperationalError) as exc:  # down: next time
                logger.warning("reaper pass failed: %s", exc)
            except Exception:
                logger.exception("reaper pass failed")

    def stop(self) -> None:
        """Stop the thread (it finishes its pass)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
