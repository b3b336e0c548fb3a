"""Memory sizes as Redis, Kubernetes and Docker spell them, in bytes (the deployment
tests compare Redis's ``maxmemory`` with its container's memory limit)."""

from __future__ import annotations

import re

# redis.conf: "1k => 1000 bytes, 1kb => 1024 bytes ... units are case insensitive".
_REDIS = {"": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
# Kubernetes quantities; Docker's k/m/g (mem_limit) are binary.
_QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_QUANTITY |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DOCKER = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def _split(text: str) -> tuple[int, str]:
    match = re.fullmatch(r"(\d+)([a-zA-Z]*)", text.strip())
    assert match, f"not a size: {text!r}"
    return int(match[1]), match[2]


def redis_bytes(text: str) -> int:
    number, unit = _split(text)
    return number * _REDIS[unit.lower()]


def quantity_bytes(text: str) -> int:
    number, unit = _split(text)
    return number * _QUANTITY[unit]


def docker_bytes(text: str) -> int:
    number, unit = _split(text)
    return number * _DOCKER[unit.lower()]
