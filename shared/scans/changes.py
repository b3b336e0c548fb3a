"""What changed in a catalogue since its previous succeeded scan: the new scan's results
file compared with the baseline's, row by row id, into a ``changes`` table of the new one.

All in SQL, so memory stays bounded whatever the catalogue's size: the baseline's file is
attached read-only, each side's first row per id goes to a temporary table (SQLite sorts
on disk past its cache), and the two are joined (a FULL OUTER JOIN) into the table.

Rows are matched by their manifest ``id``: a row without one cannot be matched, and of
rows sharing an id only the first (in manifest order) is compared; both count as
``unmatched``. A change is one of:

- ``label_changed``: done in both, with different labels (probabilities alone moving is
  not a change);
- ``newly_failed``: done in the baseline, failed now; ``recovered``: the other way;
- ``added``: an id the baseline did not have; ``removed``: one the new scan lacks.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.models import ChangeCounts, ScanStatus
from shared.scans.folder import ScanFolder
from shared.settings import Settings
from shared.store.scans import Catalogued, ScanStore

logger = logging.getLogger(__name__)

KINDS = ("label_changed", "newly_failed", "recovered", "added", "removed")

SCHEMA = """
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY,      -- the new manifest's order, then the removed rows'
    kind TEXT NOT NULL,
    item_id TEXT NOT NULL,
    old_label TEXT,
    old_probabilities TEXT,       -- JSON
    old_error TEXT,
    new_label TEXT,
    new_probabilities TEXT,       -- JSON
    new_error TEXT
);
"""

# The first row of each id, per side.
_FIRSTS = """
CREATE TEMP TABLE {name} (item_id TEXT PRIMARY KEY, idx INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO {name} SELECT item_id, idx FROM {db}.rows
    WHERE item_id != '' ORDER BY idx;
"""

_JOINED = """
WITH pairs AS (
    SELECT COALESCE(n.item_id, o.item_id) AS item_id, n.idx AS new_idx, o.idx AS old_idx
    FROM temp.new_first AS n FULL OUTER JOIN temp.old_first AS o ON n.item_id = o.item_id
), rows2 AS (
    SELECT p.item_id, p.new_idx, p.old_idx,
        o.state AS old_state, o.verdict AS old_verdict, o.error AS old_error,
        n.state AS new_state, n.verdict AS new_verdict, n.error AS new_error
    FROM pairs AS p
    LEFT JOIN main.rows AS n ON n.idx = p.new_idx
    LEFT JOIN baseline.rows AS o ON o.idx = p.old_idx
), kinds AS (
    SELECT *, CASE
        WHEN new_idx IS NULL THEN 'removed'
        WHEN old_idx IS NULL THEN 'added'
        WHEN old_state = 'done' AND new_state = 'done'
            AND json_extract(old_verdict, '$.label') IS NOT json_extract(new_verdict, '$.label')
            THEN 'label_changed'
        WHEN old_state = 'done' AND new_state = 'failed' THEN 'newly_failed'
        WHEN old_state = 'failed' AND new_state = 'done' THEN 'recovered'
    END AS kind FROM rows2
)
INSERT INTO changes (kind, item_id, old_label, old_probabilities, old_error,
                     new_label, new_probabilities, new_error)
SELECT kind, item_id,
    CASE WHEN old_state = 'done' THEN json_extract(old_verdict, '$.label') END,
    CASE WHEN old_state = 'done' THEN json_extract(old_verdict, '$.probabilities') END,
    CASE WHEN old_state = 'failed' THEN COALESCE(old_error, 'failed') END,
    CASE WHEN new_state = 'done' THEN json_extract(new_verdict, '$.label') END,
    CASE WHEN new_state = 'done' THEN json_extract(new_verdict, '$.probabilities') END,
    CASE WHEN new_state = 'failed' THEN COALESCE(new_error, 'failed') END
FROM kinds WHERE kind IS NOT NULL
ORDER BY new_idx IS NULL, new_idx, old_idx
"""


def _uri(path: Path, mode: str) -> str:
    return f"{path.resolve().as_uri()}?mode={mode}"


def compute_changes(results: Path, baseline: Path) -> ChangeCounts:
    """Compare the scan's results file with the baseline scan's (left as it is) and write
    the ``changes`` table of ``results`` (replaced, so computing again after a crash
    gives the same table); returns the counts."""
    conn = sqlite3.connect(_uri(results, "rw"), uri=True, timeout=30, isolation_level=None)
    try:
        conn.execute("ATTACH DATABASE ? AS baseline", (_uri(baseline, "ro"),))
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DROP TABLE IF EXISTS main.changes")
            # Statement by statement: executescript would commit the transaction.
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            for name, db in (("new_first", "main"), ("old_first", "baseline")):
                for statement in _FIRSTS.format(name=name, db=db).split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(_JOINED)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return read_counts(conn)
    finally:
        conn.close()


def compare_with_baseline(
    scans: ScanStore,
    settings: Settings,
    scan_id: str,
    record: dict[str, str],
    results: Path,
    status: ScanStatus,
) -> Catalogued:
    """At a catalogue scan's end: its changes since the catalogue's last succeeded scan,
    when it succeeded and that scan's results file is still there (scans are kept
    ``OFA_SCAN_TTL_S``); otherwise no changes (``baseline_scan`` None), rather than
    every row counted as added."""
    owner, name = record.get("owner", ""), record["catalogue"]
    end = Catalogued(owner, name)
    if status != ScanStatus.SUCCEEDED:
        return end  # a failed or cancelled scan is compared with nothing, nor moves on
    baseline = scans.baseline(owner, name)
    if baseline is None or baseline == scan_id:
        return end
    path = ScanFolder(settings.scans_path, baseline).results
    if not path.exists():
        logger.info("scan %s: the baseline %s of %s is gone", scan_id, baseline, name)
        return end
    changes = compute_changes(results, path)
    logger.info("scan %s of %s, since %s: %s", scan_id, name, baseline, changes)
    return Catalogued(owner, name, baseline, changes)


def read_counts(conn: sqlite3.Connection) -> ChangeCounts:
    """The counts of a results file's ``changes`` table (with its ``unmatched`` rows)."""
    by_kind = dict(conn.execute("SELECT kind, COUNT(*) FROM main.changes GROUP BY kind"))
    rows, ids = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT NULLIF(item_id, '')) FROM main.rows"
    ).fetchone()
    return ChangeCounts(**{k: int(by_kind.get(k, 0)) for k in KINDS}, unmatched=rows - ids)


