"""Service sub-commands of ``ofa-entail`` (filled in with the service)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    """Register the service sub-commands on ``sub``."""
    del sub


__all__ = ["add_commands", "argparse"]
