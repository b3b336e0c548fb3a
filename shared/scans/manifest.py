"""Scan manifests: reading, converting and checking them.

A manifest is JSONL or CSV, one row per item: ``id``, an image (``image``: an http(s)
URL, a path under the configured image root, or a ``data:``/base64 string; or the
explicit ``image_url`` / ``image_path`` / ``image_base64``), ``text``, optional
``premise`` and ``sha256`` (the image's, trusted for the cache lookup and verified
when the image has to be fetched). CSV manifests are converted to JSONL as they
arrive, so the coordinator always reads JSONL and can resume from a byte offset.

A manifest may also be an object in object storage (``s3://``, ``gs://``, ``az://``):
JSONL only, streamed from the scan's cursor (``StreamLines`` over the object's chunks),
never downloaded whole; ``read_rows`` reads either.

Every line is read in bounded pieces (``read_line``), never held whole: a line longer
than ``OFA_MAX_MANIFEST_LINE_BYTES`` is skipped to its end. The first JSONL line that
long refuses the manifest; a later one is counted, and becomes that row's error. A CSV
record that long, or with more than ``MAX_CSV_COLUMNS`` columns, refuses the manifest
while it is converted.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from shared.errors import ManifestError, ManifestLineTooLongError, PayloadTooLargeError
from shared.settings import get_settings

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


# A line too long to keep is read to its end this many bytes at a time.
SKIP_BYTES = 1 << 20
# Columns a CSV manifest may have: the known ones (ROW_FIELDS) and room for the others a
# catalogue export carries (ignored).
MAX_CSV_COLUMNS = 64
# Separators a CSV record may hold before the csv module splits it (those inside quotes
# count too: a text may hold commas). Each makes a field object (~60 bytes), so a line
# of commas at the line limit (~13 MB) would otherwise become ~0.5 GB of them first.
MAX_CSV_SEPARATORS = 16 * 1024


def read_line(fh: Lines, max_bytes: int) -> bytes | None:
    """The next line of ``fh`` with its newline (b"" at the end of the file) when it
    holds at most ``max_bytes`` bytes before the newline; else None, with ``fh`` moved
    past the line's end, read ``SKIP_BYTES`` at a time, never held whole."""
    line = fh.readline(max_bytes + 1)
    if len(line) <= max_bytes or line.endswith(b"\n"):
        return line
    while (piece := fh.readline(SKIP_BYTES)) and not piece.endswith(b"\n"):
        pass
    return None


def _too_long(what: str, max_bytes: int) -> ManifestLineTooLongError:
    return ManifestLineTooLongError(
        f"{what} is longer than {max_bytes} bytes (OFA_MAX_MANIFEST_LINE_BYTES)"
    )


class _CsvLines:
    """The physical lines of a CSV text stream, for ``csv.reader``, each read in bounded
    pieces: a record (the lines since the last one the reader returned) longer than
    ``max_chars`` or with more than ``MAX_CSV_SEPARATORS`` commas refuses the manifest
    before the csv module builds it."""

    def __init__(self, src: IO[str], max_chars: int) -> None:
        self.src = src
        self.max_chars = max_chars
        self.chars = 0  # of the record being read
        self.commas = 0
        self.records = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self.src.readline(self.max_chars + 1 - self.chars)
        if not line:
            raise StopIteration
        self.chars += len(line)
        self.commas += line.count(",")
        if self.chars > self.max_chars:
            raise _too_long(f"CSV record {self.records + 1}", self.max_chars)
        if self.commas > MAX_CSV_SEPARATORS:
            raise ManifestError(
                f"CSV record {self.records + 1} has more than {MAX_CSV_SEPARATORS} commas"
            )
        return line

    def record_done(self) -> None:
        """The reader returned a record: the next lines start another."""
        self.chars = self.commas = 0
        self.records += 1


def _check_columns(record: list[str], number: int) -> None:
    if len(record) > MAX_CSV_COLUMNS:
        raise ManifestError(
            f"CSV record {number} has {len(record)} columns; the limit is {MAX_CSV_COLUMNS}"
        )


