"""Weights for a model built on the meta device, materialized a group (one block, or what lies outside the
blocks) at a time: read from a checkpoint, or created at seeded random init."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_rksp.errors import SourceError
from hf_rksp.models.checkpoints import Checkpoint
from hf_rksp.models.checkpoints.safetensors import SafetensorsCheckpoint
from hf_rksp.models.init import group_seed, init_group, outer_modules


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

    ``checkpoint`` is a safetensors directory, or any :class:`~hf_rksp.models.checkpoints.Checkpoint`
    (a GGUF file's, a Hub repo's).
    """

    def __init__(self, model, checkpoint: Checkpoint | str | Path, dtype: torch.dtype, device: str):
        self.model, self.dtype, self.device = model, dtype, device
        self.ckpt = SafetensorsCheckpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        self.keys = _key_map(model, self.ckpt)
        for n, p in model.named_parameters():  # a safetensors header knows every shape: check them all now
            got = self.ckpt.shapes.get(self.keys.get(n))
            if got is not None and tuple(got) != tuple(p.shape):
                raise SourceError(f"checkpoint tensor {self.keys[n]} has shape {list(got)}, the config's model "
                                  f"expects {list(p.shape)}")
        self.ckpt.expect(self.keys[n] for n, _ in model.named_parameters() if n in self.keys)

    def progress(self) -> dict[str, str]:
        """What the per-block bar shows about reading (a Hub checkpoint: shards fetched)."""
        return self.ckpt.progress()

    def _load(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        missing = [n for n in names if n not in self.keys]
        if missing:
            raise SourceError(f"checkpoint has no tensor for {missing[0]} (and {len(missing) - 1} more)")
        tensors = self.ckpt.read([self.keys[n] for n in names])
        for n in names:
            want, got = tuple(self.model.get_parameter(n).shape), tuple(tensors[self.keys[n]].shape)
            if want != got:
                raise SourceError(f"checkpoint tensor {self.keys[n]} has shape {list(got)}, the config's model "
                                  f"expects {list(want)}")
            set_module_tensor_to_device(self.model, n, self.device, value=tensors[self.keys[n]], dtype=self.dtype)

    def outer(self, names: list[str]) -> None:
        self._load(names)

    def block(self, i: int, names: list[str]) -> None:
        self._load(names)


class InitWeights:
    """Weights at seeded random init, created group by group (hf_rksp.models.init): the values of a whole-model
    init."""

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


def release(model, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for n in names:
        set_module_tensor_to_device(model, n, "meta")


def build_meta_model(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """``config``'s base model on the meta device (``trust_remote_code``: a custom-code model's classes may run)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel

    with init_empty_weights(include_buffers=False):
        model = AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()

