"""A finished scan's results written to object storage (its ``results_url``), as the
API's ``/v1/scans/{id}/results`` serves them (JSONL, CSV) or as Parquet.

Never all rows in memory: JSONL and CSV are streamed out of ``results.db`` in ~1 MiB
pieces into a multipart upload; Parquet is written in row groups of ``ROW_GROUP_ROWS``
to a file in the scan's folder, then uploaded in parts and removed. The upload is
multipart (``ObjectStorage.write_stream``): the object appears whole or not at all.

Parquet's schema (one row per manifest row, in manifest order; the CSV's columns):

=================  =======  ==================================================
column             type     value
=================  =======  ==================================================
id                 string   the row's ``id``
label              string   entailment, contradiction or neutral; null on error
answer             string   the model's answer (yes, no, maybe); null on error
p_entailment       double   probability; null on error
p_contradiction    double   probability; null on error
p_neutral          double   probability; null on error
cached             bool     the verdict came from the cache
error              string   why the row failed; null when it has a verdict
=================  =======  ==================================================

pyarrow is a worker-side dependency: the API never imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.objects import ObjectStorage
from shared.scans.folder import ScanFolder
from shared.scans.results import CSV_COLUMNS, ResultsDB, csv_line, result_line

FORMATS = ("jsonl", "csv", "parquet")
ROW_GROUP_ROWS = 10_000  # ~5 MB of Python objects held while a group is built
PIECE_BYTES = 1 << 20  # JSONL and CSV are handed to the upload in pieces this big
FILE_CHUNK_BYTES = 8 << 20  # the staged Parquet file is read back this much at a time
LABELS = ("entailment", "contradiction", "neutral")

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("answer", pa.string()),
        *(pa.field(f"p_{label}", pa.float64()) for label in LABELS),
        pa.field("cached", pa.bool_(), nullable=False),
        pa.field("error", pa.string()),
    ]
)


def write_results(
    objects: ObjectStorage, url: str, fmt: str, db: ResultsDB, folder: ScanFolder
) -> None:
    """Write every row of ``db`` to ``url`` as ``fmt`` (jsonl, the default; csv;
    parquet). Raises the store's errors (``ObjectStoreError``) as they are."""
    fmt = fmt or "jsonl"
    if fmt not in FORMATS:
        raise ValueError(f"unknown results format {fmt!r}")
    if fmt != "parquet":
        objects.write_stream(url, _text_pieces(db, fmt))
        return
    staged = folder.results_upload
    try:
        write_parquet(db, staged)
        objects.write_stream(url, _file_chunks(staged))
    finally:
        staged.unlink(missing_ok=True)


def _text_pieces(db: ResultsDB, fmt: str) -> Iterator[bytes]:
    parts: list[str] = []
    size = 0
    if fmt == "csv":
        parts.append(",".join(CSV_COLUMNS) + "\n")
    for row in db.iter_results():
        doc = result_line(row)
        line = csv_line(doc) if fmt == "csv" else json.dumps(doc) + "\n"
        parts.append(line)
        size += len(line)
        if size >= PIECE_BYTES:
            yield "".join(parts).encode()
            parts, size = [], 0
    if parts:
        yield "".join(parts).encode()


def write_parquet(db: ResultsDB, path: Path, row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """``db``'s rows as a Parquet file at ``path`` (``RESULTS_SCHEMA``), one row group
    per ``row_group_rows``; returns the number of rows."""
    columns: dict[str, list[Any]] = {name: [] for name in RESULTS_SCHEMA.names}
    n = 0
    with pq.ParquetWriter(path, RESULTS_SCHEMA, compression="zstd") as writer:
        for row in db.iter_results():
            doc = result_line(row)
            probs = doc["probabilities"] or {}
            columns["id"].append(doc["id"])
            columns["label"].append(doc["label"])
            columns["answer"].append(doc["answer"])
            for label in LABELS:
                columns[f"p_{label}"].append(probs.get(label))
            columns["cached"].append(doc["cached"])
            columns["error"].append(doc["error"])
            n += 1
            if len(columns["id"]) >= row_group_rows:
                writer.write_table(pa.table(columns, schema=RESULTS_SCHEMA))
                columns = {name: [] for name in RESULTS_SCHEMA.names}
        if columns["id"] or n == 0:
            writer.write_table(pa.table(columns, schema=RESULTS_SCHEMA))
    return n


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(FILE_CHUNK_BYTES):
            yield chunk
