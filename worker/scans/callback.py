"""Signed webhooks: a scan's summary, or a finished job, POSTed to the URL its
submitter gave, with ``X-OFA-Timestamp`` and ``X-OFA-Signature: v1=hex(HMAC-SHA256(secret,
timestamp + "." + body))``. Receivers recompute the signature and reject old
timestamps to stop replays; each delivery has an id (``X-OFA-Delivery``, and
``delivery_id`` in the body), the same on every retry, so receivers drop duplicates.

One POST is bounded (``shared/fetch.py:post_json``): one deadline over the whole
exchange, and at most a cap of the answer read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from shared import tracing
from shared.errors import OfaEntailError
from shared.fetch import UrlPolicy, post_json
from shared.models import Job, ScanSummary

logger = logging.getLogger(__name__)

T = TypeVar("T")


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over ``timestamp.body``."""
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class CallbackFailed(OfaEntailError):
    """The receiver could not be reached, or did not accept the callback."""


def deliver(
    summary: ScanSummary,
    url: str,
    delivery_id: str,
    secret: bytes,
    policy: UrlPolicy,
    max_answer_bytes: int,
) -> None:
    """POST the signed summary once, naming the delivery (the summary's fields and
    ``delivery_id``); ``CallbackFailed`` says why it was not accepted."""
    doc = {**summary.model_dump(mode="json", exclude_none=True), "delivery_id": delivery_id}
    body = json.dumps(doc, separators=(",", ":")).encode()
    headers = {"X-OFA-Scan": summary.scan_id, "X-OFA-Delivery": delivery_id}
    post_signed(url, body, headers, secret, policy, max_answer_bytes)


def deliver_job(
    job: Job,
    url: str,
    delivery_id: str,
    secret: bytes,
    policy: UrlPolicy,
    max_answer_bytes: int,
) -> None:
    """POST a finished job, signed, once. The body names the delivery (also in
    ``X-OFA-Delivery``): the same id on every retry, so a receiver drops replays."""
    doc = {"event": "job.finished", "delivery_id": delivery_id, "job": job.model_dump(mode="json")}
    body = json.dumps(doc, separators=(",", ":")).encode()
    headers = {"X-OFA-Job": job.job_id, "X-OFA-Delivery": delivery_id}
    post_signed(url, body, headers, secret, policy, max_answer_bytes)


def post_signed(
    url: str,
    body: bytes,
    headers: dict[str, str],
    secret: bytes,
    policy: UrlPolicy,
    max_answer_bytes: int,
) -> None:
    """POST ``body`` with ``X-OFA-Timestamp`` and ``X-OFA-Signature``; ``CallbackFailed``
    unless the receiver answered 2xx within ``policy.timeout_s``."""
    timestamp = str(int(time.time()))
    headers = {
        **headers,
        **tracing.outgoing(),  # a traced delivery: the receiver may continue the trace
        "X-OFA-Timestamp": timestamp,
        "X-OFA-Signature": f"v1={sign(secret, timestamp, body)}",
    }
    try:
        answer = _run(post_json(url, body, headers, policy, max_answer_bytes))
    except (OfaEntailError, OSError) as exc:
        raise CallbackFailed(str(exc)) from exc
    if answer.status_code >= 300:
        raise CallbackFailed(f"callback answered HTTP {answer.status_code}")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` on a new event loop, closed without waiting for its executor threads.
    Not ``asyncio.run``: that waits for them, so a name lookup (``getaddrinfo`` runs in
    one) that outlives the deadline would hold the thread past the deadline too."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()  # shuts the executor down without waiting
