"""A scan's folder under ``Settings.scans_path``: the only place that spells its file
names. The API and the coordinator must share it (one host, or a shared volume)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ScanFolder:
    """``root/scan_id/``: the manifest copy (JSONL) and the results file (SQLite)."""

    root: Path
    scan_id: str

    @property
    def path(self) -> Path:
        """The folder itself."""
        return self.root / self.scan_id

    @property
    def manifest(self) -> Path:
        """Where an uploaded (or converted CSV) manifest is stored, as JSONL."""
        return self.path / "manifest.jsonl"

    @property
    def results(self) -> Path:
        """The SQLite results file the coordinator writes and the API streams."""
        return self.path / "results.db"

    @property
    def results_upload(self) -> Path:
        """Where results are staged before they are uploaded to the scan's
        ``results_url`` (Parquet: written in row groups, then sent in parts)."""
        return self.path / "results.upload"

    def create(self) -> None:
        """Make the folder (and the root)."""
        self.path.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        """Delete the folder and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)

    @classmethod
    def stale(cls, root: Path, min_age_s: float) -> Iterator[ScanFolder]:
        """Folders under ``root`` older than ``min_age_s`` (candidates for clean-up)."""
        if not root.is_dir():
            return
        now_s = time.time()
        for entry in root.iterdir():
            if entry.is_dir() and now_s - entry.stat().st_mtime >= min_age_s:
                yield cls(root, entry.name)
