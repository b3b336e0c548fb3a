"""A catalogue scan's changes: two crafted results files give exactly the expected list."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from shared.models import ChangeCounts, RowState, ScanChange
from shared.scans.changes import compute_changes, csv_row, iter_changes
from shared.scans.results import ResultsDB, RowResult


def _verdict(label: str, p: float) -> str:
    rest = round((1 - p) / 2, 6)
    probs = {"entailment": rest, "contradiction": rest, "neutral": rest} | {label: p}
    return json.dumps({"label": label, "answer": "x", "probabilities": probs})


def _write(path: Path, rows: list[tuple[str, str | None, str | None]]) -> Path:
    """rows: (id, label or None, error or None); a label makes the row done."""
    db = ResultsDB(path)
    results = [
        RowResult(
            idx,
            item_id,
            RowState.DONE if label else RowState.FAILED,
            verdict=_verdict(label, 0.8) if label else None,
            error=error,
        )
        for idx, (item_id, label, error) in enumerate(rows)
    ]
    db.record(results, len(rows), 0)
    db.close()
    return path


def test_two_results_files_give_exactly_the_expected_changes(tmp_path):
    old = _write(
        tmp_path / "old.db",
        [
            ("same", "entailment", None),
            ("flip", "entailment", None),
            ("breaks", "neutral", None),
            ("heals", None, "image could not be decoded"),
            ("still-broken", None, "missing image"),
            ("gone", "contradiction", None),
            ("dup", "neutral", None),
        ],
    )
    new = _write(
        tmp_path / "new.db",
        [
            ("new-one", "neutral", None),
            ("same", "entailment", None),
            ("flip", "contradiction", None),
            ("breaks", None, "image could not be decoded"),
            ("heals", "entailment", None),
            ("still-broken", None, "missing image"),
            ("", None, "missing id"),
            ("dup", "neutral", None),
            ("dup", "contradiction", None),  # the second of an id: not compared
        ],
    )
    before = old.read_bytes()
    counts = compute_changes(new, old)
    assert counts == ChangeCounts(
        label_changed=1, newly_failed=1, recovered=1, added=1, removed=1, unmatched=2
    )
    assert old.read_bytes() == before  # the baseline is only read
    conn = sqlite3.connect(new)
    got = list(iter_changes(conn))
    assert [(c["kind"], c["id"]) for c in got] == [
        ("added", "new-one"),
        ("label_changed", "flip"),
        ("newly_failed", "breaks"),
        ("recovered", "heals"),
        ("removed", "gone"),
    ]
    flip = ScanChange.model_validate(got[1])
    assert (flip.old_label, flip.new_label) == ("entailment", "contradiction")
    assert flip.old_probabilities is not None and flip.old_probabilities.entailment == 0.8
    assert flip.new_probabilities is not None and flip.new_probabilities.contradiction == 0.8
    assert got[2]["new_error"] == "image could not be decoded"
    assert got[2]["old_label"] == "neutral"
    assert got[3]["old_error"] == "image could not be decoded" and got[3]["new_label"]
    assert got[0]["old_label"] is None and got[4]["new_label"] is None
    assert csv_row(got[1])[:4] == ["label_changed", "flip", "entailment", "0.800000"]
    conn.close()
    # Computed again (a coordinator that crashed after it): the same table.
    assert compute_changes(new, old) == counts
    assert list(iter_changes(sqlite3.connect(new))) == got


def test_a_file_without_changes_lists_none(tmp_path):
    path = _write(tmp_path / "r.db", [("a", "neutral", None)])
    assert list(iter_changes(sqlite3.connect(path))) == []


def test_many_rows_compare_in_sql(tmp_path):
    n = 20_000
    old = _write(tmp_path / "old.db", [(f"r{i}", "neutral", None) for i in range(n)])
    new = _write(
        tmp_path / "new.db",
        [(f"r{i}", "entailment" if i % 1000 == 0 else "neutral", None) for i in range(1, n + 1)],
    )
    counts = compute_changes(new, old)
    assert counts == ChangeCounts(label_changed=19, added=1, removed=1)
