"""Bounds on the bytes a request body may hold, counted as they arrive.

A declared Content-Length over the endpoint's limit is refused before a byte of the
body is read. A body without one (chunked), or longer than it said, is counted as the
route reads it (this middleware wraps ``receive``) and refused the moment it passes the
limit, whatever the route was doing with it: nothing is parsed to the end, so nothing
is stored, and the caller's rate limit is not charged (routes charge after parsing).
Uvicorn holds at most 64 KiB of unread body (it stops reading the socket past that),
so a refused request costs the API about its limit, whatever the caller sends.

The refusal is the problem+json 413 the route itself would give (``api/problems.py``),
and it closes the connection: the rest of a refused body is not worth reading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import refusal
from shared.errors import BadInputError, ImageTooLargeError, PayloadTooLargeError
from shared.settings import Settings

logger = logging.getLogger(__name__)

# Room beside the image or manifest: form fields, multipart boundaries, JSON keys, texts.
BODY_OVERHEAD = 64 * 1024
# Every other request: small JSON bodies (a scan's server-side path), or none at all.
DEFAULT_LIMIT = 64 * 1024


class _Refused(Exception):
    """Raised from ``receive`` into the route once the body passes its limit (no
    ``BadInputError``: a route that catches those per item must not swallow it)."""


@dataclass(frozen=True)
class BodyLimits:
    """The most bytes each endpoint's body may hold."""

    job_json: int  # POST /v1/jobs as JSON: one image in base64, 4/3 as many bytes
    job_form: int  # POST /v1/jobs as multipart: one image file
    batch: int  # POST /v1/jobs/batch: OFA_BATCH_MAX_BYTES, any media type
    scan_form: int  # POST /v1/scans as multipart: the manifest upload
    default: int = DEFAULT_LIMIT

    @classmethod
    def of(cls, settings: Settings) -> BodyLimits:
        """The limits the settings imply."""
        upload = settings.max_upload_bytes
        return cls(
            job_json=upload * 4 // 3 + BODY_OVERHEAD,
            job_form=upload + BODY_OVERHEAD,
            batch=settings.batch_max_bytes,
            scan_form=settings.max_manifest_bytes + BODY_OVERHEAD,
        )

    def limit(self, method: str, path: str, ctype: str) -> int:
        """The most bytes this request's body may hold."""
        if method != "POST":
            return self.default
        path = path.rstrip("/")
        if path == "/v1/jobs":
            return self.job_form if ctype == "multipart/form-data" else self.job_json
        if path == "/v1/jobs/batch":
            return self.batch
        if path == "/v1/scans" and ctype == "multipart/form-data":
            return self.scan_form
        return self.default


def refusal_of(method: str, path: str, limit: int) -> BadInputError:
    """What a body past ``limit`` gets: for a single job, the refusal (and problem type)
    of an image over the upload limit; for anything else, a payload too large."""
    path = path.rstrip("/") or "/"
    if method == "POST" and path == "/v1/jobs":
        return ImageTooLargeError(
            f"the request is larger than the {limit}-byte limit of POST /v1/jobs"
        )
    return PayloadTooLargeError(
        f"the request body is larger than the {limit}-byte limit of {method} {path}"
    )


def _length_and_type(scope: Scope) -> tuple[bytes, str]:
    """The request's Content-Length (raw) and media type, in one pass over its headers."""
    length, ctype = b"", ""
    for key, value in scope["headers"]:
        if key == b"content-length":
            length = value.strip()
        elif key == b"content-type":
            ctype = value.decode("latin-1").split(";")[0].strip().lower()
    return length, ctype


class BodyLimitMiddleware:
    """Refuse (413) a request body past its endpoint's limit (plain ASGI: no per-request
    task or copy)."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, ctype = _length_and_type(scope)
        method, path = scope["method"], scope["path"]
        limit = self.limits.limit(method, path, ctype)
        if declared.isdigit() and int(declared) > limit:
            await _refuse(scope, send, refusal_of(method, path, limit))  # nothing read
            return
        received = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal received, over
            if over:
                raise _Refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _Refused
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # whatever the route made of a cut body: the 413 answers instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not over:
                raise
            # _Refused, or whatever a parser turned it into: the 413 below answers.
        if over:
            if started:  # a route that answered before reading its whole body
                logger.warning("request body over %d bytes after the response began", limit)
                return
            await _refuse(scope, send, refusal_of(method, path, limit))


async def _refuse(scope: Scope, send: Send, exc: BadInputError) -> None:
    status, body, _ = refusal(exc)  # counted in the metrics like any refusal
    response = JSONResponse(
        body,
        status_code=status,
        media_type="application/problem+json",
        headers={"Connection": "close"},
    )

    async def nothing() -> Message:  # a plain response reads no body
        return {"type": "http.disconnect"}

    await response(scope, nothing, send)
