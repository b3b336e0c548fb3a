"""Checking a webhook URL when it is given (jobs and scans alike)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from api.deps import Services
from shared.errors import BadInputError, ImageUrlError
from shared.fetch import check_url


async def check_callback(s: Services, url: Any) -> str | None:
    """The callback URL, or None when none was given. Refused (422) when it is not an
    http(s) URL, when it resolves to a private or local address off the allow-list
    (the image URLs' guard), or when the server has no signing secret."""
    if url in (None, ""):
        return None
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        host = parts.hostname if parts else None
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = host = None
    if parts is None or parts.scheme not in ("http", "https"):
        raise BadInputError("callback_url must be an http(s) URL")
    if not host:
        raise BadInputError("callback_url has no host")
    if len(url) > 2048:
        raise BadInputError("callback_url is longer than 2048 characters")
    if s.settings.webhook_secret is None:
        raise BadInputError("callbacks need a signing secret on the server (OFA_WEBHOOK_SECRET)")
    try:
        await check_url(url, s.url_policy, "callback_url")
    except ImageUrlError as exc:
        raise BadInputError(exc.detail) from exc
    return str(url)
