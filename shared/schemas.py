"""Request and response bodies of the HTTP API that no other process sees (the shapes
that cross process boundaries live in ``shared.messages``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from shared.messages import JobStatus, ScanStatus


class JobRequest(BaseModel):
    """JSON form of ``POST /v1/jobs`` (multipart takes an ``image`` file instead)."""

    text: str = Field(description="the hypothesis: does the image support it?")
    premise: str | None = Field(None, description="optional premise text")
    image_base64: str | None = Field(None, description="the image file, base64-encoded")
    image_url: str | None = Field(None, description="an http(s) URL of the image")


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
