"""`ofa-entail model tiny` and `ofa-entail predict`, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import photo

CLI = [sys.executable, "-m", "shared.cli"]


def test_tiny_then_predict(tmp_path: Path):
    made = subprocess.run(
        [*CLI, "model", "tiny", str(tmp_path / "m"), "--seed", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    assert "RANDOM WEIGHTS" in made.stderr and "meaningless" in made.stderr
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {
        "config.json",
        "configuration.json",
        "pytorch_model.bin",
        "vocab.json",
        "merges.txt",
        "README.md",
    } <= files
    assert "meaningless" in (tmp_path / "m" / "README.md").read_text()
    image = tmp_path / "cat.png"
    photo("chelsea").save(image)
    out = subprocess.run(
        [
            *CLI,
            "predict",
            str(image),
            "A cat.",
            "--premise",
            "A photo.",
            "--model",
            str(tmp_path / "m"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    verdict = json.loads(out.stdout)
    assert verdict["label"] in ("entailment", "contradiction", "neutral")
    assert abs(sum(verdict["probabilities"].values()) - 1) < 1e-9
    assert "RANDOM WEIGHTS" in out.stderr


def test_predict_errors_are_readable(tmp_path: Path):
    image = tmp_path / "x.jpg"
    image.write_bytes(b"not an image")
    missing = subprocess.run(
        [*CLI, "predict", str(image), "x", "--model", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "no such checkpoint directory" in missing.stderr
