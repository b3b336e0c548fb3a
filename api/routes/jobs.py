"""``POST /v1/jobs`` and ``GET /v1/jobs/{id}``: submit, answer from cache, or queue; poll."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from api import metrics
from api.callbacks import check_callback
from api.deps import JobsCall, ReadCall, Services, charge
from api.forms import read_form
from api.problems import REFUSALS, documented, refusal
from api.schemas import (
    BatchAccepted,
    BatchItem,
    BatchRequest,
    JobAccepted,
    JobCancelled,
    JobRequest,
)
from shared.errors import (
    BadInputError,
    OverloadedError,
    UnsupportedMediaTypeError,
)
from shared.fetch import fetch_image
from shared.images import check_image, check_size, decode_base64, decoded_pixels
from shared.keys import verdict_key
from shared.models import Job, cached_verdict_body
from shared.store.apikeys import Caller
from shared.store.limits import Decision
from shared.submit import asubmit_owned, send_hooks
from shared.text import check_text

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=documented(401, 403, 422, 429, 503))

# Uploads this small are checked on the event loop (a 2 KB JPEG in ~0.1 ms, 35 KB in
# ~0.8 ms): cheaper than the hop to a thread, short enough not to hold the loop up...
INLINE_CHECK_BYTES = 8 * 1024
# ...when their header also declares few pixels to decode: a 1 KB WEBP or PNG of one
# colour can declare 4000x4000 (~120 ms to decode); 65,536 (a JPEG's at 1/8 scale) take
# at most ~0.6 ms in any accepted format.
INLINE_CHECK_PIXELS = 256 * 256
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
                        # An empty example: Swagger UI's "Try it out" would otherwise
                        # fill in "string", which is no URL.
                        "callback_url": {"type": "string", "format": "uri", "example": ""},
                    },
                }
            },
            "application/json": {"schema": JobRequest.model_json_schema()},
        },
    }
}


class Submission:
    """A parsed, validated request: image bytes, texts, and an optional webhook."""

    def __init__(
        self, image: bytes, text: str, premise: str | None, callback_url: str | None = None
    ) -> None:
        self.image = image
        self.text = text
        self.premise = premise
        self.callback_url = callback_url


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


async def _wait_for(
    s: Services, job_id: str, seconds: float, fresh: bool = False, watch: str | None = None
) -> Job | None:
    """The job once it has ended, or None after ``seconds``.

    Woken by the workers' pub/sub announcement, which carries the final record (no
    read then); the record is re-read at least once a second as well, so a
    notification lost in a reconnect costs latency, not a hang.
    A ``fresh`` job (created by this request, with no await since) cannot have ended
    unannounced: its first read waits for the announcement. ``watch``: the id that is
    announced, when ``job_id`` is a handle (the job it follows).
    """
    deadline = time.monotonic() + seconds
    watched = watch or job_id
    fut = s.waiter.register(watched)
    try:
        while True:
            if fut.done() and (record := fut.result()) is not None:
                return s.jobs.job_of(job_id, record)  # the announcement carried it
            if not fresh:
                job = await s.jobs.aget(job_id)
                if job is not None and job.status.finished:
                    return job
            fresh = False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), min(remaining, 1.0))
    finally:
        s.waiter.forget(watched, fut)


@dataclass
class Answer:
    """What one submission came to: a cached verdict, or a job (created or joined)."""

    cached: bytes | None = None
    job_id: str | None = None
    created: bool = False
    limited: Decision | None = None
    fresh: bool = False  # created with no await since: see _wait_for
    computed_by: str | None = None  # the job announced when it ends (a handle's job)


async def _submit(s: Services, caller: Caller, sub: Submission) -> Answer:
    """The cache, the caller's rate limit, the image check, load shedding, then the
    job; each refusal raises before anything is stored."""
    model_id, revision = s.settings.model_tag
    tenant = caller.key_id if s.settings.cache_scope == "key" else None
    key = verdict_key(model_id, revision, sub.image, sub.text, sub.premise, tenant=tenant)
    cached = await s.jobs.acached(key)
    if cached is not None:
        metrics.CACHE_HIT.inc()
        limited = await charge(s, caller, "hit", "cached verdicts")
        return Answer(cached=cached, limited=limited)
    metrics.CACHE_MISS.inc()
    if len(sub.image) <= INLINE_CHECK_BYTES and decoded_pixels(sub.image) <= INLINE_CHECK_PIXELS:
        check_image(sub.image, s.settings.max_pixels)  # cheaper than a hop to a thread
    else:
        await run_in_threadpool(check_image, sub.image, s.settings.max_pixels)
    await _shed(s, key, len(sub.image))
    limited = await charge(s, caller, "miss", "new jobs")
    got = await asubmit_owned(
        s.jobs,
        s.celery,
        key,
        sub.image,
        sub.text,
        sub.premise,
        sub.callback_url,
        owner=caller.key_id,
        tenant=tenant,
    )
    (metrics.ENQUEUED if got.created else metrics.DEDUPLICATED).inc()
    fresh = got.created and not sub.callback_url  # adding a hook awaited a thread
    return Answer(
        job_id=got.job_id,
        created=got.created,
        limited=limited,
        fresh=fresh,
        computed_by=got.job,
    )


async def _shed(s: Services, key: str, image_bytes: int) -> None:
    """Load shedding (503 + Retry-After): past ``OFA_MAX_PENDING_JOBS`` unfinished
    interactive jobs, or past ``OFA_MAX_PENDING_IMAGE_BYTES`` of images held for them,
    unless the submission joins a job already computing its key (that adds nothing).
    Scans' jobs are not counted: bulk work never sheds another key's submission."""
    count_cap = s.settings.max_pending_jobs
    bytes_cap = s.settings.max_pending_image_bytes
    if not count_cap and not bytes_cap:
        return
    pending, held = await s.jobs.aadmission()
    over_count = bool(count_cap) and pending >= count_cap
    over_bytes = bool(bytes_cap) and held + image_bytes > bytes_cap
    if (over_count or over_bytes) and not await s.jobs.ain_flight(key):
        if over_count:
            raise OverloadedError(pending, count_cap, retry_after_s=5)
        raise OverloadedError(held, bytes_cap, retry_after_s=5, what="bytes of images")


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
    call: JobsCall,
    wait: float = Query(0, ge=0, description="seconds to hold the request for the verdict"),
) -> Response:
    """Answer from the cache (200), or queue the work and return a job id (202)."""
    s = call.services
    answer = await _submit(s, call.caller, await _parse(request, s))
    headers = answer.limited.headers() if answer.limited else {}
    if answer.cached is not None:
        return Response(
            cached_verdict_body(answer.cached), media_type="application/json", headers=headers
        )
    assert answer.job_id is not None
    if wait > 0:
        job = await _wait_for(
            s,
            answer.job_id,
            min(wait, s.settings.max_wait_s),
            answer.fresh,
            answer.computed_by,
        )
        if job is not None:
            return Response(job.model_dump_json(), media_type="application/json", headers=headers)
    headers.update({"Location": f"/v1/jobs/{answer.job_id}", "Retry-After": "1"})
    return JSONResponse(
        JobAccepted(job_id=answer.job_id).model_dump(mode="json"), status_code=202, headers=headers
    )


def inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` written in place of their references:
    an OpenAPI document has no ``#/$defs/...`` (ReDoc refuses the whole document with
    "Invalid reference token: $defs"; Swagger UI happens to resolve them)."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


BATCH_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_defs(BatchRequest.model_json_schema())},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "item i: a file image_i, text_i, optional premise_i and "
                    "callback_url_i (i = 0, 1, ...)",
                    "required": ["image_0", "text_0"],
                    "properties": {
                        "image_0": {"type": "string", "format": "binary"},
                        "text_0": {"type": "string"},
                        "premise_0": {"type": "string"},
                        "callback_url_0": {"type": "string"},
                    },
                }
            },
        },
    }
}


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
    openapi_extra=BATCH_BODY_DOC,
    response_model=BatchAccepted,
    response_model_exclude_none=True,
    summary="Submit several items at once",
    responses=documented(400, 413, 415),
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
            got = await _submit(s, caller, item)
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


@router.get("/{job_id}", response_model=Job, summary="Poll a job", responses=documented(404))
async def get_job(job_id: str, call: ReadCall) -> Job:
    """Status, timestamps, and the verdict or error. Unknown or expired ids, and other
    keys' jobs (unless this key has the ``admin`` scope): 404."""
    got = await call.services.jobs.aread(job_id)
    if got is None or not call.caller.owns(got.owner):
        raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
    return got.job


@router.delete(
    "/{job_id}",
    response_model=JobCancelled,
    summary="Cancel a job",
    responses=documented(404),
)
async def delete_job(job_id: str, call: JobsCall) -> JobCancelled:
    """A queued job nobody else joined is cancelled (it ends failed, "cancelled", and
    the next identical submission starts afresh). A job others joined keeps running for
    them ("detached"); a running or finished job is left to finish and its verdict is
    still cached ("unchanged"). A job this key joined (its own handle) is cancelled for
    this key alone. The job's webhooks are sent (with the job, failed "cancelled").
    Other keys' jobs: 404."""
    s = call.services
    got = await s.jobs.aread(job_id)
    if got is None or not call.caller.owns(got.owner):
        raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
    cancelled = await s.jobs.acancel(job_id, got)
    if cancelled is None:
        raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
    outcome, status, hooks = cancelled
    if hooks:
        await run_in_threadpool(send_hooks, s.celery, job_id, hooks)
    return JobCancelled(job_id=job_id, outcome=outcome, status=status)
