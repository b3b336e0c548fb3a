"""The client's copy of the public models (clients/python/ofa_entail_client/models.py)
against the server's (shared/models.py): the same fields and statuses, and what one
side writes the other reads back equal, so that neither drifts from the other."""

from __future__ import annotations

import typing

import ofa_entail_client.models as client_models
import pytest
from pydantic import BaseModel

from shared import models as server_models

# Every model the API answers with that the client reads, server's and client's.
PAIRS: list[tuple[type[BaseModel], type[BaseModel]]] = [
    (server_models.Probabilities, client_models.Probabilities),
    (server_models.ModelRef, client_models.ModelRef),
    (server_models.Verdict, client_models.Verdict),
    (server_models.Job, client_models.Job),
    (server_models.ScanSummary, client_models.ScanSummary),
    (server_models.ChangeCounts, client_models.ChangeCounts),
    (server_models.ScanChange, client_models.ScanChange),
    (server_models.CurvePoint, client_models.CurvePoint),
    (server_models.ScanReport, client_models.ScanReport),
]

VERDICT = server_models.Verdict(
    label="contradiction",
    answer="no",
    probabilities=server_models.Probabilities(
        entailment=0.0312, contradiction=0.9104, neutral=0.0584
    ),
    model=server_models.ModelRef(id="iic/ofa_visual-entailment_snli-ve_large_en", revision="v1"),
    key="3f" * 32,
)

SERVER_DOCS: list[BaseModel] = [
    server_models.Job(
        job_id="9f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e",
        status=server_models.JobStatus.SUCCEEDED,
        cached=False,
        created_at=1767225600.125,
        started_at=1767225600.25,
        finished_at=1767225600.5,
        verdict=VERDICT,
    ),
    server_models.Job(
        job_id="0a1b2c3d4e5f60718293a4b5c6d7e8f9",
        status=server_models.JobStatus.FAILED,
        created_at=1767225600.0,
        finished_at=1767225601.0,
        error="image could not be decoded (truncated)",
    ),
    server_models.Job(job_id="5" * 32, status=server_models.JobStatus.QUEUED),
    server_models.ScanSummary(
        scan_id="7d3e" * 8,
        status=server_models.ScanStatus.RUNNING,
        total=1000,
        read=640,
        done=600,
        cached=120,
        failed=3,
        pending=37,
        created_at=1767225600.0,
        started_at=1767225601.5,
        rate_rows_per_s=212.5,
        eta_s=1.9,
        callback_url="https://hooks.example.com/ofa",
    ),
    server_models.ScanSummary(
        scan_id="5e6f" * 8,
        status=server_models.ScanStatus.SUCCEEDED,
        total=3,
        done=3,
        finished_at=1767225700.0,
        catalogue="shop-eu",
        baseline_scan="7d3e" * 8,
        changes=server_models.ChangeCounts(label_changed=1, added=2, unmatched=1),
    ),
    server_models.ScanChange(
        kind="label_changed",
        id="sku-1",
        old_label="entailment",
        old_probabilities=VERDICT.probabilities,
        new_label="contradiction",
        new_probabilities=VERDICT.probabilities,
    ),
    server_models.ScanChange(kind="newly_failed", id="sku-2", new_error="missing image"),
    server_models.ScanSummary(
        scan_id="1c2d" * 8,
        status=server_models.ScanStatus.FAILED,
        error="manifest line 3 is not JSON",
        finished_at=1767225700.0,
    ),
    server_models.ScanReport(
        scan_id="7d3e" * 8,
        labelled=4,
        accuracy=0.75,
        labels=["entailment", "contradiction", "neutral"],
        confusion={
            "entailment": {"entailment": 2, "contradiction": 0, "neutral": 0},
            "contradiction": {"entailment": 0, "contradiction": 1, "neutral": 0},
            "neutral": {"entailment": 1, "contradiction": 0, "neutral": 0},
        },
        curves={
            "entailment": [
                server_models.CurvePoint(threshold=0.0, precision=0.667, recall=1.0),
                server_models.CurvePoint(threshold=0.9, precision=None, recall=0.0),
            ],
            "neutral": [server_models.CurvePoint(threshold=0.5, precision=0.0, recall=None)],
        },
    ),
]


def _client_twin(doc: BaseModel) -> type[BaseModel]:
    return dict(PAIRS)[type(doc)]


@pytest.mark.parametrize(("server", "client"), PAIRS, ids=lambda m: m.__name__)
def test_the_field_names_and_requirements_match(server, client):
    assert list(client.model_fields) == list(server.model_fields)
    for name, field in server.model_fields.items():
        assert client.model_fields[name].is_required() == field.is_required(), name
        if not field.is_required():
            assert client.model_fields[name].default == field.default, name


@pytest.mark.parametrize(
    ("server", "client"),
    [
        (server_models.JobStatus, client_models.JobStatus),
        (server_models.ScanStatus, client_models.ScanStatus),
    ],
    ids=lambda e: e.__name__,
)
def test_the_statuses_match(server, client):
    assert [s.value for s in client] == [s.value for s in server]
    assert [client(s.value).finished for s in server] == [s.finished for s in server]


def test_the_labels_match():
    assert typing.get_args(client_models.Label) == typing.get_args(server_models.Label)


@pytest.mark.parametrize("doc", SERVER_DOCS, ids=lambda d: type(d).__name__)
def test_what_the_server_writes_the_client_reads_and_writes_back(doc):
    wire = doc.model_dump_json()
    read = _client_twin(doc).model_validate_json(wire)
    assert read.model_dump(mode="json") == doc.model_dump(mode="json")
    # ... and the other way: what the client holds is what the server meant.
    assert type(doc).model_validate_json(read.model_dump_json()) == doc


def test_the_client_reads_the_cached_answer_body():
    """``POST /v1/jobs`` answered from the cache is built without pydantic on the server
    (``cached_verdict_body``); the client reads its ``verdict``."""
    import json

    body = server_models.cached_verdict_body(VERDICT.model_dump_json().encode())
    read = client_models.Verdict.model_validate(json.loads(body)["verdict"])
    assert read.model_dump() == VERDICT.model_dump()


def test_fields_a_newer_server_adds_are_ignored():
    doc = SERVER_DOCS[0].model_dump(mode="json")
    doc["priority"] = "high"
    doc["verdict"]["explanation"] = {"tokens": [1, 2]}
    job = client_models.Job.model_validate(doc)
    assert not hasattr(job, "priority") and job.verdict is not None
    assert job.model_dump(mode="json") == SERVER_DOCS[0].model_dump(mode="json")
