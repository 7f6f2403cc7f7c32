"""One description of the machine a benchmark ran on (every recorded figure names its machine)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def describe_machine() -> str:
    """'NVIDIA H100 80GB HBM3 x1' on a GPU, else '2-core CPU (AMD EPYC), 23 GiB RAM, no GPU'."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"{os.cpu_count()}-core CPU ({cpu_model()}), {ram_gib():.0f} GiB RAM, no GPU"