def csv_to_jsonl(
    src: IO[str], dst: IO[str], max_cell_chars: int, max_line: int, max_chars: int | None = None
) -> int:
    """Stream CSV (with a header) into JSONL; returns the number of rows. A cell may
    be as long as ``max_cell_chars`` (a base64 image at the upload limit), a record
    (its header too) ``max_line`` characters, ``MAX_CSV_COLUMNS`` columns; the JSONL
    written at most ``max_chars`` characters (a server-side CSV has no other bound)."""
    # The csv module's cap is process-wide (128 KiB by default): raise it, never lower.
    csv.field_size_limit(max(csv.field_size_limit(), max_cell_chars))
    lines = _CsvLines(src, max_line)
    reader = csv.reader(lines)
    try:
        fieldnames = next(reader, None)
        lines.record_done()
        if not fieldnames or "text" not in fieldnames:
            raise ManifestError("a CSV manifest needs a header row with at least id, image, text")
        _check_columns(fieldnames, lines.records)
        n = written = 0
        for record in reader:
            lines.record_done()
            _check_columns(record, lines.records)
            if not record:
                continue  # a blank line, as csv.DictReader skips it
            # Paired as csv.DictReader pairs them; empty, missing and unknown cells dropped.
            paired = dict(zip(fieldnames, record, strict=False))
            clean = {k: v for k, v in paired.items() if k in ROW_FIELDS and v}
            line = json.dumps(clean, ensure_ascii=False) + "\n"
            written += len(line)
            if max_chars is not None and written > max_chars:
                raise PayloadTooLargeError(f"the manifest is larger than {max_chars} bytes")
            dst.write(line)
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


def check_jsonl_head(path: Path, max_line: int) -> int:
    """Validate that the first non-empty line is a JSON object; returns the row count.
    A later line over ``max_line`` bytes counts as a row (the coordinator makes it that
    row's error); a first one that long refuses the manifest."""
    n = 0
    with path.open("rb") as fh:
        while (line := read_line(fh, max_line)) != b"":
            if line is None:
                if n == 0:
                    raise _too_long("the first manifest line", max_line)
            elif line.isspace():
                continue
            elif n == 0:
                try:
                    parse_line(line)
                except ValueError as exc:
                    if str(exc) == "not a JSON object":
                        raise ManifestError("manifest lines must be JSON objects") from exc
                    raise ManifestError(f"the first manifest line is {exc}") from exc
            n += 1
    return n


class Lines(Protocol):
    """What ``read_rows`` reads: lines (``readline`` with a bound) and the byte offset
    reached (``tell``): an open file, or ``StreamLines``."""

    def readline(self, size: int = -1, /) -> bytes: ...

    def tell(self) -> int: ...


class _Chunks(io.RawIOBase):
    """An iterator of byte chunks as a raw stream, for ``io.BufferedReader``."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = memoryview(chunk)
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


class StreamLines:
    """Lines of a stream of chunks (an object read from byte ``start``), with the byte
    offset reached so far: the manifest cursor ``read_rows`` records. Holds one buffer
    and the chunk being read, never more of the stream."""

    def __init__(
        self, chunks: Iterable[bytes], start: int = 0, buffer_bytes: int = 256 * 1024
    ) -> None:
        self._raw = _Chunks(chunks)
        self._buffered = io.BufferedReader(self._raw, buffer_size=buffer_bytes)
        self._pos = start

    def readline(self, size: int = -1, /) -> bytes:
        """The next line (at most ``size`` bytes of it), as ``io.BufferedReader``'s."""
        line = self._buffered.readline(size)
        self._pos += len(line)
        return line

    def tell(self) -> int:
        """The byte offset in the object after the last line read."""
        return self._pos

    def close(self) -> None:
        """Drop the stream (its connection goes back with the iterator)."""
        self._buffered.close()


def read_rows(
    source: Path | Lines,
    offset: int,
    start_idx: int,
    limit: int,
    max_line: int | None = None,
) -> tuple[list[Row], int]:
    """Up to ``limit`` rows from byte ``offset`` (row numbers from ``start_idx``) of a
    file, or of ``Lines`` already at ``offset`` (an object's stream).

    Returns the rows and the offset after the last one. A line that is not a JSON
    object, or longer than ``max_line`` bytes (default: this process's
    ``OFA_MAX_MANIFEST_LINE_BYTES``; skipped in bounded reads), still becomes a row (its
    error is recorded as that row's result).
    """
    if max_line is None:
        max_line = get_settings().manifest_line_bytes
    if isinstance(source, Path):
        with source.open("rb") as fh:
            fh.seek(offset)
            return _read_rows(fh, offset, start_idx, limit, max_line)
    assert source.tell() == offset, (source.tell(), offset)
    return _read_rows(source, offset, start_idx, limit, max_line)


def _read_rows(
    fh: Lines, offset: int, start_idx: int, limit: int, max_line: int
) -> tuple[list[Row], int]:
    rows: list[Row] = []
    while len(rows) < limit:
        line = read_line(fh, max_line)
        if line == b"":
            break
        if line is not None and line.isspace():
            offset = fh.tell()
            continue
        idx = start_idx + len(rows)
        if line is None:
            obj: dict[str, Any] = {
                "__error__": f"row is longer than {max_line} bytes (OFA_MAX_MANIFEST_LINE_BYTES)"
            }
        else:
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
