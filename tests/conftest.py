"""Session-wide fixtures: tiny checkpoints written by the project's own code."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import MULTI_TOKEN_ANSWERS, OTHER
from worker.ofa.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default tiny checkpoint: prev_output prompts, yes/no/maybe."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second architecture with prompt_type none and a smaller image."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("other"),
        seed=2,
        config=OTHER,
        patch_image_size=96,
        prompt_type="none",
        max_src_length=40,
    )


@pytest.fixture(scope="session")
def multi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoint whose answer file has a multi-token answer (trie scoring)."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("multi"), seed=3, answer2label=MULTI_TOKEN_ANSWERS
    )
