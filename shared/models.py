"""Every shape that crosses a process boundary, in one module.

Statuses are enums, the task message is a pydantic model both the sender (API or
coordinator) and the receiver (worker) validate, and the verdict is one model whether
it sits in the cache, a job record, a scan's results file or an HTTP response.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

Label = Literal["entailment", "contradiction", "neutral"]


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """True for the terminal states."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class ScanStatus(StrEnum):
    """Where a scan is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """True for the terminal states."""
        return self in (ScanStatus.SUCCEEDED, ScanStatus.CANCELLED, ScanStatus.FAILED)


class RowState(StrEnum):
    """A manifest row's state in the scan's results file."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


# --- the verdict -----------------------------------------------------------------------


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
    """Does the image support the text? What the cache holds, as JSON."""

    label: Label
    answer: str = Field(description="the model's raw answer: yes, no or maybe")
    probabilities: Probabilities
    model: ModelRef
    key: str = Field(description="SHA-256 cache key of model, image and normalised texts")


class CachedVerdict(BaseModel):
    """``POST /v1/jobs`` answered from the cache."""

    status: Literal["succeeded"] = "succeeded"
    cached: Literal[True] = True
    verdict: Verdict


def cached_verdict_body(verdict_json: bytes) -> bytes:
    """A ``CachedVerdict`` body around a cached verdict's JSON, without parsing it again
    (the cache-hit path's hot loop); ``tests/shared/test_models.py`` checks it
    validates as ``CachedVerdict``."""
    return b'{"status":"succeeded","cached":true,"verdict":' + verdict_json + b"}"


# --- the task message ------------------------------------------------------------------


class EntailTask(BaseModel):
    """The ``ofa.entail`` message: one job for a worker serving ``model@revision``.

    Sent as the task's single keyword argument ``msg`` (JSON); the worker validates it
    with Celery's pydantic support.
    """

    job_id: str
    key: str
    model: str
    revision: str
    text: str
    premise: str | None = None
    scan_id: str | None = None
    # The API key whose private cache the verdict belongs to (``OFA_CACHE_SCOPE=key``);
    # part of the job's key, so the worker needs it to check the bytes it scores.
    tenant: str | None = None

    @property
    def bulk(self) -> bool:
        """Scan jobs travel on the model's bulk queue and yield to interactive ones."""
        return self.scan_id is not None


class EntailChunk(BaseModel):
    """The ``ofa.entail.chunk`` message: a scan's jobs for one model, sent together on
    the bulk queue (one Celery message, one task in Flower, for up to
    ``OFA_BULK_CHUNK_JOBS`` rows). Each still has its own job record and outcome."""

    model: str
    revision: str
    items: list[EntailTask]


# --- jobs and scans as the API reports them --------------------------------------------


class Job(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` reports it."""

    job_id: str
    status: JobStatus
    cached: bool = False
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    verdict: Verdict | None = None
    error: str | None = None


class ScanSummary(BaseModel):
    """A scan's progress, as ``GET /v1/scans/{id}`` and the completion callback report it."""

    scan_id: str
    status: ScanStatus
    total: int = 0
    read: int = 0
    done: int = 0
    cached: int = 0
    failed: int = 0
    pending: int = 0
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    rate_rows_per_s: float = 0.0
    eta_s: float | None = None
    callback_url: str | None = None
    error: str | None = None


class ScanCounts(BaseModel):
    """Row counts the coordinator publishes from the results file."""

    read: int = 0
    done: int = 0
    cached: int = 0
    failed: int = 0
    pending: int = 0


class CurvePoint(BaseModel):
    """Precision and recall of one label when it is predicted at probability >= threshold."""

    threshold: float
    precision: float | None  # None: nothing predicted at this threshold
    recall: float | None  # None: no row has this gold label


class ScanReport(BaseModel):
    """How the model did on a scan's rows that carry a gold ``label``."""

    scan_id: str
    labelled: int = Field(
        description="finished rows with a gold label (the others are not counted)"
    )
    accuracy: float | None = Field(None, description="share of labelled rows predicted right")
    labels: list[str]
    confusion: dict[str, dict[str, int]] = Field(
        description="gold label -> predicted label -> rows"
    )
    curves: dict[str, list[CurvePoint]] = Field(
        description="per label: precision and recall across thresholds on its probability"
    )
