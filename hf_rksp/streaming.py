"""Layer-major streaming: audit a checkpoint one block at a time (DESIGN.md, "Layer-major streaming").

The base model is built on the meta device; only the non-block weights
(embeddings, final norm) and one block's weights are ever materialized.  The
residual stream of every calibration token stays resident: block 0's inputs
(and the call arguments the model passes its blocks: masks, rotary
embeddings) are captured by a pre-hook that stops the forward before block 0;
then each block is loaded from the safetensors shards, run over all chunks,
profiled by the same spectral core as the whole-model audit, and dropped.
Each weight is read once; peak memory is about one block plus activations.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .capture import _hidden_in, _hidden_out, check_finite
from .errors import RKSPError


class _StopForward(Exception):
    pass


class SafetensorsCheckpoint:
    """Tensor names -> shard files of a (possibly sharded) safetensors checkpoint directory."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: d / v for k, v in weight_map.items()}
        elif (d / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(d / "model.safetensors", "pt") as f:
                self.files = {k: d / "model.safetensors" for k in f.keys()}
        else:
            kinds = sorted({p.suffix for p in d.iterdir() if p.suffix in (".bin", ".pt", ".gguf")})
            hint = f" (found {', '.join(kinds)} weights: those load whole, without --stream)" if kinds else ""
            raise RKSPError(f"--stream needs a safetensors checkpoint in {d}{hint}")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        for f, keys in by_file.items():
            with safe_open(f, "pt") as h:
                for k in keys:
                    out[k] = h.get_tensor(k)
        return out


def _key_map(model, ckpt: SafetensorsCheckpoint) -> dict[str, str]:
    """Base-model parameter name -> checkpoint key (checkpoints of *ForCausalLM carry a prefix)."""
    prefix = getattr(model, "base_model_prefix", "")
    mapping = {}
    for key in ckpt.files:
        name = key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key
        mapping[name] = key
    return mapping


def _materialize(model, names: list[str], keys: dict[str, str], ckpt, dtype, device) -> None:
    from accelerate.utils import set_module_tensor_to_device

    missing = [n for n in names if n not in keys]
    if missing:
        raise RKSPError(f"checkpoint has no tensor for {missing[0]} (and {len(missing) - 1} more)")
    tensors = ckpt.read([keys[n] for n in names])
    for n in names:
        set_module_tensor_to_device(model, n, device, value=tensors[keys[n]], dtype=dtype)


def _release(model, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for n in names:
        set_module_tensor_to_device(model, n, "meta")


def build_meta_model(config, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoModel

    with init_empty_weights(include_buffers=False):
        model = AutoModel.from_config(config, dtype=dtype)
    return model.eval()


@torch.no_grad()
def stream_snapshots_and_profile(
    model,
    blocks,
    block_path: str,
    checkpoint_dir: str | Path,
    input_ids: torch.Tensor,
    profile_block,
    *,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Run ``model`` (on meta) block by block from ``checkpoint_dir`` and profile each block.

    ``profile_block(i, x, y)`` turns one block's snapshots (N x d, float32) into
    its result dict, so the streamed and whole-model audits share every number.
    """
    ckpt = SafetensorsCheckpoint(checkpoint_dir)
    keys = _key_map(model, ckpt)
    names = [n for n, _ in model.named_parameters()]
    block_prefix = lambda i: f"{block_path}.{i}."  # noqa: E731
    outer = [n for n in names if not n.startswith(block_path + ".")]
    t0 = time.perf_counter()
    _materialize(model, outer, keys, ckpt, dtype, device)

    # block 0's inputs and call arguments, per chunk; the forward stops before block 0
    chunks: list[tuple[torch.Tensor, tuple, dict]] = []

    def grab(_module, args, kwargs):
        h = _hidden_in(args, kwargs)
        rest = dict(kwargs)
        rest.pop("hidden_states", None)
        chunks.append((h.detach(), tuple(args[1:]), rest))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            batch = batch.to(device)
            try:
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    timings = {"read_s": 0.0, "forward_s": time.perf_counter() - t0, "spectral_s": 0.0}

    results = []
    n_tok = int(input_ids.numel())
    bar = tqdm(range(len(blocks)), desc="blocks (streamed)", unit="block", disable=not progress)
    for i in bar:
        t = time.perf_counter()
        bnames = [n for n in names if n.startswith(block_prefix(i))]
        _materialize(model, bnames, keys, ckpt, dtype, device)
        t_read = time.perf_counter()
        xs, outs = [], []
        for h, args, kwargs in chunks:
            check_finite(h, i, "entering")
            y = _hidden_out(blocks[i](h, *args, **kwargs))
            check_finite(y, i, "leaving")
            xs.append(h.reshape(-1, h.shape[-1]).float().cpu())
            outs.append(y)
        _release(model, bnames)
        t_fwd = time.perf_counter()
        x = torch.cat(xs)
        y_flat = torch.cat([o.reshape(-1, o.shape[-1]).float().cpu() for o in outs])
        results.append(profile_block(i, x, y_flat))
        chunks = [(o, a, k) for o, (_, a, k) in zip(outs, chunks)]
        t_spec = time.perf_counter()
        timings["read_s"] += t_read - t
        timings["forward_s"] += t_fwd - t_read
        timings["spectral_s"] += t_spec - t_fwd
        bar.set_postfix(tok_s=f"{n_tok / max(t_fwd - t_read, 1e-9):.0f}", near_unit=f"{results[-1]['near_unit_mass']:.3f}")
    return results, timings
