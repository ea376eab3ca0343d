"""The allocator setting keeps freed blocks in the heap: a batch loop stops page-faulting after warm-up."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

LOOP = """
import resource, sys, numpy as np
from fscs.core.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "kept" else None
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
sizes = [4, 12, 20, 28, 6, 18]  # MiB, like a forward pass's intermediate tensors
for _ in range(3):
    [np.ones(s * 2**17) for s in sizes]
before = faults()
for _ in range(20):
    arrays = [np.ones(s * 2**17) for s in sizes]
    del arrays
print(applied, (faults() - before) / (20 * sum(sizes)))
"""


def faults_per_mib(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True)
    applied, per_mib = out.stdout.split()
    return applied, float(per_mib)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_in_a_batch_loop():
    default = faults_per_mib("default")
    kept = faults_per_mib("kept")
    assert default[1] > 5  # glibc's defaults hand these blocks back and fault them in again
    assert kept == ("True", 0.0)
