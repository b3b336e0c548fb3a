"""Catalogue scans: submit a manifest, follow it, stream its results, cancel it.

HTTP only: the scan caps, the charge and the storing are ``api/admission.py``'s."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api import admission, openapi
from api.callbacks import check_callback
from api.deps import Call, ReadCall, ScansCall, Services
from api.problems import problem
from api.report import build_report, report_html
from api.schemas import ScanAccepted
from shared.errors import (
    BadInputError,
    ManifestError,
    UnsupportedMediaTypeError,
)
from shared.models import ScanReport, ScanSummary
from shared.scans import changes
from shared.scans.folder import ScanFolder
from shared.scans.manifest import parse_line
from shared.scans.results import CSV_COLUMNS, ResultsDB, csv_line, result_line
from shared.submit import manifest_format

router = APIRouter(prefix="/v1/scans", tags=["scans"], responses=openapi.ROUTER_ERRORS)

MAX_PATH_CHARS = 1024

_CONFLICT = {
    "description": "the Idempotency-Key was used with another body, or its first start is "
    "still creating the scan (Retry-After)",
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
}
_ACCEPTED = openapi.POST_SCAN_RESPONSES[202]
POST_SCAN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **openapi.POST_SCAN_RESPONSES,
    202: {
        **_ACCEPTED,
        "links": {
            **_ACCEPTED.get("links", {}),
            "GetScanChanges": {
                "operationId": "get_scan_changes_v1_scans__scan_id__changes_get",
                "parameters": {"scan_id": "$response.body#/scan_id"},
            },
        },
    },
    200: {
        "model": ScanSummary,
        "description": "a replay (Idempotent-Replayed: true): the scan the first start with "
        "this Idempotency-Key and body made, as it stands now",
    },
    409: _CONFLICT,
}


@router.post(
    "",
    openapi_extra=openapi.POST_SCAN_BODY,
    status_code=202,
    response_model=ScanAccepted,
    summary="Start a scan",
    responses=POST_SCAN_RESPONSES,
)
async def post_scan(
    request: Request,
    call: ScansCall,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="1-255 printable ASCII characters: a start repeated with the same "
            "key and body within 24 hours answers with the first start's scan (200, "
            "Idempotent-Replayed: true); with another body, 409",
        ),
    ] = None,
) -> JSONResponse:
    """Store the manifest (streamed, never whole in memory) and queue the coordinator.
    The body is bounded as it arrives (``api/bodylimit.py``): a multipart upload by
    ``OFA_MAX_MANIFEST_BYTES``, a JSON one (a server-side path) by 64 KiB. A
    ``catalogue`` names the set of rows the scan belongs to: when it succeeds, its
    changes since the catalogue's previous succeeded scan are counted."""
    s, caller = call.services, call.caller
    idem_key = admission.check_idempotency_key(idempotency_key)
    await admission.admit_scan(s, caller, idem_key)
    try:
        started = await _start(request, s, call, idem_key)
    except (admission.BucketNotAllowed, admission.ObjectRefused) as exc:
        return problem(403, "Object URL refused", exc.detail, "object-refused")
    except admission.IdempotencyConflict as exc:
        retry = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return problem(409, "Idempotency-Key conflict", exc.detail, "idempotency-conflict", retry)
    if started.replayed is not None:
        return JSONResponse(
            started.replayed.model_dump(mode="json"),
            headers={"Idempotent-Replayed": "true", "Location": f"/v1/scans/{started.scan_id}"},
        )
    return JSONResponse(
        ScanAccepted(scan_id=started.scan_id, total=started.total).model_dump(mode="json"),
        status_code=202,
        headers={
            **(started.limited.headers() if started.limited else {}),
            "Location": f"/v1/scans/{started.scan_id}",
            "Retry-After": "2",
        },
    )


async def _start(
    request: Request, s: Services, call: Call, idem_key: str | None
) -> admission.ScanStarted:
    caller = call.caller
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("manifest")
            if not isinstance(upload, UploadFile):
                raise ManifestError("the multipart field 'manifest' (a file) is required")
            fmt = manifest_format(upload.filename or "", form.get("format"))
            callback = await check_callback(s, form.get("callback_url"))
            catalogue = admission.check_catalogue(form.get("catalogue"))
            idem = None
            if idem_key:
                fields = {"format": fmt, "callback_url": callback, "catalogue": catalogue}
                digest = await run_in_threadpool(admission.upload_digest, upload.file, fields)
                idem = admission.Idempotency(idem_key, digest)
            return await admission.start_scan(
                s, caller, fmt, callback, catalogue, idem, upload=upload.file
            )
    elif ctype == "application/json":
        try:
            body = parse_line(await request.body())
        except ValueError as exc:
            raise BadInputError(f"the body is {exc}") from exc
        if "manifest_url" in body:
            if "path" in body:
                raise BadInputError("give the manifest's 'path' or its 'manifest_url', not both")
            if len(str(body["manifest_url"])) > MAX_PATH_CHARS:
                raise ManifestError(f"manifest_url is longer than {MAX_PATH_CHARS} characters")
        elif not isinstance(body.get("path"), str):
            raise BadInputError(
                "give the manifest's 'path' (under OFA_MANIFEST_ROOT) or its 'manifest_url'"
            )
        elif len(body["path"]) > MAX_PATH_CHARS:
            raise ManifestError(f"the manifest path is longer than {MAX_PATH_CHARS} characters")
        name = body.get("path") or body.get("manifest_url")
        fmt = manifest_format(name if isinstance(name, str) else "", body.get("format"))
        callback = await check_callback(s, body.get("callback_url"))
        catalogue = admission.check_catalogue(body.get("catalogue"))
        # Every object URL is checked (allow-list, then a HEAD of the manifest) before
        # anything is stored or an Idempotency-Key reserved.
        results = admission.results_target(
            s, caller, body.get("results_url"), body.get("results_format")
        )
        source: dict[str, Any] = {"extra": results}
        if "manifest_url" in body:
            source["manifest_object"] = await admission.object_manifest(
                s, caller, body["manifest_url"], fmt
            )
        else:
            source["server_path"] = body["path"]
        idem = admission.Idempotency(idem_key, admission.json_digest(body)) if idem_key else None
        return await admission.start_scan(s, caller, fmt, callback, catalogue, idem, **source)
    raise UnsupportedMediaTypeError(
        "send the manifest as multipart/form-data, or JSON naming a server-side path"
    )


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
    responses=openapi.NOT_FOUND,
)
async def get_scan(scan_id: str, call: ReadCall) -> ScanSummary:
    """Counts (total, done, cached, failed, pending), rate and ETA. Another key's scan:
    404."""
    return await _visible(call, scan_id)


