"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Label = Literal["entailment", "contradiction", "neutral"]
Status = Literal["queued", "running", "succeeded", "failed"]


class Probabilities(BaseModel):
    """Probability of each label; they sum to 1."""

    entailment: float
    contradiction: float
    neutral: float


class ModelRef(BaseModel):
    """Which model produced a verdict."""

    id: str
    revision: str


class Verdict(BaseModel):
    """Does the image support the text?"""

    label: Label
    answer: str = Field(description="the model's raw answer: yes, no or maybe")
    probabilities: Probabilities
    model: ModelRef
    key: str = Field(description="SHA-256 cache key of model, image and normalised texts")


class JobRequest(BaseModel):
    """JSON form of ``POST /v1/jobs`` (multipart takes an ``image`` file instead)."""

    text: str = Field(description="the hypothesis: does the image support it?")
    premise: str | None = Field(None, description="optional premise text")
    image_base64: str | None = Field(None, description="the image file, base64-encoded")
    image_url: str | None = Field(None, description="an http(s) URL of the image")


class Job(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` reports it."""

    job_id: str
    status: Status
    cached: bool = False
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    verdict: Verdict | None = None
    error: str | None = None


class CachedVerdict(BaseModel):
    """``POST /v1/jobs`` answered from the cache."""

    status: Literal["succeeded"] = "succeeded"
    cached: Literal[True] = True
    verdict: Verdict


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
