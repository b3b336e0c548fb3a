"""Catalogue scans: submit a manifest, follow it, stream its results, cancel it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any, Literal

import redis
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.callbacks import check_callback
from api.deps import Call, ReadCall, ScansCall, Services, charge
from api.problems import documented
from api.report import build_report, report_html
from api.schemas import ScanAccepted
from shared.errors import (
    BadInputError,
    ManifestError,
    UnsupportedMediaTypeError,
)
from shared.models import ScanReport, ScanSummary
from shared.scans.folder import ScanFolder
from shared.scans.manifest import parse_line
from shared.scans.results import CSV_COLUMNS, ResultsDB, csv_line, result_line
from shared.store.apikeys import Caller
from shared.store.limits import Decision
from shared.submit import manifest_format, submit_scan

router = APIRouter(
    prefix="/v1/scans", tags=["scans"], responses=documented(401, 403, 422, 429, 503)
)

MAX_PATH_CHARS = 1024

MANIFEST_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["manifest"],
                    "properties": {
                        "manifest": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL or CSV (id, image, text, premise, sha256)",
                        },
                        "format": {"type": "string", "enum": ["jsonl", "csv"]},
                        "callback_url": {"type": "string"},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["path"],
                    "properties": {
                        "path": {
                            "type": "string",
                            "description": "a manifest under OFA_MANIFEST_ROOT",
                        },
                        "format": {"type": "string", "enum": ["jsonl", "csv"]},
                        "callback_url": {"type": "string"},
                    },
                }
            },
        },
    }
}


@router.post(
    "",
    openapi_extra=MANIFEST_DOC,
    status_code=202,
    response_model=ScanAccepted,
    summary="Start a scan",
    responses={
        202: {
            "description": "stored and queued: follow Location",
            "links": {
                op: {"operationId": op_id, "parameters": {"scan_id": "$response.body#/scan_id"}}
                for op, op_id in (
                    ("GetScan", "get_scan_v1_scans__scan_id__get"),
                    ("GetScanResults", "get_scan_results_v1_scans__scan_id__results_get"),
                    ("GetScanReport", "get_scan_report_v1_scans__scan_id__report_get"),
                    ("CancelScan", "delete_scan_v1_scans__scan_id__delete"),
                )
            },
        },
        **documented(400, 413, 415),
    },
)
async def post_scan(request: Request, call: ScansCall) -> JSONResponse:
    """Store the manifest (streamed, never whole in memory) and queue the coordinator.
    The body is bounded as it arrives (``api/bodylimit.py``): a multipart upload by
    ``OFA_MAX_MANIFEST_BYTES``, a JSON one (a server-side path) by 64 KiB."""
    s, caller = call.services, call.caller
    # A key (or the service) at a scan cap is refused before its manifest is read.
    await s.scans.aadmit(caller.key_id)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("manifest")
            if not isinstance(upload, UploadFile):
                raise ManifestError("the multipart field 'manifest' (a file) is required")
            fmt = manifest_format(upload.filename or "", form.get("format"))
            callback = await check_callback(s, form.get("callback_url"))
            scan_id, total, limited = await _start(s, caller, fmt, callback, upload=upload.file)
    elif ctype == "application/json":
        try:
            body = parse_line(await request.body())
        except ValueError as exc:
            raise BadInputError(f"the body is {exc}") from exc
        if not isinstance(body.get("path"), str):
            raise BadInputError("give the manifest's 'path' (under OFA_MANIFEST_ROOT)")
        if len(body["path"]) > MAX_PATH_CHARS:
            raise ManifestError(f"the manifest path is longer than {MAX_PATH_CHARS} characters")
        fmt = manifest_format(body["path"], body.get("format"))
        callback = await check_callback(s, body.get("callback_url"))
        scan_id, total, limited = await _start(s, caller, fmt, callback, server_path=body["path"])
    else:
        raise UnsupportedMediaTypeError(
            "send the manifest as multipart/form-data, or JSON naming a server-side path"
        )
    return JSONResponse(
        ScanAccepted(scan_id=scan_id, total=total).model_dump(mode="json"),
        status_code=202,
        headers={
            **(limited.headers() if limited else {}),
            "Location": f"/v1/scans/{scan_id}",
            "Retry-After": "2",
        },
    )


async def _start(
    s: Services, caller: Caller, fmt: str, callback: str | None, **source: Any
) -> tuple[str, int, Decision | None]:
    """Charge the caller's rate limit, then store and queue the scan. The charge comes
    before anything is stored (a refused caller leaves nothing behind); a manifest
    refused while being stored, or a store that is down, gives it back: bad input
    changes nothing, not even the caller's budget."""
    limited = await charge(s, caller, "miss", "scans")
    try:
        scan_id, total = await run_in_threadpool(
            submit_scan, s.scans, s.celery, s.settings, fmt, callback, owner=caller.key_id, **source
        )
    except Exception:
        if limited is not None:
            with contextlib.suppress(redis.RedisError):
                await s.limiter.refund(caller, "miss")
        raise
    return scan_id, total, limited


