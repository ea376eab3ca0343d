"""Memory budgets in bytes from the ``memory`` params (MiB, or ``auto``: a share of the machine it runs on).

``auto`` gives the token cache a quarter of the host's RAM and the prepared features an eighth of it on the
CPU, or a quarter of the GPU's memory on CUDA. A budget decides what a stage keeps, never a value, so the
same study runs on a 16 GB laptop and a 1 TB server with the same numbers, only more re-reading on the first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MIB = 2**20
AUTO_SHARE = {"tokens": 0.25, "prepared": 0.125, "prepared_cuda": 0.25}


def host_ram() -> int:
    """Bytes of RAM this process may use: the machine's, or its cgroup's limit when lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return int(ram)


def device_memory(device: Any) -> int:
    """Total bytes of a CUDA device's memory."""
    import torch

    return int(torch.cuda.get_device_properties(device).total_memory)


def budget_bytes(value: str | int, kind: str, device: Any = None) -> int:
    """The budget of ``kind`` (``tokens`` | ``prepared``) in bytes: ``value`` MiB, or the ``auto`` share
    (prepared features on a CUDA ``device``: a share of its memory)."""
    if value != "auto":
        return int(value) * MIB
    if kind == "prepared" and device is not None and getattr(device, "type", str(device)) == "cuda":
        return int(AUTO_SHARE["prepared_cuda"] * device_memory(device))
    return int(AUTO_SHARE[kind] * host_ram())


def describe_budget(value: str | int, resolved: int) -> dict[str, Any]:
    """What a stage records of one budget: the param and the MiB it came to."""
    return {"param": value, "mib": round(resolved / MIB)}
