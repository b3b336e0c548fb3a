"""Fixtures for the store tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import run_async


@pytest.fixture
def on_loop(inproc_settings) -> Callable[[Callable[[Any], Any]], Any]:
    """``run_async`` on the in-process layer's settings: ``on_loop(lambda st: ...)``."""
    return lambda use: run_async(inproc_settings, use)
