"""The embedded Valkey (``shared/embedded.py``): a real server started in a data folder,
its URL written where the other commands look, append-only and never evicting, and
what it holds still there after a restart on the same folder."""

from __future__ import annotations

from pathlib import Path

import redis

from shared.embedded import start_embedded
from shared.wiring import EMBEDDED_URL_FILE


def test_a_durable_server_whose_url_the_other_commands_find(tmp_path: Path):
    data = tmp_path / "data"
    server = start_embedded(data)
    try:
        url = (data / EMBEDDED_URL_FILE).read_text().strip()
        assert url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.set("kept", "across a restart")
        client.close()
    finally:
        server.stop()
    assert (data / "valkey").is_dir()

    again = start_embedded(data)
    try:
        url = (data / EMBEDDED_URL_FILE).read_text().strip()
        client = redis.Redis.from_url(url)
        assert client.get("kept") == b"across a restart"
        client.close()
    finally:
        again.stop()
