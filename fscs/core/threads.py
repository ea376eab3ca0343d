"""The default thread count: the CPUs this process may run on (its affinity mask, where the OS has one)."""

from __future__ import annotations

import os


def default_threads() -> int:
    """CPUs in this process's affinity mask (Linux), else all CPUs; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
