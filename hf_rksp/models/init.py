"""Seeded random init, one module group at a time: the same numbers whole or streamed.

``--init`` must give the same spectra whether the model is built whole or
streamed block by block (a 7B model never exists whole when streamed).  A
global ``torch.manual_seed`` followed by ``from_config`` cannot do that: the
values of block i would depend on everything initialized before it.  So every
group (the non-block weights, then each block) is initialized from its own
seed by the model's own ``_init_weights``, in module order.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_rksp.errors import RKSPError


def group_seed(seed: int, group: int) -> int:
    """Seed of one group: -1 for the weights outside the blocks, i for block i."""
    return (seed * 1_000_003 + group + 1) % (2**63)


def outer_modules(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    inside = {id(m) for b in blocks for m in b.modules()}
    return [m for m in model.modules() if id(m) not in inside]


@torch.no_grad()
def init_group(model, modules: list[nn.Module], seed: int, what: str) -> None:
    """Initialize the direct parameters of ``modules`` with ``model._init_weights`` from ``seed``.

    Parameters are first filled with NaN, so one that ``_init_weights`` does
    not cover is caught instead of keeping stale or uninitialized memory.
    """
    params = [(m, n, p) for m in modules for n, p in m.named_parameters(recurse=False)]
    for _, _, p in params:
        p.fill_(float("nan"))
        p._is_hf_initialized = False
    for m in modules:
        m._is_hf_initialized = False
    with torch.random.fork_rng(devices=[]):  # _init_weights draws from the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        for m in modules:
            model._init_weights(m)
    for m, n, p in params:
        if not bool(torch.isfinite(p).all()):
            raise RKSPError(f"{type(model).__name__}._init_weights does not initialize {type(m).__name__}.{n} "
                            f"({what}); this family cannot be initialized block by block")


def seeded_init(model, blocks: nn.ModuleList, seed: int) -> None:
    """Re-initialize a whole model group by group (what the streamed --init path does one block at a time)."""
    init_group(model, outer_modules(model, blocks), group_seed(seed, -1), "outside the blocks")
    for i, b in enumerate(blocks):
        init_group(model, list(b.modules()), group_seed(seed, i), f"block {i}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
