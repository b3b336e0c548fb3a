"""Where a slice reads its scan's manifest rows from: a JSONL file (the upload's copy, or
a file under ``OFA_MANIFEST_ROOT``), or an object in object storage streamed from the
scan's cursor.

An object manifest is never downloaded whole: a slice opens one ranged GET at the
cursor (the byte offset ``results.db`` keeps) and reads its rows line by line
(``shared/scans/manifest.py:StreamLines``), so a coordinator killed mid-scan resumes
where the last recorded rows end, not from the start. Each time a stream is opened the
object's ETag is compared with the one recorded when the scan was created: an object
replaced (or removed) mid-scan fails the scan (``ManifestChanged``) rather than mixing
rows of two manifests.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shared.objects import ObjectNotFound, ObjectStorage, ObjectUrl, is_object_url
from shared.scans.manifest import Row, StreamLines, read_rows
from shared.settings import Settings

logger = logging.getLogger(__name__)


class ManifestChanged(Exception):
    """The manifest object is not the one the scan was created with (or is gone)."""


class ManifestSource:
    """One slice's reader of a scan's manifest (``record``: the scan record): ``read``
    the rows at a cursor, then ``close``."""

    def __init__(self, settings: Settings, objects: ObjectStorage, record: dict[str, str]) -> None:
        self.settings = settings
        self.objects = objects
        self.name = record["manifest"]
        self.url = ObjectUrl.parse(self.name) if is_object_url(self.name) else None
        self.etag = record.get("manifest_etag") or None
        self.size = int(record.get("manifest_size") or 0)
        self._lines: StreamLines | None = None
        self.starts: list[int] = []  # where each stream opened began

    def read(self, offset: int, start_idx: int, limit: int) -> tuple[list[Row], int]:
        """Up to ``limit`` rows from byte ``offset`` (``read_rows``); an object's stream
        is opened at ``offset`` once and read on while the cursor follows it."""
        max_line = self.settings.manifest_line_bytes
        if self.url is None:
            return read_rows(Path(self.name), offset, start_idx, limit, max_line)
        if offset >= self.size:  # the end: no request (a range past it is refused)
            return [], offset
        if self._lines is None or self._lines.tell() != offset:
            self.close()
            self.check()
            chunks = self.objects.read_stream(
                self.url, self.settings.max_manifest_bytes, start=offset
            )
            self._lines = StreamLines(chunks, offset)
            self.starts.append(offset)
        return read_rows(self._lines, offset, start_idx, limit, max_line)

    def check(self) -> None:
        """``ManifestChanged`` unless the object still has the ETag (and size) it had
        when the scan was created."""
        assert self.url is not None
        try:
            meta = self.objects.head(self.url)
        except ObjectNotFound:
            raise ManifestChanged(
                f"the manifest object {self.url} is gone (removed mid-scan)"
            ) from None
        if meta.etag != self.etag or meta.size != self.size:
            raise ManifestChanged(
                f"the manifest object {self.url} was replaced mid-scan (ETag {self.etag} "
                f"when the scan was created, {meta.etag} now)"
            )

    def close(self) -> None:
        """Let go of the open stream, if any."""
        if self._lines is not None:
            lines, self._lines = self._lines, None
            lines.close()
