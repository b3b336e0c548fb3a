"""Signed webhooks: a scan's summary, or a finished job, POSTed to the URL its
submitter gave, with ``X-OFA-Timestamp`` and ``X-OFA-Signature: v1=hex(HMAC-SHA256(secret,
timestamp + "." + body))``. Receivers recompute the signature and reject old
timestamps to stop replays."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

from shared.errors import OfaEntailError
from shared.fetch import UrlPolicy, post_json
from shared.messages import Job, ScanSummary


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over ``timestamp.body``."""
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class CallbackFailed(OfaEntailError):
    """The receiver could not be reached, or did not accept the callback."""


def deliver(summary: ScanSummary, url: str, secret: bytes, policy: UrlPolicy) -> None:
    """POST the signed summary once; ``CallbackFailed`` says why it was not accepted."""
    body = summary.model_dump_json(exclude_none=True).encode()
    post_signed(url, body, {"X-OFA-Scan": summary.scan_id}, secret, policy)


def deliver_job(job: Job, url: str, delivery_id: str, secret: bytes, policy: UrlPolicy) -> None:
    """POST a finished job, signed, once. The body names the delivery (also in
    ``X-OFA-Delivery``): the same id on every retry, so a receiver drops replays."""
    doc = {"event": "job.finished", "delivery_id": delivery_id, "job": job.model_dump(mode="json")}
    body = json.dumps(doc, separators=(",", ":")).encode()
    headers = {"X-OFA-Job": job.job_id, "X-OFA-Delivery": delivery_id}
    post_signed(url, body, headers, secret, policy)


def post_signed(
    url: str, body: bytes, headers: dict[str, str], secret: bytes, policy: UrlPolicy
) -> None:
    """POST ``body`` with ``X-OFA-Timestamp`` and ``X-OFA-Signature``; ``CallbackFailed``
    unless the receiver answered 2xx."""
    timestamp = str(int(time.time()))
    headers = {
        **headers,
        "X-OFA-Timestamp": timestamp,
        "X-OFA-Signature": f"v1={sign(secret, timestamp, body)}",
    }
    try:
        response = asyncio.run(post_json(url, body, headers, policy))
    except (OfaEntailError, OSError) as exc:
        raise CallbackFailed(str(exc)) from exc
    if response.status_code >= 300:
        raise CallbackFailed(f"callback answered HTTP {response.status_code}")
