"""``application/problem+json`` responses (RFC 9457) for every error the API returns."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import metrics
from shared import errors
from shared.errors import BadInputError, QueueUnavailableError

logger = logging.getLogger(__name__)

TYPE_BASE = "https://ofa-entail.dev/problems/"

# The one place that knows how each refusal reads over HTTP: (status, type slug).
# Subclasses not listed take their nearest listed ancestor's entry.
STATUS_OF: dict[type[BadInputError], tuple[int, str]] = {
    errors.BadInputError: (422, "invalid-input"),
    errors.BadImageError: (400, "bad-image"),
    errors.UnsupportedImageError: (415, "unsupported-image"),
    errors.ImageTooLargeError: (413, "image-too-large"),
    errors.BadTextError: (422, "bad-text"),
    errors.ImageUrlError: (400, "bad-image-url"),
    errors.UnsupportedMediaTypeError: (415, "unsupported-media-type"),
    errors.PayloadTooLargeError: (413, "payload-too-large"),
    errors.ManifestError: (400, "bad-manifest"),
}


def status_of(exc: BadInputError) -> tuple[int, str]:
    """(HTTP status, problem type slug) for a refusal."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return STATUS_OF[BadInputError]


def problem(status: int, title: str, detail: str, slug: str, headers: dict | None = None):
    """A problem+json response."""
    body = {"type": TYPE_BASE + slug, "title": title, "status": status, "detail": detail}
    return JSONResponse(
        body, status_code=status, media_type="application/problem+json", headers=headers
    )


def install(app: FastAPI) -> None:
    """Register the exception handlers."""

    @app.exception_handler(BadInputError)
    async def bad_input(_: Request, exc: BadInputError) -> JSONResponse:
        status, slug = status_of(exc)
        metrics.REJECTED.labels(slug).inc()
        return problem(status, exc.title, exc.detail, slug)

    @app.exception_handler(QueueUnavailableError)
    async def unavailable(_: Request, exc: QueueUnavailableError) -> JSONResponse:
        logger.warning("queue unavailable: %s", exc.detail)
        return problem(
            503, "Service unavailable", exc.detail, "unavailable", headers={"Retry-After": "5"}
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return problem(
            422, "Invalid request", "; ".join(parts) or "invalid request", "invalid-request"
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {
            401: "Unauthorized",
            404: "Not found",
            405: "Method not allowed",
            413: "Request too large",
            415: "Unsupported media type",
        }.get(exc.status_code, "Error")
        return problem(
            exc.status_code,
            title,
            str(exc.detail),
            title.lower().replace(" ", "-"),
            headers=getattr(exc, "headers", None),
        )
