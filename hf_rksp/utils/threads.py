"""torch's intra-op thread count: ours by default on the command line, set for a scope and restored after."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Our default thread count [ours]: half the usable cores, at least 1.

    Used by ``hf-rksp audit`` (without ``--threads``) and ``examples/finetune_kss.py``; the library itself
    leaves torch's setting alone.  torch's own default (every core) collapsed on a loaded 2-core machine:
    an audit and a KSS step ran several times slower on 2 threads than on 1 (docs/results/benchmarks.md,
    Threads), while on a quiet machine 2 threads gained at most ~1.3x.
    """
    return max(1, usable_cores() // 2)


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch threads (None: leave torch's setting alone), then restore the count."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
