"""Cache keys and Redis key names.

The verdict key is SHA-256 over a length-prefixed framing of every input the verdict
depends on, so no two different inputs can frame to the same bytes. Texts are
normalised first (``shared.text.pre_caption``): texts the model sees identically share
a key. Redis key names all live under one versioned prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.text import NORMALISER_VERSION, pre_caption

# Bump when the prompt templates or anything else feeding the model changes.
PROMPT_VERSION = "ve-prompt-1"
KEY_SCHEME = b"ofa-entail/verdict/1"


def _frame(h: hashlib._Hash, part: bytes) -> None:
    h.update(len(part).to_bytes(8, "big"))
    h.update(part)


def verdict_key(
    model_id: str, revision: str, image: bytes, text: str, premise: str | None = None
) -> str:
    """Hex SHA-256 naming the verdict for these inputs under this model."""
    h = hashlib.sha256()
    _frame(h, KEY_SCHEME)
    _frame(h, model_id.encode())
    _frame(h, revision.encode())
    _frame(h, f"{PROMPT_VERSION}/{NORMALISER_VERSION}".encode())
    _frame(h, image)
    _frame(h, pre_caption(text).encode())
    if premise is None:
        _frame(h, b"\x00")  # absent premise, distinct from an empty one
    else:
        _frame(h, b"\x01" + pre_caption(premise).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Keys:
    """Redis key names, all under ``prefix`` (e.g. ``ofa:v1:``)."""

    prefix: str

    def verdict(self, key: str) -> str:
        """Cache store: the verdict JSON."""
        return f"{self.prefix}verdict:{key}"

    def blob(self, key: str) -> str:
        """Durable store: the image bytes waiting for a worker."""
        return f"{self.prefix}blob:{key}"

    def job(self, job_id: str) -> str:
        """Durable store: the job record (a hash)."""
        return f"{self.prefix}job:{job_id}"

    def inflight(self, key: str) -> str:
        """Durable store: the id of the job computing ``key`` right now."""
        return f"{self.prefix}inflight:{key}"

    def done_channel(self) -> str:
        """Pub/sub channel on which workers announce each finished job id."""
        return f"{self.prefix}done"

    def workers(self, model_id: str, revision: str) -> str:
        """Durable store: sorted set of workers serving a model, scored by heartbeat time."""
        return f"{self.prefix}workers:{model_id}@{revision}"
