"""Scan manifests: reading, converting and checking them.

A manifest is JSONL or CSV, one row per item: ``id``, an image (``image``: an http(s)
URL, a path under the configured image root, or a ``data:``/base64 string; or the
explicit ``image_url`` / ``image_path`` / ``image_base64``), ``text``, optional
``premise`` and ``sha256`` (the image's, trusted for the cache lookup and verified
when the image has to be fetched). CSV manifests are converted to JSONL as they
arrive, so the coordinator always reads JSONL and can resume from a byte offset.

"""

from __future__ import annotations

import csv
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shared.errors import ManifestError

ROW_FIELDS = (
    "id",
    "image",
    "image_url",
    "image_path",
    "image_base64",
    "text",
    "premise",
    "sha256",
    "label",  # optional gold label: entailment, contradiction or neutral (scan reports)
)


@dataclass(frozen=True)
class Row:
    """One manifest row, as parsed (not yet validated)."""

    idx: int
    item_id: str
    fields: dict[str, Any]


def csv_to_jsonl(src: IO[str], dst: IO[str], max_cell_chars: int) -> int:
    """Stream CSV (with a header) into JSONL; returns the number of rows. A cell may
    be as long as ``max_cell_chars`` (a base64 image at the upload limit)."""
    # The csv module's cap is process-wide (128 KiB by default): raise it, never lower.
    csv.field_size_limit(max(csv.field_size_limit(), max_cell_chars))
    try:
        reader = csv.DictReader(src)
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise ManifestError("a CSV manifest needs a header row with at least id, image, text")
        n = 0
        for record in reader:
            clean = {k: v for k, v in record.items() if k in ROW_FIELDS and v not in (None, "")}
            dst.write(json.dumps(clean, ensure_ascii=False) + "\n")
            n += 1
    except csv.Error as exc:
        raise ManifestError(f"the CSV manifest could not be read ({exc})") from exc
    return n


def parse_line(line: bytes) -> dict[str, Any]:
    """One JSONL line as a JSON object; ``ValueError`` saying why not (not UTF-8, not
    JSON, nested too deep, not an object)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


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
                    parse_line(line)
                except ValueError as exc:
                    if str(exc) == "not a JSON object":
                        raise ManifestError("manifest lines must be JSON objects") from exc
                    raise ManifestError(f"the first manifest line is {exc}") from exc
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
                obj = parse_line(line)
            except ValueError as exc:
                obj = {"__error__": f"row is not a JSON object ({exc})"}
            item_id = obj.get("id")
            if isinstance(item_id, bool) or not isinstance(item_id, str | int | float | None):
                obj = {"__error__": "id must be a string or a number"}
                item_id = None
            rows.append(Row(idx, str(item_id) if item_id is not None else "", obj))
            offset = fh.tell()
    return rows, offset


def file_under(root: Path | None, name: str, what: str, setting: str) -> Path:
    """``name`` resolved inside ``root`` (symlinks followed, no escaping with ``..``);
    ``ValueError`` with a readable reason otherwise. (``os.path`` on strings, the root
    resolved once per process: a scan calls this for every row.)"""
    if root is None:
        raise ValueError(f"{what}s are not enabled on this server ({setting})")
    if "\x00" in name:
        raise ValueError(f"the {what} path contains a NUL character")
    try:
        base = _real_root(root)
        path = os.path.realpath(os.path.join(base, name))
        if path != base and not path.startswith(base.rstrip(os.sep) + os.sep):
            raise ValueError(f"the {what} path is outside the {what} root")
        if not os.path.isfile(path):
            raise ValueError(f"no {what} at {name[:200]!r}")
    except OSError as exc:  # a name too long for the file system, say
        raise ValueError(f"the {what} path cannot be used ({exc.strerror})") from exc
    return Path(path)


@functools.lru_cache(maxsize=8)
def _real_root(root: Path) -> str:
    return os.path.realpath(root)


GOLD_LABELS = ("entailment", "contradiction", "neutral")


def gold_label(fields: dict[str, Any]) -> str | None:
    """A row's gold label when it gives a valid one (case-insensitive); else None:
    rows without one are simply not counted in the scan's report."""
    value = fields.get("label")
    if isinstance(value, str) and value.strip().lower() in GOLD_LABELS:
        return value.strip().lower()
    return None
