"""Text normalisation shared by the API (cache keys) and the model runtime (prompts).

Two texts that normalise to the same string reach the model identically, so they
share a cache key. Bump ``NORMALISER_VERSION`` whenever this behaviour changes.
"""

from __future__ import annotations

import re

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
