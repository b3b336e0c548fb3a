"""The per-scan results file: one SQLite row per manifest row, plus the read cursor.

Per-row results live here, beside the manifest, not in Redis: Redis holds only the
scan's in-flight window, whatever the manifest's size. The coordinator writes it; the
API reads it to stream results in manifest order.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.models import RowState, ScanCounts

SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    idx INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL,
    key TEXT,
    job_id TEXT,
    state TEXT NOT NULL,          -- pending | done | failed
    cached INTEGER NOT NULL DEFAULT 0,
    verdict TEXT,                 -- JSON
    error TEXT,
    gold TEXT                     -- the row's own label, when the manifest gave one
);
-- Only the pending rows (the scan's window) are indexed: a row leaves the index when
-- it is done, so each commit rewrites a few index pages, not pages all over an index
-- of every row's random key. (rows_pending indexed every row, in older files.)
DROP INDEX IF EXISTS rows_pending;
CREATE INDEX IF NOT EXISTS rows_pending_keys ON rows (key) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class RowResult:
    """A row's outcome as the coordinator records it."""

    idx: int
    item_id: str
    state: RowState
    key: str | None = None
    job_id: str | None = None
    cached: bool = False
    verdict: str | None = None
    error: str | None = None
    gold: str | None = None


class ResultsDB:
    """The per-scan SQLite file: one row per manifest row, plus the read cursor."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            # The API streams results from a worker thread per chunk: any thread may read.
            self.conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False
            )
            return
        self.conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(rows)")}
        if "gold" not in columns:  # a results file written before gold labels
            self.conn.execute("ALTER TABLE rows ADD COLUMN gold TEXT")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def cursor_position(self) -> tuple[int, int]:
        """(next row number, byte offset of the next unread manifest line)."""
        got = dict(self.conn.execute("SELECT name, value FROM meta").fetchall())
        return int(got.get("next_idx", 0)), int(got.get("offset", 0))

    def record(self, results: Iterable[RowResult], next_idx: int, offset: int) -> None:
        """Insert rows and move the cursor, in one transaction (resumable)."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT OR REPLACE INTO rows (idx, item_id, key, job_id, state, cached, verdict,"
                " error, gold) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.idx,
                        r.item_id,
                        r.key,
                        r.job_id,
                        r.state,
                        int(r.cached),
                        r.verdict,
                        r.error,
                        r.gold,
                    )
                    for r in results
                ],
            )
            self.conn.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                [("next_idx", str(next_idx)), ("offset", str(offset))],
            )

    def pending(self) -> dict[str, str]:
        """Distinct pending keys and the job each waits on."""
        return dict(
            self.conn.execute(
                "SELECT key, MIN(job_id) FROM rows WHERE state = 'pending' GROUP BY key"
            ).fetchall()
        )

    def complete(self, outcomes: dict[str, tuple[RowState, str | None, str | None]]) -> None:
        """key -> (state, verdict JSON, error) for every pending row with that key."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "UPDATE rows SET state = ?, verdict = ?, error = ? "
                "WHERE key = ? AND state = 'pending'",
                [(state, verdict, error, key) for key, (state, verdict, error) in outcomes.items()],
            )

    def cancel_pending(self) -> None:
        """Every pending row becomes failed: the scan was cancelled."""
        self.conn.execute(
            "UPDATE rows SET state = ?, error = 'scan cancelled' WHERE state = ?",
            (RowState.FAILED, RowState.PENDING),
        )

    def counts(self) -> ScanCounts:
        """read, done (succeeded), cached (of done), failed, pending."""
        row = self.conn.execute(
            "SELECT COUNT(*), SUM(state = 'done'), SUM(state = 'done' AND cached = 1), "
            "SUM(state = 'failed'), SUM(state = 'pending') FROM rows"
        ).fetchone()
        read, done, cached, failed, pending = (int(v or 0) for v in row)
        return ScanCounts(read=read, done=done, cached=cached, failed=failed, pending=pending)

    def labelled(self) -> Iterator[tuple[str, str]]:
        """(gold label, verdict JSON) of every finished row that carries a gold label."""
        try:
            yield from self.conn.execute(
                "SELECT gold, verdict FROM rows WHERE gold IS NOT NULL AND state = ? "
                "AND verdict IS NOT NULL ORDER BY idx",
                (RowState.DONE,),
            )
        except sqlite3.OperationalError:  # a results file from before gold labels
            return

    def iter_results(self, batch: int = 1000) -> Iterator[tuple[Any, ...]]:
        """(idx, item_id, state, cached, verdict, error) in manifest order (none while
        the coordinator that just made the file has not yet written its tables)."""
        last = -1
        tables = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rows'"
        if self.conn.execute(tables).fetchone() is None:
            return
        while True:
            chunk = self.conn.execute(
                "SELECT idx, item_id, state, cached, verdict, error FROM rows WHERE idx > ? "
                "ORDER BY idx LIMIT ?",
                (last, batch),
            ).fetchall()
            if not chunk:
                return
            yield from chunk
            last = chunk[-1][0]


def result_line(row: tuple[Any, ...]) -> dict[str, Any]:
    """One results line: id, label, answer, probabilities, cached, error."""
    _, item_id, state, cached, verdict, error = row
    doc: dict[str, Any] = {
        "id": item_id,
        "label": None,
        "answer": None,
        "probabilities": None,
        "cached": bool(cached),
        "error": None,
    }
    if state == RowState.DONE and verdict:
        v = json.loads(verdict)
        doc.update(label=v["label"], answer=v["answer"], probabilities=v["probabilities"])
    elif state == RowState.PENDING:
        doc["error"] = "pending"
    else:
        doc["error"] = error or "failed"
    return doc


CSV_COLUMNS = (
    "id",
    "label",
    "answer",
    "p_entailment",
    "p_contradiction",
    "p_neutral",
    "cached",
    "error",
)


def csv_line(doc: dict[str, Any]) -> str:
    """A results line in CSV."""
    probs = doc["probabilities"] or {}
    buf = io.StringIO()
    csv.writer(buf).writerow(
        [
            doc["id"],
            doc["label"] or "",
            doc["answer"] or "",
            *(
                f"{probs[k]:.6f}" if k in probs else ""
                for k in ("entailment", "contradiction", "neutral")
            ),
            "1" if doc["cached"] else "0",
            doc["error"] or "",
        ]
    )
    return buf.getvalue()
