"""The service's answers as the client reads them: its own pydantic models.

They mirror the server's public models field for field (the repository's
``tests/clients/test_models_contract.py`` holds the two copies together), and ignore
fields they do not know, so a newer server that reports more does not break an older
client.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict

Label = Literal["entailment", "contradiction", "neutral"]


class _Model(BaseModel):
    # Unknown fields are dropped, never refused: the server may add fields.
    model_config = ConfigDict(extra="ignore")


class _StrEnum(str, Enum):
    # A str mixin rather than enum.StrEnum (3.11+), so that the client runs on 3.10;
    # str() and f-strings give the value, as StrEnum does.
    def __str__(self) -> str:
        return str(self.value)


class JobStatus(_StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """True for the terminal states."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class ScanStatus(_StrEnum):
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


class Probabilities(_Model):
    """Probability of each label; they sum to 1."""

    entailment: float
    contradiction: float
    neutral: float


class ModelRef(_Model):
    """Which model produced a verdict."""

    id: str
    revision: str


class Verdict(_Model):
    """Does the image support the text?"""

    label: Label
    answer: str  # the model's raw answer: yes, no or maybe
    probabilities: Probabilities
    model: ModelRef
    key: str  # SHA-256 cache key of model, image and normalised texts


class Job(_Model):
    """A job as ``GET /v1/jobs/{id}`` reports it."""

    job_id: str
    status: JobStatus
    cached: bool = False
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    verdict: Verdict | None = None
    error: str | None = None


class ChangeCounts(_Model):
    """How a catalogue scan's rows changed since the catalogue's previous succeeded scan,
    matched by row id."""

    label_changed: int = 0
    newly_failed: int = 0
    recovered: int = 0
    added: int = 0
    removed: int = 0
    unmatched: int = 0  # rows not compared: no id, or an id seen earlier


class ScanSummary(_Model):
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
    catalogue: str | None = None  # its changes are counted against the catalogue's last scan
    baseline_scan: str | None = None  # the previous succeeded scan it was compared with
    changes: ChangeCounts | None = None  # what changed since baseline_scan
    total_known: bool = True  # false: a manifest still being read; total: rows so far
    manifest_url: str | None = None  # the object the manifest is read from
    results_url: str | None = None  # where the results are written when the scan ends
    results_format: Literal["jsonl", "csv", "parquet"] | None = None
    results_written: bool | None = None  # null: not yet, or no results_url
    results_error: str | None = None


ChangeKind = Literal["label_changed", "newly_failed", "recovered", "added", "removed"]


class ScanChange(_Model):
    """One line of ``GET /v1/scans/{id}/changes``: a row whose outcome changed."""

    kind: ChangeKind
    id: str
    old_label: Label | None = None
    old_probabilities: Probabilities | None = None
    old_error: str | None = None
    new_label: Label | None = None
    new_probabilities: Probabilities | None = None
    new_error: str | None = None


class CurvePoint(_Model):
    """Precision and recall of one label when it is predicted at probability >= threshold."""

    threshold: float
    precision: float | None  # None: nothing predicted at this threshold
    recall: float | None  # None: no row has this gold label


class ScanReport(_Model):
    """How the model did on a scan's rows that carry a gold ``label``."""

    scan_id: str
    labelled: int  # finished rows with a gold label (the others are not counted)
    accuracy: float | None = None  # share of labelled rows predicted right
    labels: list[str]
    confusion: dict[str, dict[str, int]]  # gold label -> predicted label -> rows
    curves: dict[str, list[CurvePoint]]  # per label: precision and recall by threshold