@router.get(
    "/{scan_id}/results",
    summary="Stream a scan's results in manifest order",
    response_class=StreamingResponse,
    responses=openapi.SCAN_RESULTS_RESPONSES,
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

    return _download(
        path,
        format,
        CSV_COLUMNS,
        lambda db: (result_line(row) for row in db.iter_results()),
        csv_line,
        f"scan-{scan_id}.{format}",
    )


def _report(s: Services, scan_id: str, summary: ScanSummary | None = None) -> ScanReport | str:
    """The report; drawn as HTML (with the catalogue scan's changes) given ``summary``."""
    path = ScanFolder(s.settings.scans_path, scan_id).results
    if not path.exists():
        report = build_report(scan_id, [])
        return report if summary is None else report_html(report, summary)
    db = ResultsDB(path, readonly=True)
    try:
        report = build_report(scan_id, db.labelled())
        if summary is None:
            return report
        return report_html(report, summary, changes.iter_changes(db.conn))
    finally:
        db.close()


@router.get(
    "/{scan_id}/report",
    response_model=ScanReport,
    summary="How the model did on rows with a gold label",
    responses=openapi.SCAN_REPORT_RESPONSES,
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
    summary = await _visible(call, scan_id)
    if format == "html":
        page = await run_in_threadpool(_report, s, scan_id, summary)
        assert isinstance(page, str)
        return HTMLResponse(page)
    report = await run_in_threadpool(_report, s, scan_id)
    assert isinstance(report, ScanReport)
    return JSONResponse(report.model_dump(mode="json"))


@router.get(
    "/{scan_id}/changes",
    summary="What changed since the catalogue's previous scan",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "one ScanChange per line (JSONL), or CSV",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        **openapi.NOT_FOUND,
        409: {
            "description": "the scan has not finished",
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        },
    },
)
async def get_scan_changes(
    scan_id: str,
    call: ReadCall,
    format: Literal["jsonl", "csv"] = Query("jsonl"),
) -> Response:
    """A catalogue scan's rows whose outcome changed since the catalogue's previous
    succeeded scan, matched by row id (``ScanChange``: label_changed, newly_failed,
    recovered, added, removed), in manifest order, removed rows last. Empty for a scan
    with nothing to compare (no catalogue, not succeeded, or no earlier scan: its
    summary's ``changes`` is null then). 409 while the scan is unfinished."""
    s = call.services
    summary = await _visible(call, scan_id)
    if not summary.status.finished:
        return problem(
            409,
            "Scan unfinished",
            f"scan {scan_id} is {summary.status}: its changes are counted when it ends",
            "scan-unfinished",
            {"Retry-After": "5"},
        )
    path = ScanFolder(s.settings.scans_path, scan_id).results

    return _download(
        path,
        format,
        changes.CSV_COLUMNS,
        lambda db: changes.iter_changes(db.conn),
        _csv_record,
        f"scan-{scan_id}-changes.{format}",
    )


def _csv_record(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(changes.csv_row(doc))
    return buf.getvalue()


def _download(
    path: Path,
    format: str,
    columns: Sequence[str],
    docs_of: Callable[[ResultsDB], Iterable[dict[str, Any]]],
    csv_of: Callable[[dict[str, Any]], str],
    filename: str,
) -> StreamingResponse:
    """A scan's results file streamed as JSONL or CSV (header first), one document a
    line, read from the results file as it is sent."""

    def lines() -> Iterator[bytes]:
        if format == "csv":
            yield (",".join(columns) + "\n").encode()
        if not path.exists():
            return
        db = ResultsDB(path, readonly=True)
        try:
            for doc in docs_of(db):
                yield (csv_of(doc) if format == "csv" else json.dumps(doc) + "\n").encode()
        finally:
            db.close()

    media = "text/csv" if format == "csv" else "application/x-ndjson"
    return StreamingResponse(
        lines(),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.delete(
    "/{scan_id}",
    response_model=ScanSummary,
    summary="Cancel a scan",
    responses=openapi.NOT_FOUND,
)
async def delete_scan(scan_id: str, call: ScansCall) -> ScanSummary:
    """Stop reading the manifest and drop its queued bulk jobs; finished results stay.
    Another key's scan: 404."""
    await _visible(call, scan_id)
    cancelled = await call.services.scans.acancel(scan_id)
    if cancelled is None:
        raise HTTPException(404, f"no scan {scan_id} (unknown, or expired)")
    return cancelled
