"""The runtime benchmark that a lent GPU runs (bench/bench_runtime.py) stays
runnable: here at the tiny shape on the CPU, every part of it (batch sizes, FLOPs and
peak fractions, ModelScope's reference, bf16 against fp32, the real worker end to end)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_runtime_benchmark_runs_every_part(tmp_path: Path):
    out = tmp_path / "runtime.md"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_runtime",
            "--shape",
            "tiny",
            "--dtype",
            "bfloat16",
            "--batch-sizes",
            "1,4",
            "--rounds",
            "3",
            "--baseline-items",
            "2",
            "--agreement",
            "8",
            "--worker-jobs",
            "80",
            "--worker-batch",
            "4",
            "--out",
            str(out),
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    text = out.read_text()
    assert "| ModelScope OFAModel, one item per call, fp32 | 1 |" in text
    assert "| ours (bfloat16) | 4 |" in text
    assert "bfloat16 against float32, 8 items" in text
    assert "labels equal for 100%" in text
    assert "The worker end to end on this host" in text
