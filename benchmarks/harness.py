"""What every benchmark shares: where results go, how the machine is described, and the thread setting.

Figures are only comparable on the same machine at the same thread count, so each result file records
both (``machine()``), and ``write_result`` writes it in one atomic step.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
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


def read_by_key(path: Path) -> dict[str, dict]:
    """The records of a JSON-lines results file by their ``key`` (the first record of a key wins; a line another
    process is still writing, or a torn last line, is skipped); {} when the file does not exist."""
    if not Path(path).is_file():
        return {}
    out = {}
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        out.setdefault(r["key"], r)
    return out


@contextmanager
def quiet_loggers(*names: str):
    """These loggers at ERROR for the block (a benchmark prints its table, not library chatter), their levels
    restored after, so an in-process caller (the test suite's smoke runs) keeps its own."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, names)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


#: the competing process of the "loaded" timings: a 2-thread matmul loop, which ends by itself when the
#: benchmark that started it is gone
COMPETITOR = ("import os\nimport torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
              "parent = os.getppid()\nwhile os.getppid() == parent:\n    a = torch.tanh(a @ a / 32)\n")


@contextmanager
def competitor(active: bool):
    """The block beside a running ``COMPETITOR`` process when ``active`` (killed after it), else alone."""
    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if active else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
