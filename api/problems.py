"""``application/problem+json`` responses (RFC 9457) for every error the API returns."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from api import metrics
from api.deps import SECURITY_SCHEMES, RateLimitedError
from shared import errors
from shared.errors import (
    BadInputError,
    OverloadedError,
    PayloadStoreUnavailable,
    QueueUnavailableError,
    ScanLimitError,
    ScansBusyError,
)

logger = logging.getLogger(__name__)

TYPE_BASE = "https://ofa-entail.dev/problems/"
# What a submission refused for an unreachable payload store is told to wait.
PAYLOAD_RETRY_AFTER_S = 5

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
    errors.ManifestLineTooLongError: (413, "manifest-line-too-long"),
}


_MEANING = {
    400: "Unreadable image, bad base64, refused image URL, or an unreadable manifest",
    401: "Missing, invalid or revoked API key",
    403: "The API key lacks the scope this call needs",
    429: "The API key's rate limit is used up; Retry-After and RateLimit-* say when it refills",
    404: "Unknown or expired id",
    413: "Too many bytes or pixels",
    415: "Unsupported image format or request body",
    422: "Invalid request: missing, empty or over-long fields, wrong types",
    503: "Overloaded (load shedding), or Redis, the broker or the payload store (where "
    "images wait for a worker) is unavailable; Retry-After says when to retry",
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error codes, as problem+json."""
    schema = {"$ref": "#/components/schemas/Problem"}  # added by ``install``
    return {
        code: {
            "description": _MEANING[code],
            "content": {"application/problem+json": {"schema": schema}},
        }
        for code in codes
    }


def status_of(exc: BadInputError) -> tuple[int, str]:
    """(HTTP status, problem type slug) for a refusal."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return STATUS_OF[BadInputError]


def problem_body(status: int, title: str, detail: str, slug: str) -> dict[str, Any]:
    """A problem's JSON body."""
    return {"type": TYPE_BASE + slug, "title": title, "status": status, "detail": detail}


def problem(status: int, title: str, detail: str, slug: str, headers: dict | None = None):
    """A problem+json response."""
    body = problem_body(status, title, detail, slug)
    return JSONResponse(
        body, status_code=status, media_type="application/problem+json", headers=headers
    )


REFUSALS = (
    BadInputError,
    QueueUnavailableError,
    PayloadStoreUnavailable,
    RateLimitedError,
    OverloadedError,
    ScanLimitError,
    ScansBusyError,
)


def refusal(exc: Exception) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """(status, problem body, headers) for a refusal of ``REFUSALS``, counted in the
    metrics: one mapping for the exception handlers and for each item of a batch."""
    if isinstance(exc, BadInputError):
        status, slug = status_of(exc)
        metrics.REJECTED.labels(slug).inc()
        return status, problem_body(status, exc.title, exc.detail, slug), None
    if isinstance(exc, RateLimitedError):
        metrics.RATE_LIMITED.inc()
        body = problem_body(429, "Too many requests", exc.detail, "rate-limited")
        return 429, body, exc.decision.headers()
    if isinstance(exc, OverloadedError):
        metrics.SHED.inc()
        body = problem_body(503, "Overloaded", exc.detail, "overloaded")
        return 503, body, {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, ScanLimitError):
        metrics.RATE_LIMITED.inc()
        body = problem_body(429, "Too many scans", exc.detail, "scan-limit")
        return 429, body, {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, ScansBusyError):
        metrics.SHED.inc()
        body = problem_body(503, "Too many scans", exc.detail, "scans-busy")
        return 503, body, {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, QueueUnavailableError):
        logger.warning("queue unavailable: %s", exc.detail)
        body = problem_body(503, "Service unavailable", exc.detail, "unavailable")
        return 503, body, {"Retry-After": "5"}
    if isinstance(exc, PayloadStoreUnavailable):
        logger.warning("payload store unavailable: %s", exc.detail)
        body = problem_body(503, "Service unavailable", exc.detail, "payload-store-unavailable")
        return 503, body, {"Retry-After": str(PAYLOAD_RETRY_AFTER_S)}
    raise exc


def install(app: FastAPI) -> None:
    """Register the exception handlers, and in the OpenAPI document the schemas that
    responses name by reference only (Problem, CachedVerdict)."""
    from api.schemas import Problem
    from shared.models import CachedVerdict

    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()  # FastAPI keeps it as app.openapi_schema
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (Problem, CachedVerdict):
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(doc.pop("$defs", {}))
                schemas[model.__name__] = doc
            # Every jobs and scans operation needs a key (api/deps.py), either scheme.
            spec["components"]["securitySchemes"] = SECURITY_SCHEMES
            for path_item in spec.get("paths", {}).values():
                for op in path_item.values():
                    if set(op.get("tags", ())) & {"jobs", "scans"}:
                        op["security"] = [{name: []} for name in SECURITY_SCHEMES]
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def refused(_: Request, exc: Exception) -> JSONResponse:
        status, body, headers = refusal(exc)
        return JSONResponse(
            body, status_code=status, media_type="application/problem+json", headers=headers
        )

    for kind in REFUSALS:
        app.add_exception_handler(kind, refused)

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
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; list every
            # method any route for this path accepts.
            headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
        title = {
            401: "Unauthorized",
            403: "Forbidden",
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
            headers=headers or None,
        )


def allowed_methods(request: Request) -> set[str]:
    """The HTTP methods the most specific path template matching this request's path
    accepts (``/v1/jobs/batch`` is a path of its own, not ``/v1/jobs/{job_id}``): the
    documented operations for API paths, a plain route's own methods for the others."""
    app = request.app
    table = getattr(app.state, "allowed_methods", None)
    if table is None:
        table = app.state.allowed_methods = _method_table(app)
    path = request.scope.get("path", "")
    best: tuple[int, set[str]] | None = None
    for regex, params, methods in table:
        if regex.match(path) and (best is None or params < best[0]):
            best = (params, methods)
    return best[1] if best else set()


def _method_table(app: FastAPI) -> list[tuple[re.Pattern[str], int, set[str]]]:
    table: list[tuple[re.Pattern[str], int, set[str]]] = []
    for template, operations in app.openapi().get("paths", {}).items():
        regex, _, convertors = compile_path(template)
        methods = {m.upper() for m in operations if m.upper() in _HTTP_METHODS}
        table.append((regex, len(convertors), methods))
    documented = set(app.openapi().get("paths", {}))
    for route in app.router.routes:
        path, accepted = getattr(route, "path", None), getattr(route, "methods", None)
        if path and accepted and path not in documented:
            regex, _, convertors = compile_path(path)
            table.append((regex, len(convertors), set(accepted)))
    return table


_HTTP_METHODS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}