def iter_changes(conn: sqlite3.Connection, batch: int = 1000) -> Iterator[dict[str, Any]]:
    """The change list in order, as ``ScanChange`` documents; none when the file has no
    ``changes`` table (not a catalogue scan, or none to compare with)."""
    exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'changes'"
    if conn.execute(exists).fetchone() is None:
        return
    last = 0
    while True:
        chunk = conn.execute(
            "SELECT seq, kind, item_id, old_label, old_probabilities, old_error, new_label, "
            "new_probabilities, new_error FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (last, batch),
        ).fetchall()
        if not chunk:
            return
        for row in chunk:
            _, kind, item_id, old_label, old_p, old_error, new_label, new_p, new_error = row
            yield {
                "kind": kind,
                "id": item_id,
                "old_label": old_label,
                "old_probabilities": json.loads(old_p) if old_p else None,
                "old_error": old_error,
                "new_label": new_label,
                "new_probabilities": json.loads(new_p) if new_p else None,
                "new_error": new_error,
            }
        last = chunk[-1][0]


CSV_COLUMNS = (
    "kind",
    "id",
    "old_label",
    "old_p_entailment",
    "old_p_contradiction",
    "old_p_neutral",
    "old_error",
    "new_label",
    "new_p_entailment",
    "new_p_contradiction",
    "new_p_neutral",
    "new_error",
)


def csv_row(doc: dict[str, Any]) -> list[str]:
    """A change line's CSV cells, in ``CSV_COLUMNS`` order."""
    cells = [doc["kind"], doc["id"]]
    for side in ("old", "new"):
        probs = doc[f"{side}_probabilities"] or {}
        cells.append(doc[f"{side}_label"] or "")
        cells += [
            f"{probs[k]:.6f}" if k in probs else ""
            for k in ("entailment", "contradiction", "neutral")
        ]
        cells.append(doc[f"{side}_error"] or "")
    return cells
