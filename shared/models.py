"""The shapes the stores and the API share: statuses as enums, and the verdict as one
model whether it sits in the cache, a job record, a scan's results file or an HTTP
response. The task messages (``EntailTask``, ``EntailChunk``) are in ``shared/wire.py``.
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


class ChangeCounts(BaseModel):
    """How a catalogue scan's rows changed since the catalogue's previous succeeded scan,
    matched by row id."""

    label_changed: int = 0
    newly_failed: int = 0
    recovered: int = 0
    added: int = 0
    removed: int = 0
    unmatched: int = Field(0, description="rows not compared: no id, or an id seen earlier")


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
    catalogue: str | None = Field(
        None,
        description="the catalogue the scan belongs to: its changes are counted against "
        "the catalogue's previous succeeded scan",
    )
    baseline_scan: str | None = Field(
        None, description="the previous succeeded scan of the catalogue it was compared with"
    )
    changes: ChangeCounts | None = Field(
        None,
        description="what changed since baseline_scan (once a catalogue scan succeeded "
        "with a baseline to compare with)",
    )
    total_known: bool = Field(
        True,
        description="false while a manifest read from object storage has not been read "
        "to its end: total counts the rows read so far",
    )
    manifest_url: str | None = Field(None, description="the object the manifest is read from")
    results_url: str | None = Field(
        None, description="where the results are written when the scan ends"
    )
    results_format: Literal["jsonl", "csv", "parquet"] | None = None
    results_written: bool | None = Field(
        None,
        description="whether the results were written to results_url (null: not yet, or "
        "no results_url)",
    )
    results_error: str | None = Field(None, description="why writing the results failed")


ChangeKind = Literal["label_changed", "newly_failed", "recovered", "added", "removed"]


class ScanChange(BaseModel):
    """One line of ``GET /v1/scans/{id}/changes``: a row whose outcome changed."""

    kind: ChangeKind
    id: str
    old_label: Label | None = None
    old_probabilities: Probabilities | None = None
    old_error: str | None = None
    new_label: Label | None = None
    new_probabilities: Probabilities | None = None
    new_error: str | None = None


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
