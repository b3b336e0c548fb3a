"""The machine a benchmark ran on, as every results file states it: the CPU's model
too, since this workplace's machines differ from one session to the next and rates
from different CPUs do not compare."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text() if cpuinfo.exists() else ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the architecture alone."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return f"{line.partition(':')[2].strip()} ({platform.machine()})"
    return platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (and every other word of /proc/cpuinfo)."""
    return set(_cpuinfo().split())


def machine() -> str:
    """'<CPU model> (<architecture>), <n> cores'."""
    return f"{cpu_model()}, {os.cpu_count()} cores"
