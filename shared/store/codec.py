"""How records are encoded in Redis: values arrive as bytes or str; timestamps are
seconds since the epoch as text."""

from __future__ import annotations

import time
from typing import Any


def text_of(value: Any) -> str:
    """A Redis value (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    """A Redis hash (bytes or str keys and values) as str -> str."""
    return {text_of(k): text_of(v) for k, v in raw.items()}


def bytes_of(value: Any) -> bytes | None:
    """A Redis value (bytes, str or None) as bytes or None."""
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()


def now() -> str:
    """A timestamp as records store it."""
    return f"{time.time():.6f}"
