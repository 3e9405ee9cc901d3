"""Capture of residual snapshots with forward hooks on the blocks.

Hooks see the exact tensor entering and leaving each block, unlike
``output_hidden_states`` whose last entry is post-final-norm in most families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_rksp.errors import NonFiniteActivationError


@dataclass
class Snapshots:
    """Per-block residual snapshots, each (N x d) float32 on CPU."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]

    @property
    def n_tokens(self) -> int:
        return int(self.inputs[0].shape[0])


def hidden_in(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]


def hidden_out(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def check_finite(t: torch.Tensor, block: int, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteActivationError(block, where)


@torch.no_grad()
def capture_snapshots(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = True,
    input_name: str = "input_ids",
) -> Snapshots:
    """Run ``model`` over ``input_ids`` (B x T) in batches and keep every block's X and Y.

    Snapshots are stored in float32 on CPU whatever the compute dtype, so the
    spectral core always sees the same precision.
    """
    n_blocks = len(blocks)
    xs: list[list[torch.Tensor]] = [[] for _ in range(n_blocks)]
    ys: list[list[torch.Tensor]] = [[] for _ in range(n_blocks)]
    handles = []

    def make_hooks(i: int):
        def pre(_module, args, kwargs):
            h = hidden_in(args, kwargs)
            check_finite(h, i, "entering")
            xs[i].append(h.detach().reshape(-1, h.shape[-1]).float().cpu())

        def post(_module, args, kwargs, out):
            h = hidden_out(out)
            check_finite(h, i, "leaving")
            ys[i].append(h.detach().reshape(-1, h.shape[-1]).float().cpu())

        return pre, post

    for i, block in enumerate(blocks):
        pre, post = make_hooks(i)
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        model.eval()
        batches = input_ids.split(batch_size)
        for batch in tqdm(batches, desc="forward", unit="batch", disable=not progress):
            batch = batch.to(device)
            if input_name == "input_ids":
                extra = {"decoder_input_ids": batch} if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else {}
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False, **extra)
            else:  # images and other dense inputs: no mask, no cache
                model(**{input_name: batch.to(next(model.parameters()).dtype)})
    finally:
        for h in handles:
            h.remove()
    return Snapshots(
        inputs=[torch.cat(c) for c in xs],
        outputs=[torch.cat(c) for c in ys],
    )
