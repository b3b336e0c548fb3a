"""What one worker process holds: the model, the batcher, Redis clients, a heartbeat.

Built once per process, after the worker has started (never at import), by the
Celery signal in ``worker/app.py``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis
from celery import Celery

from shared import wiring
from shared.celery_app import make_celery
from shared.models import ModelRef, Verdict
from shared.objects import ObjectStorage
from shared.settings import Settings
from shared.store import JobReads, JobStore, ScanStore, WorkerRegistry
from worker.batcher import Batcher
from worker.leases import Leases
from worker.ofa import resample
from worker.ofa.entail import Entailer, Prediction, Prepared
from worker.ofa.preprocess import decode_and_resize_many
from worker.reaper import Reaper

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0


def load_entailer(
    settings: Settings, model: str | None = None, device: str | None = None
) -> Entailer:
    """The configured checkpoint on the configured device (``model`` and ``device``
    override the settings: the CLI's ``predict --model --device``)."""
    return Entailer.load(
        model or settings.model_ref,
        revision=None if (model or settings.model_dir) else settings.model_revision,
        cache_dir=str(settings.model_cache_dir) if settings.model_cache_dir else None,
        device=device or settings.device,
        dtype=settings.dtype,
        max_pixels=settings.max_pixels,
    )


def make_verdict(prediction: Prediction, model_tag: tuple[str, str], key: str) -> Verdict:
    """The service's verdict: the model's prediction, which model, which key."""
    model_id, revision = model_tag
    return Verdict.model_validate(
        {**prediction.to_dict(), "model": ModelRef(id=model_id, revision=revision), "key": key}
    )


@dataclass
class Runtime:
    """The per-process state every task uses."""

    settings: Settings
    entailer: Entailer
    redis: wiring.SyncRedis
    jobs: JobStore
    reads: JobReads
    scans: ScanStore
    batcher: Batcher[Prepared, Prediction]
    registry: WorkerRegistry
    leases: Leases
    reaper: Reaper
    celery: Celery  # the worker's own app: what webhooks and the reaper send through
    pool: ProcessPoolExecutor | None = None  # image decoding outside the interpreter lock
    tally: BatchTally | None = None  # model passes counted (tests and benchmarks read them)
    # Scan rows' images named by object URL, read in place (``worker/jobs.py:read_payload``).
    objects: ObjectStorage | None = None
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def model_tag(self) -> tuple[str, str]:
        """(id, revision) this worker serves."""
        return self.settings.model_tag

    @classmethod
    def start(cls, settings: Settings, celery: Celery | None = None) -> Runtime:
        """Load the model, start the batcher, the heartbeat, lease renewal and the
        reaper (which sends messages through ``celery``: the worker's own app)."""
        t0 = time.perf_counter()
        entailer = load_entailer(settings)
        logger.info(
            "model %s@%s loaded from %s on %s in %.1fs",
            *settings.model_tag,
            settings.model_ref,
            entailer.device,
            time.perf_counter() - t0,
        )
        clients = wiring.sync_redis(settings)
        objects = wiring.object_storage(settings)
        payloads = wiring.payload_store(settings, clients, objects)
        stores = wiring.stores(settings, sync=clients, payloads=payloads)
        jobs = stores.jobs

        tally = BatchTally(jobs)

        def record_batch(size: int, seconds: float) -> None:
            tally.add(size, seconds)
            logger.debug("batch of %d in %.3fs", size, seconds)

        def run_batch(items: Sequence[Prepared]) -> list[Prediction]:
            return entailer.score(items)

        batcher: Batcher[Prepared, Prediction] = Batcher(
            run_batch,
            settings.batch_size,
            settings.batch_wait_ms / 1000,
            record_batch,
            bulk_budget_s=settings.bulk_batch_ms / 1000,
        )
        leases = Leases(jobs, settings.lease_s)
        celery = celery or make_celery(settings)
        reaper = Reaper(settings, stores, celery)
        reaper.start()
        pool = None
        if settings.preprocess_processes:
            # spawn: a fork of this threaded process could inherit a held lock.
            pool = ProcessPoolExecutor(
                settings.preprocess_processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=resample.warm_up,
            )
        rt = cls(
            settings,
            entailer,
            clients,
            jobs,
            stores.reads,
            stores.scans,
            batcher,
            stores.workers,
            leases,
            reaper,
            celery,
            pool,
            tally,
            objects,
        )
        threading.Thread(target=rt._heartbeat, name="heartbeat", daemon=True).start()
        rt._probe_file("ready")
        return rt

    def _probe_file(self, name: str) -> None:
        """Touch ``health_dir/name`` (the orchestrator's readiness and liveness probes)."""
        if self.settings.health_dir is None:
            return
        try:
            self.settings.health_dir.mkdir(parents=True, exist_ok=True)
            (self.settings.health_dir / name).touch()
        except OSError as exc:
            logger.warning("could not touch the probe file %s: %s", name, exc)

    def _heartbeat(self) -> None:
        """Announce this worker (and its model) for the API's readiness check."""
        while not self._stop.is_set():
            try:
                self.registry.beat(self.name, HEARTBEAT_S)
            except redis.RedisError as exc:
                logger.warning("heartbeat failed: %s", exc)
            # Alive means this process still runs its loops; a Redis outage is not
            # cured by a restart, so it does not stop the touch.
            self._probe_file("alive")
            self._stop.wait(HEARTBEAT_S)

    def decode_many(self, blobs: Sequence[bytes]) -> list[Future[Any] | bytes]:
        """Start decoding and resizing ``blobs`` (a group's or a chunk's) in the
        preprocessing processes, one call per process with a share of them: a future
        per blob (its result: (R, R, 3) uint8 pixels, or the ``BadInputError``).
        Without a pool, the bytes themselves, for the caller's thread to prepare."""
        if self.pool is None or not blobs:
            return list(blobs)
        shares = min(len(blobs), self.settings.preprocess_processes)
        futures: list[Future[Any]] = [Future() for _ in blobs]
        for n in range(shares):
            part = list(range(n, len(blobs), shares))
            done = self.pool.submit(
                decode_and_resize_many,
                [blobs[i] for i in part],
                self.entailer.max_pixels,
                self.entailer.image_size,
            )
            done.add_done_callback(partial(_fan_out, [futures[i] for i in part]))
        return list(futures)

    def stop(self) -> None:
        """Stop the heartbeat, withdraw from the worker set, finish queued batches."""
        self._stop.set()
        self.reaper.stop()
        with contextlib.suppress(redis.RedisError):
            self.registry.withdraw(self.name)
        self.batcher.close()
        if self.tally is not None:
            self.tally.flush()  # the last batches' passes, not left to the thread
        self.leases.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _fan_out(futures: list[Future[Any]], done: Future[list[Any]]) -> None:
    """A share's results (pixels, or an item's ``BadInputError``) onto its items'
    futures; a share that failed as a whole fails each of them."""
    try:
        results = done.result()
    except BaseException as exc:
        for f in futures:
            f.set_exception(exc)
        return
    for f, got in zip(futures, results, strict=True):
        if isinstance(got, BaseException):
            f.set_exception(got)
        else:
            f.set_result(got)


class BatchTally:
    """Model passes counted in the durable store (``JobStore.record_batch``) by a thread
    of its own: the batcher's thread, which runs every batch, never waits for a round
    trip (it did after every batch, ~9% of a scan's worker samples). Passes counted
    within ``WRITE_EVERY_S`` of each other go together in one write."""

    WRITE_EVERY_S = 0.05  # at most this often: ~20 round trips a second at full speed

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs
        self._lock = threading.Lock()
        self._batches = self._items = 0
        self._busy_s = 0.0  # the passes' time: /metrics shows it as the device's busy time
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="batch-tally", daemon=True).start()

    def add(self, size: int, seconds: float = 0.0) -> None:
        """Count one model pass of ``size`` items that took ``seconds``."""
        with self._lock:
            self._batches += 1
            self._items += size
            self._busy_s += seconds
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.WRITE_EVERY_S)  # the passes of the next moments join this write
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write the passes counted and not written yet (the thread's turn, or a
        stopping worker's last ones)."""
        with self._lock:
            batches, items, busy_s = self._batches, self._items, self._busy_s
            self._batches = self._items = 0
            self._busy_s = 0.0
        if not batches:
            return
        try:
            self._jobs.record_batch(items, batches, busy_s)
        except redis.RedisError:
            logger.warning("could not record batch statistics")


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings, celery: Celery | None = None) -> Runtime:
    """The process's runtime, started on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime.start(settings, celery)
        return _runtime


def stop_runtime() -> None:
    """Tear the runtime down (worker shutdown)."""
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.stop()
            _runtime = None
