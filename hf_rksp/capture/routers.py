"""Router statistics of mixture-of-experts blocks, recorded beside the spectrum.

Unbalanced expert load and large router logits are the MoE-specific
instabilities (router z-loss and load-balancing losses exist for them), so the
audit reports them per block: the share of routed tokens each expert gets,
max/mean load, the largest |router logit| and the mean router entropy.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from hf_rksp.record.records import RouterStats


def find_routers(blocks: nn.ModuleList) -> dict[int, nn.Module]:
    """Block index -> its top-k router (transformers' ``*TopKRouter`` modules: Mixtral, Qwen2-MoE, ...)."""
    routers = {}
    for i, block in enumerate(blocks):
        for m in block.modules():
            if type(m).__name__.endswith("Router") and hasattr(m, "top_k") and hasattr(m, "weight"):
                routers[i] = m
                break
    return routers


class RouterRecorder:
    """Forward hooks accumulating routing counts and logit statistics per block."""

    def __init__(self, routers: dict[int, nn.Module]):
        self.routers = routers
        self.counts: dict[int, torch.Tensor] = {}
        self.logit_max: dict[int, float] = {}
        self.entropy_sum: dict[int, float] = {}
        self.tokens: dict[int, int] = {}

    def _hook(self, i: int):
        def hook(module, args, out):
            logits, _, indices = out
            logits = logits.detach().float().reshape(-1, logits.shape[-1])
            n_exp = logits.shape[-1]
            counts = torch.bincount(indices.detach().reshape(-1).cpu(), minlength=n_exp).double()
            self.counts[i] = self.counts.get(i, torch.zeros(n_exp, dtype=torch.float64)) + counts
            self.logit_max[i] = max(self.logit_max.get(i, 0.0), float(logits.abs().max()))
            p = torch.softmax(logits, dim=-1)
            ent = float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).sum())
            self.entropy_sum[i] = self.entropy_sum.get(i, 0.0) + ent
            self.tokens[i] = self.tokens.get(i, 0) + logits.shape[0]

        return hook

    @contextmanager
    def recording(self):
        handles = [r.register_forward_hook(self._hook(i)) for i, r in self.routers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def summary(self) -> dict[int, RouterStats]:
        """Block index -> its routing statistics so far (blocks whose router has run)."""
        out = {}
        for i, counts in self.counts.items():
            load = counts / counts.sum()
            n_exp = load.numel()
            out[i] = RouterStats(
                n_experts=n_exp,
                top_k=int(self.routers[i].top_k),
                expert_load=[round(float(x), 6) for x in load],
                load_max_over_mean=float(load.max() * n_exp),
                load_cv=float(load.std(unbiased=False) * n_exp),
                router_logit_max=self.logit_max[i],
                router_entropy_mean=self.entropy_sum[i] / self.tokens[i],
                router_entropy_max=math.log(n_exp),
            )
        return out
