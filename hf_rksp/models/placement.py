"""Where an audited model's weights live: whole on a device, placed by accelerate, quantized, or streamed.

The audit decides here, before loading, with the one memory planner
(:mod:`hf_rksp.memory`): a model that cannot fit whole is streamed, one that
fits neither way is refused with the numbers.  ``opts`` is an
``hf_rksp.pipeline.options.AuditOptions`` (validated by :mod:`hf_rksp.validation`).
"""

from __future__ import annotations

from pathlib import Path

from hf_rksp.models.loading import Source, load_config, parse_dtype
from hf_rksp.models.memory import MemoryPlan, ModelSizes, plan_memory
from hf_rksp.utils.checks import parse_max_memory


def can_stream(src: Source) -> bool:
    """Whether the streamed path can read ``src`` (safetensors directories, hub ids, GGUF files, any init)."""
    if src.init or src.kind in ("hub", "gguf"):
        return True
    d = Path(src.path or "")
    return (d / "model.safetensors.index.json").is_file() or (d / "model.safetensors").is_file()


def plan_for(src: Source, opts) -> MemoryPlan | None:
    """The memory plan of auditing ``src`` with ``opts``; None where accelerate places the weights."""
    if opts.device_map is not None or opts.quantize is not None:
        return None
    config = load_config(src, opts.trust_remote_code, opts.blocks is not None)
    sizes = ModelSizes.of(config, parse_dtype(opts.dtype), opts.blocks, origin=Path(src.config_origin or src.id).name,
                          trust_remote_code=opts.trust_remote_code)
    return plan_memory(sizes, tokens=opts.tokens, dtype=opts.dtype, stream=opts.stream, can_stream=can_stream(src))


def placement_kwargs(opts, offload_folder: str | None = None) -> dict:
    """from_pretrained keywords for --device-map / --max-memory / --load-in-Nbit (accelerate conventions).

    ``--device-map disk`` offloads to ``offload_folder``, a temporary folder the caller owns and removes.
    """
    kw: dict = {}
    if opts.device_map is not None:
        if opts.device_map == "disk":
            kw.update(device_map="auto", offload_folder=offload_folder)
        else:
            kw["device_map"] = opts.device_map
        if opts.max_memory:
            kw["max_memory"] = parse_max_memory(opts.max_memory)
    if opts.quantize is not None:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=opts.quantize == "8bit",
                                                       load_in_4bit=opts.quantize == "4bit")
        kw.setdefault("device_map", "auto")
    return kw
