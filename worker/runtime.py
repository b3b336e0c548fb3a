"""What one worker process holds: the model, the batcher, Redis clients, a heartbeat.

Built once per process, after the worker has started (never at import), by the
Celery signal in ``worker/app.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from shared.embedded import redis_urls
from shared.keys import Keys
from shared.settings import Settings
from worker.batcher import Batcher
from worker.ofa.entail import Entailer, Prepared, Verdict

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0


@dataclass
class Runtime:
    """The per-process state every task uses."""

    settings: Settings
    entailer: Entailer
    durable: redis.Redis
    cache: redis.Redis
    keys: Keys
    batcher: Batcher[Prepared, Verdict]
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def model_tag(self) -> tuple[str, str]:
        """(id, revision) this worker serves."""
        return self.settings.model_tag

    @classmethod
    def start(cls, settings: Settings) -> Runtime:
        """Load the model, start the batcher and the heartbeat."""
        durable_url, cache_url = redis_urls(settings)
        t0 = time.perf_counter()
        entailer = Entailer.load(
            settings.model_ref,
            revision=None if settings.model_dir else settings.model_revision,
            cache_dir=str(settings.model_cache_dir) if settings.model_cache_dir else None,
            device=settings.device,
            dtype=settings.dtype,
            max_pixels=settings.max_pixels,
        )
        logger.info(
            "model %s@%s loaded from %s on %s in %.1fs",
            *settings.model_tag,
            settings.model_ref,
            entailer.device,
            time.perf_counter() - t0,
        )
        durable = redis.Redis.from_url(durable_url, health_check_interval=30)
        cache = durable if cache_url == durable_url else redis.Redis.from_url(cache_url)
        keys = Keys(settings.key_prefix)

        def record_batch(size: int, seconds: float) -> None:
            stats = keys.prefix + "stats:batches"
            try:
                durable.hincrby(stats, "batches", 1)
                durable.hincrby(stats, "items", size)
            except redis.RedisError:
                logger.warning("could not record batch statistics")
            logger.debug("batch of %d in %.3fs", size, seconds)

        def run_batch(items: Sequence[Prepared]) -> list[Verdict]:
            return entailer.score(items)

        batcher: Batcher[Prepared, Verdict] = Batcher(
            run_batch, settings.batch_size, settings.batch_wait_ms / 1000, record_batch
        )
        rt = cls(settings, entailer, durable, cache, keys, batcher)
        threading.Thread(target=rt._heartbeat, name="heartbeat", daemon=True).start()
        return rt

    def _heartbeat(self) -> None:
        """Announce this worker (and its model) for the API's readiness check."""
        key = self.keys.workers(*self.model_tag)
        while not self._stop.is_set():
            try:
                now = time.time()
                pipe = self.durable.pipeline()
                pipe.zadd(key, {self.name: now})
                pipe.zremrangebyscore(key, 0, now - 6 * HEARTBEAT_S)
                pipe.expire(key, int(10 * HEARTBEAT_S))
                pipe.execute()
            except redis.RedisError as exc:
                logger.warning("heartbeat failed: %s", exc)
            self._stop.wait(HEARTBEAT_S)

    def stop(self) -> None:
        """Stop the heartbeat, withdraw from the worker set, finish queued batches."""
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.durable.zrem(self.keys.workers(*self.model_tag), self.name)
        self.batcher.close()


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The process's runtime, started on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            from shared.settings import get_settings

            _runtime = Runtime.start(settings or get_settings())
        return _runtime


def stop_runtime() -> None:
    """Tear the runtime down (worker shutdown)."""
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.stop()
            _runtime = None
