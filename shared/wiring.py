"""The one place that builds things from ``Settings``: Redis clients, the URL policy,
the key names, and the record stores on top of them.

Every Redis client here has connect and read timeouts and a health check, so a
restarted server costs a reconnect, not a hang. The embedded server's URL (written by
``ofa-entail up``) is resolved once, in ``redis_urls``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from shared.fetch import UrlPolicy
from shared.keys import Keys
from shared.settings import Settings

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0
HEALTH_CHECK_S = 30
EMBEDDED_URL_FILE = "redis.url"


def redis_urls(settings: Settings) -> tuple[str, str]:
    """(durable URL, cache URL): the configured ones, else the embedded server's."""
    durable = settings.redis_url
    if not durable:
        marker = settings.data_dir / EMBEDDED_URL_FILE
        if not marker.is_file():
            raise RuntimeError(
                "no Redis configured (OFA_REDIS_URL) and no embedded server running: "
                "start the service with `ofa-entail up`"
            )
        durable = marker.read_text().strip()
    return durable, settings.cache_redis_url or durable


def _sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=READ_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_S,
    )


def _async_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=READ_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_S,
    )


@dataclass(frozen=True)
class SyncRedis:
    """Blocking clients (workers, coordinator, enqueueing from the API's thread pool).
    ``cache`` is ``durable`` itself when both roles share one server."""

    durable: redis.Redis
    cache: redis.Redis

    def close(self) -> None:
        """Close both connection pools."""
        self.durable.close()
        if self.cache is not self.durable:
            self.cache.close()


@dataclass(frozen=True)
class AsyncRedis:
    """Asyncio clients (the API's request handlers)."""

    durable: aioredis.Redis
    cache: aioredis.Redis

    async def aclose(self) -> None:
        """Close both connection pools."""
        await self.durable.aclose()
        if self.cache is not self.durable:
            await self.cache.aclose()


def sync_redis(settings: Settings) -> SyncRedis:
    """Blocking durable and cache clients."""
    durable_url, cache_url = redis_urls(settings)
    durable = _sync_client(durable_url)
    cache = durable if cache_url == durable_url else _sync_client(cache_url)
    return SyncRedis(durable, cache)


def async_redis(settings: Settings) -> AsyncRedis:
    """Asyncio durable and cache clients."""
    durable_url, cache_url = redis_urls(settings)
    durable = _async_client(durable_url)
    cache = durable if cache_url == durable_url else _async_client(cache_url)
    return AsyncRedis(durable, cache)


def url_policy(settings: Settings, max_redirects: int | None = None) -> UrlPolicy:
    """Limits and allow-list for fetching URLs (images; callbacks pass no redirects)."""
    return UrlPolicy(
        timeout_s=settings.url_timeout_s,
        max_redirects=settings.url_max_redirects if max_redirects is None else max_redirects,
        max_bytes=settings.max_upload_bytes,
        allow_hosts=tuple(settings.url_allow_hosts),
    )


def keys(settings: Settings) -> Keys:
    """Redis key names under the configured prefix."""
    return Keys(settings.key_prefix)


def freeze_startup_objects() -> None:
    """Hide everything allocated so far (modules, the model, clients) from the cyclic
    garbage collector, once a process has started. A full collection otherwise walks
    them all and stops every thread meanwhile: measured here, ~105 ms in a worker (torch
    and the model loaded) and ~45 ms in the API; what showed as the slowest interactive
    requests during a scan, their job waiting that long to start."""
    gc.collect()
    gc.freeze()
