"""Text normalisation shared by the API (cache keys) and the model runtime (prompts).

Two texts that normalise to the same string reach the model identically, so they
share a cache key. Bump ``NORMALISER_VERSION`` whenever this behaviour changes.
"""

from __future__ import annotations

import re
from typing import Any

from shared.errors import BadTextError

NORMALISER_VERSION = "pre_caption-1"
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int | None = None) -> str:
    """Normalise a sentence the way OFA's ``pre_caption`` does.

    Lower-case; strip leading ``,.!?*#:;~``; turn ``-`` and ``/`` into spaces and
    ``<person>`` into ``person``; collapse runs of white space; trim; keep at most
    ``max_words`` space-separated words.
    """
    text = caption.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    text = text.replace("<person>", "person")
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    if max_words is not None:
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words])
    return text


def check_text(value: Any, name: str, limit: int, required: bool) -> str | None:
    """A caller's text field: a non-empty string of at most ``limit`` characters, or
    None when optional and absent; ``BadTextError`` saying what is wrong otherwise."""
    if value is None or (isinstance(value, str) and not value.strip() and not required):
        if required:
            raise BadTextError(f"missing {name}")
        return None
    if not isinstance(value, str):
        raise BadTextError(f"{name} must be a string")
    if not value.strip():
        raise BadTextError(f"{name} is empty")
    if len(value) > limit:
        raise BadTextError(f"{name} is {len(value)} characters; the limit is {limit}")
    return value
