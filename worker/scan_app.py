"""The scan coordinator's Celery app: slices of scans and signed completion callbacks.

No torch here: run it on any machine with ``ofa-entail coordinator``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from functools import cache

import redis
from celery import Task

from shared.celery_app import SCAN_QUEUE, TASK_CALLBACK, TASK_SCAN, make_celery
from shared.embedded import redis_urls
from shared.errors import OfaEntailError
from shared.fetch import UrlPolicy, post_json
from shared.keys import Keys
from shared.scans import summarize, text_of
from shared.settings import get_settings
from worker.coordinator import Coordinator, remove_expired_scans

logger = logging.getLogger(__name__)

app = make_celery()


@cache
def coordinator() -> Coordinator:
    """The process's coordinator (Redis clients built once)."""
    settings = get_settings()
    durable_url, cache_url = redis_urls(settings)
    durable = redis.Redis.from_url(durable_url, health_check_interval=30)
    cache_client = durable if cache_url == durable_url else redis.Redis.from_url(cache_url)
    return Coordinator(settings, durable, cache_client, app)


_last_cleanup = 0.0


@app.task(name=TASK_SCAN, bind=True, acks_late=True)
def run_scan(self: Task, scan_id: str) -> str:
    """One slice of a scan; queues the next slice until the scan is done. At most once
    an hour, a coordinator also removes the folders of expired scans."""
    global _last_cleanup
    coord = coordinator()
    if time.monotonic() - _last_cleanup > 3600:
        _last_cleanup = time.monotonic()
        remove_expired_scans(coord.settings.scans_path, coord.durable, coord.keys)
    outcome = coord.run(scan_id)
    if outcome == "more":
        run_scan.apply_async((scan_id,), queue=SCAN_QUEUE)
    elif outcome == "busy":  # another coordinator holds the scan (or a dead one's lock)
        run_scan.apply_async((scan_id,), queue=SCAN_QUEUE, countdown=2)
    return outcome


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over ``timestamp.body``: receivers recompute it, and reject old
    timestamps to stop replays."""
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


@app.task(name=TASK_CALLBACK, bind=True, acks_late=True)
def send_callback(self: Task, scan_id: str) -> None:
    """POST the scan summary to its callback URL, signed; retried with backoff."""
    settings = get_settings()
    coord = coordinator()
    keys = Keys(settings.key_prefix)
    record = coord.durable.hgetall(keys.scan(scan_id))
    url = record.get(b"callback_url")
    if not record or not url or settings.webhook_secret is None:
        return
    body = json.dumps(summarize(scan_id, record), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    signature = sign(settings.webhook_secret.get_secret_value().encode(), timestamp, body)
    headers = {
        "X-OFA-Timestamp": timestamp,
        "X-OFA-Signature": f"v1={signature}",
        "X-OFA-Scan": scan_id,
    }
    policy = UrlPolicy(
        settings.url_timeout_s, 0, settings.max_upload_bytes, tuple(settings.url_allow_hosts)
    )
    try:
        response = asyncio.run(post_json(text_of(url), body, headers, policy))
        if response.status_code >= 300:
            raise RuntimeError(f"callback answered HTTP {response.status_code}")
    except (OfaEntailError, RuntimeError, OSError) as exc:
        retries = self.request.retries
        if retries >= settings.callback_max_retries:
            logger.error("scan %s: callback to %s failed for good: %s", scan_id, url, exc)
            coord.durable.hset(keys.scan(scan_id), "callback_error", str(exc))
            return
        logger.warning("scan %s: callback failed (%s); retry %d", scan_id, exc, retries + 1)
        raise self.retry(exc=exc, countdown=min(2**retries, 300)) from exc
    coord.durable.hset(keys.scan(scan_id), "callback_delivered_at", f"{time.time():.3f}")
