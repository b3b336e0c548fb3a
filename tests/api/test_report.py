"""A scan's report (``api/report.py``): accuracy, confusion matrix and precision/recall
per label over the rows with a gold label, and the same as a self-contained HTML page;
served by ``GET /v1/scans/{id}/report`` from the scan's results file."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.report import THRESHOLDS, build_report, report_html
from shared.models import RowState
from shared.scans.folder import ScanFolder
from shared.scans.results import ResultsDB, RowResult
from tests.helpers import API_KEY

pytestmark = pytest.mark.usefixtures("clean_inproc")


def verdict(label: str, entail: float, contra: float) -> str:
    probs = {"entailment": entail, "contradiction": contra, "neutral": 1 - entail - contra}
    return json.dumps({"label": label, "probabilities": probs})


# gold, predicted: 2 of 4 right.
ROWS = [
    ("entailment", verdict("entailment", 0.8, 0.1)),
    ("entailment", verdict("contradiction", 0.3, 0.6)),
    ("contradiction", verdict("contradiction", 0.1, 0.7)),
    ("neutral", verdict("entailment", 0.5, 0.2)),
]


def test_counts_accuracy_and_the_confusion_matrix():
    report = build_report("s1", ROWS)
    assert report.scan_id == "s1" and report.labelled == 4
    assert report.accuracy == pytest.approx(0.5)
    assert report.labels == ["entailment", "contradiction", "neutral"]
    assert report.confusion == {
        "entailment": {"entailment": 1, "contradiction": 1, "neutral": 0},
        "contradiction": {"entailment": 0, "contradiction": 1, "neutral": 0},
        "neutral": {"entailment": 1, "contradiction": 0, "neutral": 0},
    }


def test_precision_and_recall_across_thresholds():
    report = build_report("s1", ROWS)
    for label in report.labels:
        assert [p.threshold for p in report.curves[label]] == list(THRESHOLDS)
    entail = {p.threshold: p for p in report.curves["entailment"]}
    # Threshold 0: every row predicted; 2 of 4 are gold entailment, both found.
    assert (entail[0.0].precision, entail[0.0].recall) == (0.5, 1.0)
    # At 0.5: rows 1 (0.8) and 4 (0.5) predicted, one of them right.
    assert (entail[0.5].precision, entail[0.5].recall) == (0.5, 0.5)
    # At 0.8: row 1 alone, right.
    assert (entail[0.8].precision, entail[0.8].recall) == (1.0, 0.5)
    # At 0.85: nothing predicted, so no precision.
    assert entail[0.85].precision is None and entail[0.85].recall == 0.0
    assert THRESHOLDS[0] == 0.0 and THRESHOLDS[-1] == 1.0 and len(THRESHOLDS) == 21


def test_no_labelled_rows_give_no_figures():
    report = build_report("empty", [])
    assert report.labelled == 0 and report.accuracy is None
    assert all(v == 0 for row in report.confusion.values() for v in row.values())
    for points in report.curves.values():
        assert all(p.precision is None and p.recall is None for p in points)
    page = report_html(report)
    assert "accuracy <strong>–</strong>" in page
    assert "<polyline" not in page  # no curve to draw


def test_the_page_is_self_contained_and_escapes_the_scan_id():
    report = build_report('<script>alert("x")</script>', ROWS)
    page = report_html(report)
    assert page.startswith("<!doctype html>")
    assert "<script" not in page and "&lt;script&gt;" in page
    assert not re.search(r'(?:src|href)="', page)  # nothing fetched
    assert page.count("<svg") == 2 and "accuracy <strong>50.0%</strong>" in page
    assert "<title>gold entailment, predicted contradiction: 1</title>" in page
    assert page.count("<polyline") == 3  # one curve per label


@pytest.fixture
def api(inproc_settings) -> Iterator[TestClient]:
    with TestClient(create_app(inproc_settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def test_the_report_of_a_scan_over_http(api, inproc_settings):
    manifest = b'{"id": "1", "image": "a.jpg", "text": "one"}\n'
    scan_id = api.post("/v1/scans", files={"manifest": ("m.jsonl", io.BytesIO(manifest))}).json()[
        "scan_id"
    ]
    # No results file yet: an empty report.
    empty = api.get(f"/v1/scans/{scan_id}/report")
    assert empty.status_code == 200 and empty.json()["labelled"] == 0
    db = ResultsDB(ScanFolder(inproc_settings.scans_path, scan_id).results)
    rows = [
        RowResult(i, str(i), RowState.DONE, key=f"k{i}", verdict=v, gold=gold)
        for i, (gold, v) in enumerate(ROWS)
    ]
    unlabelled = RowResult(4, "4", RowState.DONE, key="k4", verdict=ROWS[0][1])
    pending = RowResult(5, "5", RowState.PENDING, key="k5", gold="neutral")
    db.record([*rows, unlabelled, pending], next_idx=6, offset=0)
    db.close()
    got = api.get(f"/v1/scans/{scan_id}/report")
    assert got.status_code == 200 and got.headers["content-type"] == "application/json"
    assert got.json() == build_report(scan_id, ROWS).model_dump(mode="json")
    page = api.get(f"/v1/scans/{scan_id}/report", params={"format": "html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == report_html(build_report(scan_id, ROWS))
    assert api.get("/v1/scans/nope/report").status_code == 404
