"""Residual-block discovery per model family.

RKSP needs the modules whose input and output are the residual stream.  Each
supported family names the ModuleList that holds them, relative to the base
model (``model.base_model``: GPT2Model, LlamaModel, BertModel, ...).
"""

from __future__ import annotations

from torch import nn

from .errors import RKSPError

#: model_type -> attribute path of the block list on the base model.
BLOCK_PATHS: dict[str, str] = {
    "gpt2": "h",
    "llama": "layers",
    "mistral": "layers",
    "qwen2": "layers",
    "bert": "encoder.layer",
}


def supported_families() -> list[str]:
    return sorted(BLOCK_PATHS)


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The residual blocks of ``model`` in forward order, with their path on the base model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BLOCK_PATHS:
        raise RKSPError(
            f"unsupported model family {model_type!r}; supported: {', '.join(supported_families())}"
        )
    base = getattr(model, "base_model", model)
    path = BLOCK_PATHS[model_type]
    blocks = _get_path(base, path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise RKSPError(f"{type(model).__name__} has no residual blocks at '{path}'")
    return path, blocks
