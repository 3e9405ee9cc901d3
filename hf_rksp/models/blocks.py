"""Residual-block discovery per model family.

RKSP needs the modules whose input and output are the residual stream.  Each
supported family names the ModuleList that holds them, relative to the base
model (``model.base_model``: GPT2Model, LlamaModel, BertModel, ...).
"""

from __future__ import annotations

from torch import nn

from hf_rksp.errors import RKSPError

#: model_type -> attribute path of the block list on the base model.
#: For Mamba/Mamba2 a block is ``x + mixer(norm(x))``: its input and output are
#: the residual stream exactly as for attention blocks.
BLOCK_PATHS: dict[str, str] = {
    "gpt2": "h",
    "gptj": "h",
    "falcon": "h",
    "gpt_neox": "layers",
    "llama": "layers",
    "mistral": "layers",
    "mixtral": "layers",
    "qwen2": "layers",
    "qwen2_moe": "layers",
    "qwen3": "layers",
    "gemma": "layers",
    "phi": "layers",
    "mamba": "layers",
    "mamba2": "layers",
    "opt": "decoder.layers",
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "deberta-v2": "encoder.layer",
    "vit": "layers",
    # encoder-decoder: both stacks, profiled separately ("+" joins stacks, in forward order)
    "t5": "encoder.block+decoder.block",
}


def supported_families() -> list[str]:
    return sorted(BLOCK_PATHS)


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


#: attributes holding the wrapped model of wrappers that add no residual blocks of their own:
#: DistributedDataParallel / FSDP / DataParallel (``module``), torch.compile's OptimizedModule (``_orig_mod``)
_WRAPPED = {"DistributedDataParallel": "module", "FullyShardedDataParallel": "module", "DataParallel": "module",
            "OptimizedModule": "_orig_mod"}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside training wrappers: PEFT's ``PeftModel`` (``get_base_model()``), DDP,
    FSDP, DataParallel and ``torch.compile``'s ``OptimizedModule``, however nested.  Other models unchanged.

    The wrapped model's modules are the wrapper's own, so hooks on its blocks see the wrapper's forward.
    """
    for _ in range(8):
        attr = _WRAPPED.get(type(model).__name__)
        if attr is not None and isinstance(getattr(model, attr, None), nn.Module):
            model = getattr(model, attr)
        elif callable(getattr(type(model), "get_base_model", None)):  # peft.PeftModel (and its task classes)
            model = model.get_base_model()
        else:
            return model
    return model


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The residual blocks of ``model`` in forward order, with their path on the base model.

    ``path`` (``--blocks``) points at the block list of a family hf-rksp does
    not know, relative to the base model or to the model itself.  Training wrappers (PEFT, DDP, FSDP,
    ``torch.compile``) are looked through (:func:`unwrap_model`).
    """
    model = unwrap_model(model)
    base = getattr(model, "base_model", model)
    if path is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in BLOCK_PATHS:
            raise RKSPError(
                f"unsupported model family {model_type!r}; supported: {', '.join(supported_families())}; "
                "point at the block list with `blocks` (e.g. `blocks` model.layers)"
            )
        path = BLOCK_PATHS[model_type]
    stacks = [_find_stack(model, base, p) for p in path.split("+")]
    blocks = stacks[0] if len(stacks) == 1 else nn.ModuleList([b for s in stacks for b in s])
    return path, blocks


def stack_labels(path: str, model: nn.Module) -> list[tuple[str, int]] | None:
    """(stack name, index in stack) per block for multi-stack paths like T5's; None for one stack."""
    parts = path.split("+")
    if len(parts) == 1:
        return None
    model = unwrap_model(model)
    base = getattr(model, "base_model", model)
    labels = []
    for p in parts:
        labels += [(p.split(".")[0], i) for i in range(len(_find_stack(model, base, p)))]
    return labels


def _find_stack(model: nn.Module, base: nn.Module, path: str) -> nn.ModuleList:
    blocks = _get_path(base, path)
    if blocks is None and base is not model:
        blocks = _get_path(model, path)
    if blocks is None and path.split(".")[0] == getattr(model, "base_model_prefix", None):
        blocks = _get_path(base, path.split(".", 1)[1]) if "." in path else None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise RKSPError(f"{type(model).__name__} has no list of residual blocks at '{path}'")
    return blocks
