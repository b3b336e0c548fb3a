"""``POST /v1/jobs`` and ``GET /v1/jobs/{id}``: submit, answer from cache, or queue; poll.

HTTP only: parse and validate the body into a ``Submission``, hand it to
``api/admission.py``, and turn what it came to into a response."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from api import admission, openapi
from api.admission import Submission
from api.callbacks import check_callback
from api.deps import JobsCall, ReadCall, Services
from api.forms import read_form
from api.problems import REFUSALS, refusal
from api.schemas import (
    BatchAccepted,
    BatchItem,
    BatchRequest,
    JobAccepted,
    JobCancelled,
    JobRequest,
)
from shared.errors import BadInputError, UnsupportedMediaTypeError
from shared.fetch import fetch_image
from shared.images import check_size, decode_base64
from shared.models import Job, cached_verdict_body
from shared.submit import send_hooks
from shared.text import check_text

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=openapi.ROUTER_ERRORS)


def _json_error(exc: ValidationError) -> BadInputError:
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return BadInputError(detail or "invalid JSON body")


async def _from_fields(
    s: Services, image: bytes, text: Any, premise: Any, callback: Any
) -> Submission:
    """Check an uploaded image's size and the text fields."""
    limit = s.settings.max_text_chars
    check_size(image, s.settings.max_upload_bytes)
    checked = check_text(text, "text", limit, required=True)
    assert checked is not None
    return Submission(
        image,
        checked,
        check_text(premise, "premise", limit, required=False),
        await check_callback(s, callback),
    )


async def _from_form(s: Services, form: FormData, suffix: str) -> Submission:
    """The item of a multipart form whose fields end in ``suffix`` ("" for the single
    endpoint, "_0", "_1", ... in a batch)."""
    upload = form.get(f"image{suffix}")
    if not isinstance(upload, UploadFile):
        raise BadInputError(f"the multipart field 'image{suffix}' (a file) is required")
    image = await upload.read(s.settings.max_upload_bytes + 1)
    return await _from_fields(
        s,
        image,
        form.get(f"text{suffix}"),
        form.get(f"premise{suffix}"),
        form.get(f"callback_url{suffix}"),
    )


async def _from_json(s: Services, body: JobRequest) -> Submission:
    """A JSON item: texts checked, then the image decoded or fetched."""
    limit = s.settings.max_text_chars
    text = check_text(body.text, "text", limit, required=True)
    premise = check_text(body.premise, "premise", limit, required=False)
    assert text is not None
    if (body.image_base64 is None) == (body.image_url is None):
        raise BadInputError("give exactly one of image_base64 and image_url")
    callback = await check_callback(s, body.callback_url)
    if body.image_base64 is not None:
        image = decode_base64(body.image_base64, s.settings.max_upload_bytes)
    else:
        assert body.image_url is not None
        image = await fetch_image(body.image_url, s.url_policy)
    return Submission(image, text, premise, callback)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _parse(request: Request, s: Services) -> Submission:
    """Read and validate the body (multipart or JSON) without storing anything. Its
    size is bounded as it arrives, chunked or not, by ``api/bodylimit.py``: one image,
    base64 in JSON or a file, and the fields."""
    ctype = _content_type(request)
    if ctype == "multipart/form-data":
        # The context closes the upload files, whatever happens.
        async with read_form(request, max_files=1, max_fields=8) as form:
            return await _from_form(s, form, "")
    if ctype == "application/json":
        try:
            body = JobRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _json_error(exc) from exc
        return await _from_json(s, body)
    raise _unsupported(ctype)


def _unsupported(ctype: str) -> UnsupportedMediaTypeError:
    return UnsupportedMediaTypeError(
        f"send multipart/form-data or application/json, not {ctype or 'nothing'}"
    )


@router.post(
    "",
    openapi_extra=openapi.POST_JOB_BODY,
    responses=openapi.POST_JOB_RESPONSES,
    summary="Submit an image and a sentence",
)
async def post_job(
    request: Request,
    call: JobsCall,
    wait: float = Query(0, ge=0, description="seconds to hold the request for the verdict"),
) -> Response:
    """Answer from the cache (200), or queue the work and return a job id (202)."""
    s = call.services
    admitted = await admission.admit(s, call.caller, await _parse(request, s))
    headers = admitted.limited.headers() if admitted.limited else {}
    if admitted.cached is not None:
        return Response(
            cached_verdict_body(admitted.cached), media_type="application/json", headers=headers
        )
    assert admitted.job_id is not None
    job = await admission.finished(s, admitted, wait)
    if job is not None:
        return Response(job.model_dump_json(), media_type="application/json", headers=headers)
    headers.update({"Location": f"/v1/jobs/{admitted.job_id}", "Retry-After": "1"})
    return JSONResponse(
        JobAccepted(job_id=admitted.job_id).model_dump(mode="json"),
        status_code=202,
        headers=headers,
    )


