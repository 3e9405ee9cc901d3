"""Capture of residual snapshots: forward hooks on the blocks, or the model's ``output_hidden_states``.

Hooks see the exact tensor entering and leaving each block (our default).  ``output_hidden_states`` gives
the embeddings and each block's output, except that the last entry is taken after the final norm in most
families: the paper's protocol for pretrained models takes its pairs (h_i, h_i+1) from there.  Padding
positions (``attention_mask`` 0) are kept out of the snapshots either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_rksp.errors import ConfigError, NonFiniteActivationError, SnapshotError


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
    attention_mask: torch.Tensor | None = None,
    source: str = "hooks",
) -> Snapshots:
    """Run ``model`` over ``input_ids`` (B x T) in batches and keep every block's X and Y.

    ``source``: ``"hooks"`` (each block's own input and output) or ``"hidden-states"`` (consecutive
    entries of ``output_hidden_states``).  Snapshots are stored in float32 on CPU whatever the compute
    dtype, so the spectral core always sees the same precision.
    """
    if source not in ("hooks", "hidden-states"):
        raise ConfigError(f"must be hooks or hidden-states, got {source!r}", param="snapshots")
    n_blocks = len(blocks)
    xs: list[list[torch.Tensor]] = [[] for _ in range(n_blocks)]
    ys: list[list[torch.Tensor]] = [[] for _ in range(n_blocks)]
    handles = []
    keep: list[torch.Tensor | None] = [None]  # the current batch's non-padding positions (flattened)

    def kept(h: torch.Tensor) -> torch.Tensor:
        flat = h.detach().reshape(-1, h.shape[-1])
        return (flat if keep[0] is None else flat[keep[0].to(flat.device)]).float().cpu()

    def make_hooks(i: int):
        def pre(_module, args, kwargs):
            h = hidden_in(args, kwargs)
            check_finite(h, i, "entering")
            xs[i].append(kept(h))

        def post(_module, args, kwargs, out):
            h = hidden_out(out)
            check_finite(h, i, "leaving")
            ys[i].append(kept(h))

        return pre, post

    if source == "hooks":
        for i, block in enumerate(blocks):
            pre, post = make_hooks(i)
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        model.eval()
        batches = input_ids.split(batch_size)
        masks = attention_mask.split(batch_size) if attention_mask is not None else [None] * len(batches)
        for batch, mask in tqdm(list(zip(batches, masks)), desc="forward", unit="batch", disable=not progress):
            batch = batch.to(device)
            keep[0] = None if mask is None else mask.reshape(-1).bool()
            if input_name == "input_ids":
                extra = {"decoder_input_ids": batch} if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else {}
                am = torch.ones_like(batch) if mask is None else mask.to(device)
                out = model(input_ids=batch, attention_mask=am, use_cache=False,
                            output_hidden_states=source == "hidden-states", **extra)
            else:  # images and other dense inputs: no mask, no cache
                out = model(**{input_name: batch.to(next(model.parameters()).dtype)},
                            output_hidden_states=source == "hidden-states")
            if source == "hidden-states":
                states = out.hidden_states
                if states is None or len(states) != n_blocks + 1:
                    raise SnapshotError(f"output_hidden_states gave {0 if states is None else len(states)} "
                                        f"states for {n_blocks} blocks (need one more than the blocks)")
                for i in range(n_blocks):
                    check_finite(states[i + 1], i, "leaving")
                    xs[i].append(kept(states[i]))
                    ys[i].append(kept(states[i + 1]))
    finally:
        for h in handles:
            h.remove()
    return Snapshots(
        inputs=[torch.cat(c) for c in xs],
        outputs=[torch.cat(c) for c in ys],
    )
