"""The signed completion callback: the scan's summary POSTed to the URL its submitter
gave, with ``X-OFA-Timestamp`` and ``X-OFA-Signature: v1=hex(HMAC-SHA256(secret,
timestamp + "." + body))``. Receivers recompute the signature and reject old
timestamps to stop replays."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time

from shared.errors import OfaEntailError
from shared.fetch import UrlPolicy, post_json
from shared.messages import ScanSummary


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over ``timestamp.body``."""
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class CallbackFailed(OfaEntailError):
    """The receiver could not be reached, or did not accept the callback."""


def deliver(summary: ScanSummary, url: str, secret: bytes, policy: UrlPolicy) -> None:
    """POST the signed summary once; ``CallbackFailed`` says why it was not accepted."""
    body = summary.model_dump_json(exclude_none=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "X-OFA-Timestamp": timestamp,
        "X-OFA-Signature": f"v1={sign(secret, timestamp, body)}",
        "X-OFA-Scan": summary.scan_id,
    }
    try:
        response = asyncio.run(post_json(url, body, headers, policy))
    except (OfaEntailError, OSError) as exc:
        raise CallbackFailed(str(exc)) from exc
    if response.status_code >= 300:
        raise CallbackFailed(f"callback answered HTTP {response.status_code}")