async def _visible(call: Call, scan_id: str) -> ScanSummary:
    """The scan, when it exists and the caller started it (or has the ``admin``
    scope); otherwise 404, the same for another key's scan as for an unknown id."""
    got = await call.services.scans.aread(scan_id)
    if got is None or not call.caller.owns(got[1]):
        raise HTTPException(404, f"no scan {scan_id} (unknown, or expired)")
    return got[0]


@router.get(
    "/{scan_id}",
    response_model=ScanSummary,
    summary="Progress of a scan",
    responses=documented(404),
)
async def get_scan(scan_id: str, call: ReadCall) -> ScanSummary:
    """Counts (total, done, cached, failed, pending), rate and ETA. Another key's scan:
    404."""
    return await _visible(call, scan_id)


@router.get(
    "/{scan_id}/results",
    summary="Stream a scan's results in manifest order",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "one line per manifest row read so far",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        **documented(404),
    },
)
async def get_scan_results(
    scan_id: str,
    call: ReadCall,
    format: Literal["jsonl", "csv"] = Query("jsonl"),
) -> StreamingResponse:
    """One line per manifest row read so far (every row once the scan has finished):
    id, label, answer, probabilities, cached, error."""
    s = call.services
    await _visible(call, scan_id)
    path = ScanFolder(s.settings.scans_path, scan_id).results

    def lines() -> Iterator[bytes]:
        if format == "csv":
            yield (",".join(CSV_COLUMNS) + "\n").encode()
        if not path.exists():
            return
        db = ResultsDB(path, readonly=True)
        try:
            for row in db.iter_results():
                doc = result_line(row)
                if format == "csv":
                    yield csv_line(doc).encode()
                else:
                    yield (json.dumps(doc) + "\n").encode()
        finally:
            db.close()

    media = "text/csv" if format == "csv" else "application/x-ndjson"
    return StreamingResponse(
        lines(),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="scan-{scan_id}.{format}"'},
    )


def _report(s: Services, scan_id: str) -> ScanReport:
    path = ScanFolder(s.settings.scans_path, scan_id).results
    if not path.exists():
        return build_report(scan_id, [])
    db = ResultsDB(path, readonly=True)
    try:
        return build_report(scan_id, db.labelled())
    finally:
        db.close()


@router.get(
    "/{scan_id}/report",
    response_model=ScanReport,
    summary="How the model did on rows with a gold label",
    responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}}},
        **documented(404),
    },
)
async def get_scan_report(
    scan_id: str,
    call: ReadCall,
    format: Literal["json", "html"] = Query("json"),
) -> Response:
    """Accuracy, confusion matrix, and precision/recall per label across thresholds,
    over the finished rows whose manifest line has a gold ``label`` (others are not
    counted); ``format=html`` draws them as a self-contained page."""
    s = call.services
    await _visible(call, scan_id)
    report = await run_in_threadpool(_report, s, scan_id)
    if format == "html":
        return HTMLResponse(report_html(report))
    return JSONResponse(report.model_dump(mode="json"))


@router.delete(
    "/{scan_id}",
    response_model=ScanSummary,
    summary="Cancel a scan",
    responses=documented(404),
)
async def delete_scan(scan_id: str, call: ScansCall) -> ScanSummary:
    """Stop reading the manifest and drop its queued bulk jobs; finished results stay.
    Another key's scan: 404."""
    await _visible(call, scan_id)
    cancelled = await call.services.scans.acancel(scan_id)
    if cancelled is None:
        raise HTTPException(404, f"no scan {scan_id} (unknown, or expired)")
    return cancelled
