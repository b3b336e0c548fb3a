"""The per-scan results file: pending rows by key, completion, and older files."""

from __future__ import annotations

import sqlite3

from shared.models import RowState
from shared.scans.results import ResultsDB, RowResult


def pending_row(idx: int, key: str, job_id: str) -> RowResult:
    return RowResult(idx, f"r{idx}", RowState.PENDING, key=key, job_id=job_id)


def test_rows_wait_on_their_key_until_completed(tmp_path):
    db = ResultsDB(tmp_path / "results.db")
    try:
        rows = [pending_row(i, f"k{i % 3}", f"j{i % 3}") for i in range(7)]
        db.record([*rows, RowResult(7, "r7", RowState.FAILED, error="bad")], 8, 99)
        assert db.pending() == {"k0": "j0", "k1": "j1", "k2": "j2"}
        assert len(db.pending()) == 3 and db.cursor_position() == (8, 99)
        db.complete({"k1": (RowState.DONE, '{"label": "entailment"}', None)})
        db.complete({"k2": (RowState.FAILED, None, "broken")})
        assert db.pending() == {"k0": "j0"}
        counts = db.counts()
        assert (counts.read, counts.done, counts.failed, counts.pending) == (8, 2, 3, 3)
        db.cancel_pending()
        assert db.pending() == {} and db.counts().failed == 6
    finally:
        db.close()


def test_an_older_file_loses_its_index_of_every_row(tmp_path):
    path = tmp_path / "results.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE rows (idx INTEGER PRIMARY KEY, item_id TEXT NOT NULL, key TEXT,"
        " job_id TEXT, state TEXT NOT NULL, cached INTEGER NOT NULL DEFAULT 0,"
        " verdict TEXT, error TEXT);"
        "CREATE INDEX rows_pending ON rows (state, key);"
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO rows (idx, item_id, key, job_id, state) VALUES (0, 'a', 'k', 'j', 'pending');"
    )
    old.close()
    db = ResultsDB(path)
    try:
        indexes = {
            r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")
        }
        assert "rows_pending" not in indexes and "rows_pending_keys" in indexes
        assert db.pending() == {"k": "j"}  # its pending rows found through the new one
    finally:
        db.close()