async def _batch_items(request: Request, s: Services) -> list[Submission | Exception]:
    """Each item parsed on its own: a Submission, or the refusal it gets. The whole
    body is bounded as it arrives by ``OFA_BATCH_MAX_BYTES`` (``api/bodylimit.py``)."""
    cap = s.settings.batch_max_items
    ctype = _content_type(request)
    out: list[Submission | Exception] = []
    if ctype == "application/json":
        try:
            body = BatchRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _json_error(exc) from exc
        if not body.items or len(body.items) > cap:
            raise BadInputError(f"give 1 to {cap} items, not {len(body.items)}")
        for item in body.items:
            try:
                out.append(await _from_json(s, item))
            except BadInputError as exc:
                out.append(exc)
        return out
    if ctype == "multipart/form-data":
        async with read_form(request, max_files=cap, max_fields=4 * cap + 4) as form:
            indexes = sorted(
                {int(k.split("_")[-1]) for k in form if re.fullmatch(r"(image|text)_\d{1,4}", k)}
            )
            if not indexes or len(indexes) > cap or indexes != list(range(len(indexes))):
                raise BadInputError(
                    f"give 1 to {cap} items as image_0/text_0, image_1/text_1, ... numbered "
                    "from 0 without gaps"
                )
            for i in indexes:
                try:
                    out.append(await _from_form(s, form, f"_{i}"))
                except BadInputError as exc:
                    out.append(exc)
        return out
    raise _unsupported(ctype)


@router.post(
    "/batch",
    openapi_extra=openapi.POST_BATCH_BODY,
    response_model=BatchAccepted,
    response_model_exclude_none=True,
    summary="Submit several items at once",
    responses=openapi.BODY_ERRORS,
)
async def post_batch(request: Request, call: JobsCall) -> BatchAccepted:
    """Up to ``OFA_BATCH_MAX_ITEMS`` items, each answered on its own, in order: a cached
    verdict (status 200), a job id to poll (202), or its own problem (4xx/5xx, as the
    single endpoint would give). A refused item stores nothing; the others go on. Each
    item counts against the key's rate limit like a single submission."""
    s, caller = call.services, call.caller
    answers: list[BatchItem] = []
    for index, item in enumerate(await _batch_items(request, s)):
        try:
            if isinstance(item, Exception):
                raise item
            got = await admission.admit(s, caller, item)
        except REFUSALS as exc:
            status, body, headers = refusal(exc)
            if status == 429 and headers:
                body["retry_after"] = int(headers["Retry-After"])
            answers.append(BatchItem(index=index, status=status, problem=body))
            continue
        if got.cached is not None:
            answers.append(BatchItem(index=index, status=200, verdict=json.loads(got.cached)))
        else:
            answers.append(BatchItem(index=index, status=202, job_id=got.job_id))
    return BatchAccepted(items=answers)


@router.get("/{job_id}", response_model=Job, summary="Poll a job", responses=openapi.NOT_FOUND)
async def get_job(job_id: str, call: ReadCall) -> Job:
    """Status, timestamps, and the verdict or error. Unknown or expired ids, and other
    keys' jobs (unless this key has the ``admin`` scope): 404."""
    got = await call.services.reads.aread(job_id)
    if got is None or not call.caller.owns(got.owner):
        raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
    return got.job


@router.delete(
    "/{job_id}",
    response_model=JobCancelled,
    summary="Cancel a job",
    responses=openapi.NOT_FOUND,
)
async def delete_job(job_id: str, call: JobsCall) -> JobCancelled:
    """A queued job nobody else joined is cancelled (it ends failed, "cancelled", and
    the next identical submission starts afresh). A job others joined keeps running for
    them ("detached"); a running or finished job is left to finish and its verdict is
    still cached ("unchanged"). A job this key joined (its own handle) is cancelled for
    this key alone. The job's webhooks are sent (with the job, failed "cancelled").
    Other keys' jobs: 404."""
    s = call.services
    got = await s.reads.aread(job_id)
    if got is None or not call.caller.owns(got.owner):
        raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
    cancelled = await s.jobs.acancel(job_id, got)
    if cancelled is None:
        raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
    outcome, status, hooks = cancelled
    if hooks:
        await run_in_threadpool(send_hooks, s.celery, job_id, hooks)
    return JobCancelled(job_id=job_id, outcome=outcome, status=status)
