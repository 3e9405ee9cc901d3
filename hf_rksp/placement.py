"""Where an audited model's weights live: whole on a device, placed by accelerate, quantized, or streamed.

The audit decides here, before loading, so a model that cannot fit is
streamed instead of failing, and placement options that cannot work on this
machine fail with one clear line.  ``opts`` is an ``hf_rksp.audit.AuditOptions``.
"""

from __future__ import annotations

import torch

from .errors import RKSPError
from .loading import fits_in_memory, load_config


def too_big_for_memory(src, opts) -> bool:
    """Whether a streamable source would take more than half the available RAM whole (then it streams).

    For a GGUF file this is the de-quantized size in ``--dtype``.  Configs
    transformers cannot build answer False: the whole-model path reports those.
    """
    try:
        return not fits_in_memory(load_config(src, opts.trust_remote_code, opts.blocks is not None), opts.dtype)
    except RKSPError:
        raise
    except Exception:
        return False


def parse_max_memory(text: str) -> dict:
    """'cuda:0=20GiB,cpu=30GiB' -> accelerate's max_memory dict ({0: '20GiB', 'cpu': '30GiB'})."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        dev, sep, size = part.partition("=")
        if not sep or not size:
            raise RKSPError(f"--max-memory entries look like DEVICE=SIZE (e.g. cuda:0=20GiB), got {part!r}")
        dev = dev.strip()
        key = int(dev.split(":", 1)[1]) if dev.startswith("cuda:") and dev[5:].isdigit() else dev
        if key not in ("cpu", "disk") and not isinstance(key, int):
            raise RKSPError(f"--max-memory device must be cpu, disk or cuda:N, got {dev!r}")
        out[key] = size.strip()
    return out


def placement_kwargs(opts) -> dict:
    """from_pretrained keywords for --device-map / --max-memory / --load-in-Nbit (accelerate conventions)."""
    kw: dict = {}
    if opts.device_map is not None:
        if opts.device_map == "cuda" and not torch.cuda.is_available():
            raise RKSPError("--device-map cuda: this machine has no CUDA device")
        if opts.device_map == "disk":
            import tempfile

            kw.update(device_map="auto", offload_folder=tempfile.mkdtemp(prefix="hf-rksp-offload-"))
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
