"""Catalogue scans: submit a manifest, follow it, stream its results, cancel it."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import AuthDep, Services, ServicesDep
from shared.celery_app import SCAN_QUEUE, TASK_SCAN
from shared.errors import (
    BadInputError,
    ImageTooLargeError,
    QueueUnavailableError,
    UnsupportedMediaTypeError,
)
from shared.scans import (
    CSV_COLUMNS,
    ManifestError,
    ResultsDB,
    check_jsonl_head,
    csv_line,
    csv_to_jsonl,
    file_under,
    now,
    result_line,
    summarize,
)

router = APIRouter(prefix="/v1/scans", tags=["scans"])

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


def _format_of(name: str, given: Any) -> str:
    fmt = (given or ("csv" if name.lower().endswith(".csv") else "jsonl")).lower()
    if fmt not in ("jsonl", "csv"):
        raise ManifestError("format must be jsonl or csv")
    return str(fmt)


def _save_manifest(src: IO[bytes], folder: Path, fmt: str, max_bytes: int) -> tuple[Path, int]:
    """Stream the upload to ``folder/manifest.jsonl`` (CSV converted); returns (path, rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "manifest.jsonl"
    if fmt == "csv":
        import io

        text = io.TextIOWrapper(src, encoding="utf-8", newline="")
        with out.open("w", encoding="utf-8") as dst:
            try:
                rows = csv_to_jsonl(text, dst)
            except (UnicodeDecodeError, ValueError) as exc:
                raise ManifestError(f"the CSV manifest could not be read ({exc})") from exc
            finally:
                text.detach()
    else:
        written = 0
        with out.open("wb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise ImageTooLargeError(f"the manifest is larger than {max_bytes} bytes")
                dst.write(chunk)
        rows = check_jsonl_head(out)
    if out.stat().st_size > max_bytes:
        raise ImageTooLargeError(f"the manifest is larger than {max_bytes} bytes")
    if rows == 0:
        raise ManifestError("the manifest has no rows")
    return out, rows


def _server_manifest(s: Services, name: str, fmt: str, folder: Path) -> tuple[Path, int]:
    try:
        path = file_under(s.settings.manifest_root, name, "manifest", "OFA_MANIFEST_ROOT")
    except ValueError as exc:
        raise ManifestError(str(exc)) from exc
    if fmt == "csv":
        with path.open("rb") as src:
            return _save_manifest(src, folder, fmt, s.settings.max_manifest_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    return path, check_jsonl_head(path)  # read in place


def _check_callback(s: Services, url: Any) -> str | None:
    if url in (None, ""):
        return None
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise BadInputError("callback_url must be an http(s) URL")
    if not urlsplit(url).hostname:
        raise BadInputError("callback_url has no host")
    if s.settings.webhook_secret is None:
        raise BadInputError("callbacks need a signing secret on the server (OFA_WEBHOOK_SECRET)")
    return url


@router.post("", openapi_extra=MANIFEST_DOC, status_code=202, summary="Start a scan")
async def post_scan(request: Request, s: ServicesDep, _auth: AuthDep) -> JSONResponse:
    """Store the manifest (streamed, never whole in memory) and queue the coordinator."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    limit = s.settings.max_manifest_bytes
    if declared and declared.isdigit() and int(declared) > limit + 65536:
        raise ImageTooLargeError(f"the manifest is larger than {limit} bytes")
    scan_id = uuid.uuid4().hex
    folder = s.settings.scans_path / scan_id
    try:
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("manifest")
            if not isinstance(upload, UploadFile):
                raise ManifestError("the multipart field 'manifest' (a file) is required")
            fmt = _format_of(upload.filename or "", form.get("format"))
            callback = _check_callback(s, form.get("callback_url"))
            manifest, total = await run_in_threadpool(
                _save_manifest, upload.file, folder, fmt, limit
            )
        elif ctype == "application/json":
            try:
                body = json.loads(await request.body())
            except json.JSONDecodeError as exc:
                raise BadInputError(f"the body is not JSON ({exc})") from exc
            if not isinstance(body, dict) or not isinstance(body.get("path"), str):
                raise BadInputError("give the manifest's 'path' (under OFA_MANIFEST_ROOT)")
            fmt = _format_of(body["path"], body.get("format"))
            callback = _check_callback(s, body.get("callback_url"))
            manifest, total = await run_in_threadpool(
                _server_manifest, s, body["path"], fmt, folder
            )
        else:
            raise UnsupportedMediaTypeError(
                "send the manifest as multipart/form-data, or JSON naming a server-side path"
            )
        record: dict[Any, Any] = {
            "status": "queued",
            "created_at": now(),
            "total": str(total),
            "manifest": str(manifest),
            "read": "0",
            "done": "0",
            "cached": "0",
            "failed": "0",
            "pending": "0",
        }
        if callback:
            record["callback_url"] = callback
        key = s.keys.scan(scan_id)
        pipe = s.durable.pipeline(transaction=True)
        pipe.hset(key, mapping=record)
        pipe.expire(key, s.settings.scan_ttl_s)
        await pipe.execute()
        try:
            await run_in_threadpool(
                s.celery.send_task, TASK_SCAN, args=(scan_id,), queue=SCAN_QUEUE, retry=False
            )
        except Exception as exc:
            await s.durable.delete(key)
            raise QueueUnavailableError(
                f"the scan queue is unavailable ({type(exc).__name__})"
            ) from exc
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return JSONResponse(
        {"scan_id": scan_id, "status": "queued", "total": total},
        status_code=202,
        headers={"Location": f"/v1/scans/{scan_id}", "Retry-After": "2"},
    )


async def _summary(s: Services, scan_id: str) -> dict[str, Any]:
    raw = await s.durable.hgetall(s.keys.scan(scan_id))
    if not raw:
        raise HTTPException(404, f"no scan {scan_id} (unknown, or expired)")
    return summarize(scan_id, raw)


@router.get("/{scan_id}", summary="Progress of a scan")
async def get_scan(scan_id: str, s: ServicesDep, _auth: AuthDep) -> dict[str, Any]:
    """Counts (total, done, cached, failed, pending), rate and ETA."""
    return await _summary(s, scan_id)


@router.get("/{scan_id}/results", summary="Stream a scan's results in manifest order")
async def get_scan_results(
    scan_id: str,
    s: ServicesDep,
    _auth: AuthDep,
    format: Literal["jsonl", "csv"] = Query("jsonl"),
) -> StreamingResponse:
    """One line per manifest row read so far (every row once the scan has finished):
    id, label, answer, probabilities, cached, error."""
    await _summary(s, scan_id)
    path = s.settings.scans_path / scan_id / "results.db"

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


@router.delete("/{scan_id}", summary="Cancel a scan")
async def delete_scan(scan_id: str, s: ServicesDep, _auth: AuthDep) -> dict[str, Any]:
    """Stop reading the manifest and drop its queued bulk jobs; finished results stay."""
    summary = await _summary(s, scan_id)
    if summary["status"] in ("queued", "running"):
        await s.durable.hset(
            s.keys.scan(scan_id), mapping={"status": "cancelled", "cancelled_at": now()}
        )
        summary["status"] = "cancelled"
    return summary
