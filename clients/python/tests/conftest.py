"""The client's tests talk to a running service: ``OFA_TEST_URL`` (its base URL) and
``OFA_TEST_API_KEY`` (a key with the jobs and scans scopes); without them every test is
skipped. The service needs a worker and a scan coordinator; any model will do."""

from __future__ import annotations

import os
import random
import struct
import uuid
import zlib

import pytest


@pytest.fixture(scope="session")
def url() -> str:
    """The service's base URL."""
    value = os.environ.get("OFA_TEST_URL")
    if not value:
        pytest.skip("OFA_TEST_URL is not set: no service to test against")
    return value


@pytest.fixture(scope="session")
def api_key() -> str:
    """An API key the service accepts."""
    value = os.environ.get("OFA_TEST_API_KEY")
    if not value:
        pytest.skip("OFA_TEST_API_KEY is not set: no service to test against")
    return value


@pytest.fixture
def nonce() -> str:
    """Words no earlier run sent, so that the service has no verdict cached for them."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def image() -> bytes:
    """A fresh image no earlier run sent."""
    return png()


def png(width: int = 48, height: int = 32) -> bytes:
    """A PNG of random pixels, written with the standard library alone."""
    rng = random.Random()
    rows = b"".join(
        b"\x00" + bytes(rng.randrange(256) for _ in range(width * 3)) for _ in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
