"""Catalogue scans: manifests, the per-scan results file, the scan record.

A manifest is JSONL or CSV, one row per item: ``id``, an image (``image``: an http(s)
URL, a path under the configured image root, or a ``data:``/base64 string; or the
explicit ``image_url`` / ``image_path`` / ``image_base64``), ``text``, optional
``premise`` and ``sha256`` (the image's, trusted for the cache lookup and verified
when the image has to be fetched). CSV manifests are converted to JSONL as they
arrive, so the coordinator always reads JSONL and can resume from a byte offset.

Per-row results live in a SQLite file beside the manifest, not in Redis: Redis holds
only the scan's in-flight window, whatever the manifest's size. The API reads the
file to stream results in manifest order.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shared.errors import BadInputError

SCAN_STATES = ("queued", "running", "succeeded", "cancelled", "failed")
ROW_FIELDS = ("id", "image", "image_url", "image_path", "image_base64", "text", "premise", "sha256")


class ManifestError(BadInputError):
    """A manifest that cannot be read at all (row problems are per-row results)."""

    status = 400
    title = "Invalid manifest"
    type_slug = "bad-manifest"


@dataclass(frozen=True)
class Row:
    """One manifest row, as parsed (not yet validated)."""

    idx: int
    item_id: str
    fields: dict[str, Any]


def csv_to_jsonl(src: IO[str], dst: IO[str]) -> int:
    """Stream CSV (with a header) into JSONL; returns the number of rows."""
    reader = csv.DictReader(src)
    if not reader.fieldnames or "text" not in reader.fieldnames:
        raise ManifestError("a CSV manifest needs a header row with at least id, image, text")
    n = 0
    for record in reader:
        clean = {k: v for k, v in record.items() if k in ROW_FIELDS and v not in (None, "")}
        dst.write(json.dumps(clean, ensure_ascii=False) + "\n")
        n += 1
    return n


def check_jsonl_head(path: Path) -> int:
    """Validate that the first non-empty line is a JSON object; returns the row count."""
    n = 0
    first = True
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            if first:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ManifestError(f"the first manifest line is not JSON ({exc})") from exc
                if not isinstance(obj, dict):
                    raise ManifestError("manifest lines must be JSON objects")
                first = False
            n += 1
    return n


def read_rows(path: Path, offset: int, start_idx: int, limit: int) -> tuple[list[Row], int]:
    """Up to ``limit`` rows from byte ``offset`` (row numbers from ``start_idx``).

    Returns the rows and the offset after the last one. A line that is not a JSON
    object still becomes a row (its error is recorded as that row's result).
    """
    rows: list[Row] = []
    with path.open("rb") as fh:
        fh.seek(offset)
        while len(rows) < limit:
            line = fh.readline()
            if not line:
                break
            if not line.strip():
                offset = fh.tell()
                continue
            idx = start_idx + len(rows)
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                obj = {"__error__": f"row is not a JSON object ({exc})"}
            item_id = obj.get("id")
            rows.append(Row(idx, str(item_id) if item_id is not None else "", obj))
            offset = fh.tell()
    return rows, offset


def file_under(root: Path | None, name: str, what: str, setting: str) -> Path:
    """``name`` resolved inside ``root`` (symlinks followed, no escaping with ``..``);
    ``ValueError`` with a readable reason otherwise."""
    if root is None:
        raise ValueError(f"{what}s are not enabled on this server ({setting})")
    base = root.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"the {what} path is outside the {what} root")
    if not path.is_file():
        raise ValueError(f"no {what} at {name!r}")
    return path


# --- the results file ------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    idx INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL,
    key TEXT,
    job_id TEXT,
    state TEXT NOT NULL,          -- pending | done | failed
    cached INTEGER NOT NULL DEFAULT 0,
    verdict TEXT,                 -- JSON
    error TEXT
);
CREATE INDEX IF NOT EXISTS rows_pending ON rows (state, key);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class RowResult:
    """A row's outcome as the coordinator records it."""

    idx: int
    item_id: str
    state: str
    key: str | None = None
    job_id: str | None = None
    cached: bool = False
    verdict: str | None = None
    error: str | None = None


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
                " error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (r.idx, r.item_id, r.key, r.job_id, r.state, int(r.cached), r.verdict, r.error)
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

    def pending_count(self) -> int:
        """How many distinct keys are in flight."""
        return int(
            self.conn.execute(
                "SELECT COUNT(DISTINCT key) FROM rows WHERE state = 'pending'"
            ).fetchone()[0]
        )

    def complete(self, outcomes: dict[str, tuple[str, str | None, str | None]]) -> None:
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
            "UPDATE rows SET state = 'failed', error = 'scan cancelled' WHERE state = 'pending'"
        )

    def counts(self) -> dict[str, int]:
        """done (succeeded), cached (of done), failed, pending, read."""
        row = self.conn.execute(
            "SELECT COUNT(*), SUM(state = 'done'), SUM(state = 'done' AND cached = 1), "
            "SUM(state = 'failed'), SUM(state = 'pending') FROM rows"
        ).fetchone()
        read, done, cached, failed, pending = (int(v or 0) for v in row)
        return {"read": read, "done": done, "cached": cached, "failed": failed, "pending": pending}

    def iter_results(self, batch: int = 1000) -> Iterator[tuple[Any, ...]]:
        """(idx, item_id, state, cached, verdict, error) in manifest order."""
        last = -1
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
    if state == "done" and verdict:
        v = json.loads(verdict)
        doc.update(label=v["label"], answer=v["answer"], probabilities=v["probabilities"])
    elif state == "pending":
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


def summarize(scan_id: str, record: dict[Any, Any]) -> dict[str, Any]:
    """The scan record (a Redis hash, bytes or str) as the API and callbacks report it:
    counts, rate (finished rows per second since the start) and ETA."""
    raw = {text_of(k): text_of(v) for k, v in record.items()}
    ints = ("total", "read", "done", "cached", "failed", "pending")
    out: dict[str, Any] = {"scan_id": scan_id, "status": raw.get("status", "queued")}
    for name in ints:
        out[name] = int(raw.get(name, 0))
    for name in ("created_at", "started_at", "finished_at"):
        out[name] = float(raw[name]) if raw.get(name) else None
    started = out["started_at"]
    end = out["finished_at"] or time.time()
    finished_rows = out["done"] + out["failed"]
    rate = finished_rows / (end - started) if started and end > started else 0.0
    remaining = out["total"] - finished_rows
    out["rate_rows_per_s"] = round(rate, 3)
    out["eta_s"] = (
        round(remaining / rate, 1)
        if rate > 0 and remaining > 0
        else (0.0 if remaining <= 0 else None)
    )
    if raw.get("callback_url"):
        out["callback_url"] = raw["callback_url"]
    if raw.get("error"):
        out["error"] = raw["error"]
    return out


def text_of(value: Any) -> str:
    """Redis values arrive as bytes or str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def now() -> str:
    """A timestamp for records."""
    return f"{time.time():.6f}"
