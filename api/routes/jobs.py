"""``POST /v1/jobs`` and ``GET /v1/jobs/{id}``: submit, answer from cache, or queue; poll."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api import metrics
from api.deps import AuthDep, Services, ServicesDep
from api.problems import documented
from shared.errors import (
    BadInputError,
    ImageTooLargeError,
    OverloadedError,
    UnsupportedMediaTypeError,
)
from shared.fetch import fetch_image
from shared.images import check_size, decode_base64, open_image
from shared.keys import verdict_key
from shared.messages import Job, cached_verdict_body
from shared.schemas import JobAccepted, JobCancelled, JobRequest
from shared.submit import submit_job
from shared.text import check_text

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=documented(401, 422, 503))

BODY_OVERHEAD = 64 * 1024  # form fields, multipart boundaries, JSON keys and texts
REQUEST_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "text"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "text": {"type": "string"},
                        "premise": {"type": "string"},
                    },
                }
            },
            "application/json": {"schema": JobRequest.model_json_schema()},
        },
    }
}


class Submission:
    """A parsed, validated request: image bytes and texts."""

    def __init__(self, image: bytes, text: str, premise: str | None) -> None:
        self.image = image
        self.text = text
        self.premise = premise


async def _parse(request: Request, s: Services) -> Submission:
    """Read and validate the body (multipart or JSON) without storing anything."""
    limit = s.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # An image of `limit` bytes, base64-encoded in JSON, takes 4/3 as many.
    image_cap = limit * 4 // 3 if ctype == "application/json" else limit
    if declared and declared.isdigit() and int(declared) > image_cap + BODY_OVERHEAD:
        raise _too_large(limit)
    text_limit = s.settings.max_text_chars
    if ctype == "multipart/form-data":
        # The context closes the spooled upload files, whatever happens.
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise BadInputError("the multipart field 'image' (a file) is required")
            image = await upload.read(limit + 1)
            check_size(image, limit)
            text = check_text(form.get("text"), "text", text_limit, required=True)
            premise = check_text(form.get("premise"), "premise", text_limit, required=False)
        assert text is not None
        return Submission(image, text, premise)
    if ctype == "application/json":
        try:
            body = JobRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise BadInputError(detail or "invalid JSON body") from exc
        text = check_text(body.text, "text", text_limit, required=True)
        premise = check_text(body.premise, "premise", text_limit, required=False)
        assert text is not None
        if (body.image_base64 is None) == (body.image_url is None):
            raise BadInputError("give exactly one of image_base64 and image_url")
        if body.image_base64 is not None:
            image = decode_base64(body.image_base64, limit)
        else:
            assert body.image_url is not None
            image = await fetch_image(body.image_url, s.url_policy)
        return Submission(image, text, premise)
    raise UnsupportedMediaTypeError(
        f"send multipart/form-data or application/json, not {ctype or 'nothing'}"
    )


def _too_large(limit: int) -> BadInputError:
    return ImageTooLargeError(f"the request is larger than the {limit}-byte upload limit")


async def _wait_for(s: Services, job_id: str, seconds: float) -> Job | None:
    """The job once it has ended, or None after ``seconds``.

    Woken by the workers' pub/sub announcement; the record is re-read at least once a
    second as well, so a notification lost in a reconnect costs latency, not a hang.
    """
    deadline = time.monotonic() + seconds
    fut = s.waiter.register(job_id)
    try:
        while True:
            job = await s.jobs.aget(job_id)
            if job is not None and job.status.finished:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), min(remaining, 1.0))
    finally:
        s.waiter.forget(job_id, fut)


def _accepted(job_id: str) -> JSONResponse:
    return JSONResponse(
        JobAccepted(job_id=job_id).model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/jobs/{job_id}", "Retry-After": "1"},
    )


@router.post(
    "",
    openapi_extra=REQUEST_BODY_DOC,
    responses={
        200: {
            "description": "the verdict: from the cache (a CachedVerdict) at once, or, with "
            "?wait=, the finished job (a Job) once it ended within the wait",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/CachedVerdict"},
                            {"$ref": "#/components/schemas/Job"},
                        ]
                    }
                }
            },
        },
        202: {
            "model": JobAccepted,
            "description": "queued: poll Location",
            "links": {
                "GetJob": {
                    "operationId": "get_job_v1_jobs__job_id__get",
                    "parameters": {"job_id": "$response.body#/job_id"},
                }
            },
        },
        **documented(400, 413, 415),
    },
    summary="Submit an image and a sentence",
)
async def post_job(
    request: Request,
    s: ServicesDep,
    _auth: AuthDep,
    wait: float = Query(0, ge=0, description="seconds to hold the request for the verdict"),
) -> Response:
    """Answer from the cache (200), or queue the work and return a job id (202)."""
    sub = await _parse(request, s)
    model_id, revision = s.settings.model_tag
    key = verdict_key(model_id, revision, sub.image, sub.text, sub.premise)
    cached = await s.jobs.acached(key)
    if cached is not None:
        metrics.CACHE.labels("hit").inc()
        return Response(cached_verdict_body(cached), media_type="application/json")
    metrics.CACHE.labels("miss").inc()
    await run_in_threadpool(open_image, sub.image, s.settings.max_pixels)
    limit = s.settings.max_pending_jobs
    if limit and (pending := await s.jobs.apending()) >= limit:
        raise OverloadedError(pending, limit, retry_after_s=5)
    job_id, created = await run_in_threadpool(
        submit_job, s.jobs, s.celery, key, sub.image, sub.text, sub.premise
    )
    (metrics.ENQUEUED if created else metrics.DEDUPLICATED).inc()
    if wait > 0:
        job = await _wait_for(s, job_id, min(wait, s.settings.max_wait_s))
        if job is not None:
            return JSONResponse(json.loads(job.model_dump_json()))
    return _accepted(job_id)


@router.get("/{job_id}", response_model=Job, summary="Poll a job", responses=documented(404))
async def get_job(job_id: str, s: ServicesDep, _auth: AuthDep) -> Job:
    """Status, timestamps, and the verdict or error. Unknown or expired ids: 404."""
    job = await s.jobs.aget(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
    return job


@router.delete(
    "/{job_id}",
    response_model=JobCancelled,
    summary="Cancel a job",
    responses=documented(404),
)
async def delete_job(job_id: str, s: ServicesDep, _auth: AuthDep) -> JobCancelled:
    """A queued job nobody else joined is cancelled (it ends failed, "cancelled", and
    the next identical submission starts afresh). A job others joined keeps running for
    them ("detached"); a running or finished job is left to finish and its verdict is
    still cached ("unchanged")."""
    got = await s.jobs.acancel(job_id)
    if got is None:
        raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
    outcome, status = got
    return JobCancelled(job_id=job_id, outcome=outcome, status=status)
