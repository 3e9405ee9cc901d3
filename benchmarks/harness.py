"""What every benchmark shares: where results go, how the machine is described, and the thread setting.

Figures are only comparable on the same machine at the same thread count, so each result file records
both (``machine()``), and ``write_result`` writes it in one atomic step.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from hf_rksp.utils import atomic

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine and settings a figure was measured on."""
    return {"platform": platform.platform(), "processor": cpu_name(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def set_threads(n: int | None) -> int:
    """torch's intra-op threads for this process (a benchmark states its count); returns the count in force."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def write_result(name: str, payload: dict) -> Path:
    """``benchmarks/results/<name>`` (JSON, indent 1), written atomically."""
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())
    return path
