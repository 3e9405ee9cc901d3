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
from .init_weights import group_seed, init_group, outer_modules


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
            hint = f" (found {', '.join(kinds)} weights: those can only be loaded whole)" if kinds else ""
            raise RKSPError(f"streaming (--stream, automatic for models over half the free RAM) needs a "
                            f"safetensors checkpoint in {d}{hint}")

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


class CheckpointWeights:
    """Weights read from a checkpoint, a group of tensors at a time.

    ``checkpoint`` is a safetensors directory, or any object with ``files``
    (its tensor keys) and ``read(keys) -> {key: tensor}``: a
    :class:`~hf_rksp.gguf_checkpoint.GGUFCheckpoint`, a Hub checkpoint.
    """

    def __init__(self, model, checkpoint, dtype: torch.dtype, device: str):
        self.model, self.dtype, self.device = model, dtype, device
        self.ckpt = SafetensorsCheckpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        self.keys = _key_map(model, self.ckpt)
        if hasattr(self.ckpt, "expect"):  # a Hub checkpoint: which shard tensors will be read
            self.ckpt.expect(self.keys[n] for n, _ in model.named_parameters() if n in self.keys)

    def progress(self) -> dict[str, str]:
        """What the per-block bar shows about reading (a Hub checkpoint: shards fetched)."""
        return self.ckpt.progress() if hasattr(self.ckpt, "progress") else {}

    def _load(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        missing = [n for n in names if n not in self.keys]
        if missing:
            raise RKSPError(f"checkpoint has no tensor for {missing[0]} (and {len(missing) - 1} more)")
        tensors = self.ckpt.read([self.keys[n] for n in names])
        for n in names:
            set_module_tensor_to_device(self.model, n, self.device, value=tensors[self.keys[n]], dtype=self.dtype)

    def outer(self, names: list[str]) -> None:
        self._load(names)

    def block(self, i: int, names: list[str]) -> None:
        self._load(names)


class InitWeights:
    """Weights at seeded random init, created group by group (hf_rksp.init_weights): same values as whole-model --init."""

    def __init__(self, model, blocks, seed: int, dtype: torch.dtype, device: str):
        self.model, self.blocks, self.seed, self.dtype, self.device = model, blocks, seed, dtype, device

    def _empty(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for n in names:
            shape = self.model.get_parameter(n).shape
            set_module_tensor_to_device(self.model, n, self.device, value=torch.empty(shape, dtype=self.dtype))

    def outer(self, names: list[str]) -> None:
        self._empty(names)
        init_group(self.model, outer_modules(self.model, self.blocks), group_seed(self.seed, -1), "outside the blocks")

    def block(self, i: int, names: list[str]) -> None:
        self._empty(names)
        init_group(self.model, list(self.blocks[i].modules()), group_seed(self.seed, i), f"block {i}")


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


class ResumeState:
    """Per-block progress of a streamed audit: results so far and the residual stream entering the next block.

    Saved atomically after every block under ``directory``; ``key`` (a hash of
    everything that changes the numbers) guards against resuming a different
    audit.  Removed when the audit completes.
    """

    def __init__(self, directory: Path, key: str):
        self.dir, self.key = Path(directory), key

    def load(self) -> tuple[int, list[dict], list[torch.Tensor]] | None:
        meta, acts = self.dir / "progress.json", self.dir / "activations.pt"
        if not (meta.is_file() and acts.is_file()):
            return None
        try:
            m = json.loads(meta.read_text())
            if m.get("key") != self.key:
                return None
            hidden = torch.load(acts, weights_only=True)
        except (OSError, ValueError, RuntimeError):
            return None  # a damaged checkpoint: start over
        if m.get("activations_sha") != _tensors_sha(hidden):
            return None
        return int(m["next_block"]), m["results"], hidden

    def save(self, next_block: int, results: list[dict], hidden: list[torch.Tensor]) -> None:
        from . import atomic

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "activations.pt.tmp"
        torch.save([h.cpu() for h in hidden], tmp)
        tmp.replace(self.dir / "activations.pt")
        atomic.write_json(self.dir / "progress.json", {"key": self.key, "next_block": next_block,
                                                       "activations_sha": _tensors_sha(hidden), "results": results})

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def _tensors_sha(hidden: list[torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in hidden:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def stream_snapshots_and_profile(
    model,
    blocks,
    block_path: str,
    weights,
    input_ids: torch.Tensor,
    profile_block,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = True,
    resume: ResumeState | None = None,
) -> tuple[list[dict], dict]:
    """Run ``model`` (on meta) block by block, its weights from ``weights``, and profile each block.

    ``weights`` is a :class:`CheckpointWeights` or :class:`InitWeights`.
    ``profile_block(i, x, y)`` turns one block's snapshots (N x d, float32) into
    its result dict, so the streamed and whole-model audits share every number.
    With ``resume``, progress is saved after every block and a saved state is
    picked up where it stopped.
    """
    names = [n for n, _ in model.named_parameters()]
    block_prefix = lambda i: f"{block_path}.{i}."  # noqa: E731
    outer = [n for n in names if not n.startswith(block_path + ".")]
    t0 = time.perf_counter()
    weights.outer(outer)

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
    _release(model, outer)  # embeddings are only needed to make block 0's inputs
    timings = {"capture_s": time.perf_counter() - t0, "read_s": 0.0, "forward_s": 0.0, "spectral_s": 0.0}

    results: list[dict] = []
    start = 0
    saved = resume.load() if resume is not None else None
    if saved is not None and len(saved[2]) == len(chunks):
        start, results, hidden = saved
        chunks = [(h.to(device), a, k) for h, (_, a, k) in zip(hidden, chunks)]
        timings["resumed_at_block"] = start
    n_tok = int(input_ids.numel())
    bar = tqdm(range(start, len(blocks)), desc="blocks (streamed)", unit="block", disable=not progress,
               initial=start, total=len(blocks))
    for i in bar:
        t = time.perf_counter()
        bnames = [n for n in names if n.startswith(block_prefix(i))]
        weights.block(i, bnames)
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
        if resume is not None and i + 1 < len(blocks):
            resume.save(i + 1, results, [h for h, _, _ in chunks])
        timings["read_s"] += t_read - t
        timings["forward_s"] += t_fwd - t_read
        timings["spectral_s"] += t_spec - t_fwd
        timings["checkpoint_s"] = timings.get("checkpoint_s", 0.0) + time.perf_counter() - t_spec
        bar.set_postfix(tok_s=f"{n_tok / max(t_fwd - t_read, 1e-9):.0f}", near_unit=f"{results[-1]['near_unit_mass']:.3f}",
                        **getattr(weights, "progress", dict)())
    return results, timings
