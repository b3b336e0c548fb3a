"""Request and response bodies of the HTTP API that no other process sees (the shapes
that cross process boundaries live in ``shared.models``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from shared.models import JobStatus, ScanStatus


class JobRequest(BaseModel):
    """JSON form of ``POST /v1/jobs`` (multipart takes an ``image`` file instead)."""

    text: str = Field(description="the hypothesis: does the image support it?")
    premise: str | None = Field(None, description="optional premise text")
    image_base64: str | None = Field(None, description="the image file, base64-encoded")
    image_url: str | None = Field(None, description="an http(s) URL of the image")
    callback_url: str | None = Field(
        None,
        description="POSTed the finished job, signed (X-OFA-Signature), when it ends; "
        "not called for an answer served from the cache",
    )


class BatchRequest(BaseModel):
    """JSON form of ``POST /v1/jobs/batch``."""

    items: list[JobRequest] = Field(description="the items, answered in the same order")


class BatchItem(BaseModel):
    """One item's answer: a cached verdict (200), a job id (202), or its own problem."""

    index: int
    status: int = Field(description="the HTTP status this item alone would have had")
    job_id: str | None = None
    verdict: dict | None = Field(None, description="the cached verdict (status 200)")
    problem: dict | None = Field(None, description="why the item was refused (4xx/5xx)")


class BatchAccepted(BaseModel):
    """What ``POST /v1/jobs/batch`` did with each item."""

    items: list[BatchItem]


class JobAccepted(BaseModel):
    """``POST /v1/jobs`` queued the work (or joined the job already doing it)."""

    job_id: str
    status: Literal[JobStatus.QUEUED] = JobStatus.QUEUED


class JobCancelled(BaseModel):
    """What ``DELETE /v1/jobs/{id}`` did."""

    job_id: str
    outcome: Literal["cancelled", "detached", "unchanged"] = Field(
        description="cancelled: it will not run; detached: others joined it, it runs on for "
        "them; unchanged: it was already running or finished (its verdict is cached)"
    )
    status: JobStatus


class ScanAccepted(BaseModel):
    """``POST /v1/scans`` stored the manifest and queued the coordinator."""

    scan_id: str
    status: Literal[ScanStatus.QUEUED] = ScanStatus.QUEUED
    total: int


class Problem(BaseModel):
    """An error, as RFC 9457 ``application/problem+json``."""

    type: str = Field(description="a URI naming the kind of problem")
    title: str
    status: int
    detail: str
