"""One validation layer: every option and config value is checked here, before any heavy work.

The audit, the streaming path, push and compare call these functions instead
of checking values where they use them, so a bad value fails the same way
(a ConfigError naming its parameter, worded as a flag by the CLI) whichever
path it would have taken.  Iteration counts are bounded here too: an option
that would make the audit run for days or allocate terabytes is refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .errors import ConfigError, RKSPError

#: the most calibration tokens an audit takes (2^24: 8 times a 7B model's hidden size squared in tokens
#: would already be hours of forward passes on a CPU; the paper uses 2048)
MAX_TOKENS = 2**24
#: the largest seed torch's generators take
MAX_SEED = 2**63 - 1
#: the most sequences per forward batch
MAX_BATCH = 2**16
#: DEVICE=SIZE sizes accelerate's max_memory understands (convert_file_size_to_int)
SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?$", re.IGNORECASE)
DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?|mps)$")
#: git ref names the Hub accepts as a revision: no spaces, control characters, '..', '~^:?*[\\' or '@{'
BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[/.-]|[/.]$|\.lock$")


def check_int(name: str, value, lo: int, hi: int) -> None:
    """``value`` is an integer in [lo, hi] (bool is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise ConfigError(f"must be between {lo} and {hi}, got {value}", param=name)


def check_positive_float(name: str, value) -> None:
    """``value`` is a finite number > 0 (NaN and infinity are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"must be a finite positive number, got {value!r}", param=name)


def check_device(name: str) -> None:
    """cpu, cuda, cuda:N, mps or auto; ``meta`` holds no data and cannot run a forward pass."""
    if not isinstance(name, str) or not DEVICE.match(name):
        raise ConfigError(f"must be cpu, cuda, cuda:N, mps or auto, got {name!r}", param="device")


def check_hub_id(value: str, param: str) -> None:
    """A Hub repo id (``name`` or ``org/name``): it names files and folders, so '..' or a newline is refused."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise ConfigError(f"must be a Hub repo id like org/name: {str(e).splitlines()[0][:200]}", param=param) from None


def check_revision(value: str | None, param: str = "revision") -> None:
    """A branch, tag or commit the Hub can take (git's ref-name rules, as the real push applies them)."""
    if value is None:
        return
    if not value or len(value) > 255 or BAD_REF.search(value):
        raise ConfigError(f"is not a valid branch, tag or commit name: {value!r}", param=param)


def parse_max_memory(text: str) -> dict:
    """'cuda:0=20GiB,cpu=30GiB' -> accelerate's max_memory dict ({0: '20GiB', 'cpu': '30GiB'})."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        dev, sep, size = part.partition("=")
        dev, size = dev.strip(), size.strip()
        if not sep or not size:
            raise ConfigError(f"entries look like DEVICE=SIZE (e.g. cuda:0=20GiB), got {part!r}", param="max_memory")
        key = int(dev.split(":", 1)[1]) if dev.startswith("cuda:") and dev[5:].isdigit() else dev
        if key not in ("cpu", "disk") and not isinstance(key, int):
            raise ConfigError(f"device must be cpu, disk or cuda:N, got {dev!r}", param="max_memory")
        if not SIZE.match(size):
            raise ConfigError(f"size must be a number with a unit like 20GiB or 500MB, got {size!r}",
                              param="max_memory")
        out[key] = size
    if not out:
        raise ConfigError(f"names no device, got {text!r}", param="max_memory")
    return out


def check_audit_options(opts, *, init: bool = False) -> None:
    """Every audit option (``hf_rksp.audit.AuditOptions``), alone and in combination; raises ConfigError/RKSPError."""
    from .calibration import check_shape
    from .loading import parse_dtype
    from .profiling import rksp_config

    check_int("tokens", opts.tokens, 2, MAX_TOKENS)
    check_int("seq_len", opts.seq_len, 1, MAX_TOKENS)
    check_shape(opts.tokens, opts.seq_len)
    if not (opts.rank in ("auto", "full") or (isinstance(opts.rank, int) and not isinstance(opts.rank, bool))):
        raise ConfigError(f"rank must be 'full', 'auto' or an integer, got {opts.rank!r}", param="rank")
    if isinstance(opts.rank, int) and opts.rank < 1:
        raise ConfigError(f"rank must be at least 1, got {opts.rank}", param="rank")
    if isinstance(opts.rank, int) and opts.rank > opts.tokens - 1:
        raise ConfigError(f"rank {opts.rank} needs at least {opts.rank + 1} tokens; with {opts.tokens} tokens "
                          f"the largest possible rank is {opts.tokens - 1}", param="rank")
    rksp_config(opts, opts.tokens, opts.tokens)  # validates eps, bands, tau
    for name in ("eps", "band_upper", "band_lower", "contractive", "resdmd_tau"):
        check_positive_float(name, getattr(opts, name))
    check_int("seed", opts.seed, 0, MAX_SEED)
    check_int("batch_size", opts.batch_size, 1, MAX_BATCH)
    parse_dtype(opts.dtype)
    check_device(opts.device)
    if opts.lr is not None:
        check_positive_float("lr", opts.lr)
    if opts.name is not None:
        check_hub_id(opts.name, "name")
    check_revision(opts.revision)
    if opts.text is not None and not Path(opts.text).is_file():
        raise RKSPError(f"--text file not found: {opts.text}")
    _check_placement(opts, init)


def _check_placement(opts, init: bool) -> None:
    import torch

    if opts.quantize is not None:
        if opts.quantize not in ("8bit", "4bit"):
            raise RKSPError(f"unknown quantization {opts.quantize!r} (8bit, 4bit)")
        if not torch.cuda.is_available():
            raise RKSPError(f"--load-in-{opts.quantize} uses bitsandbytes, which needs a CUDA GPU; this machine has "
                            "none (audit in float32/bfloat16, with --stream if the model is large)")
        if opts.stream:
            raise RKSPError(f"--load-in-{opts.quantize} loads the model whole; it cannot be combined with --stream")
    if opts.max_memory is not None:
        parse_max_memory(opts.max_memory)
        if opts.device_map is None:
            raise RKSPError("--max-memory goes with --device-map")
    if opts.device_map is not None and opts.stream:
        raise RKSPError("--device-map places a whole model; --stream loads one block at a time (use one of them)")
    if (opts.device_map is not None or opts.quantize is not None) and init:
        raise RKSPError("--device-map and --load-in-Nbit place pretrained weights; --init builds on --device "
                        "(use --stream for big models at init)")
    if opts.device == "mps" and not torch.backends.mps.is_available():
        raise RKSPError("--device mps requested but this machine has no Apple MPS device")
    if (opts.device.startswith("cuda") or opts.device_map == "cuda") and not torch.cuda.is_available():
        flag = "--device" if opts.device.startswith("cuda") else "--device-map"
        raise RKSPError(f"{flag} {opts.device_map if flag == '--device-map' else opts.device} requested but CUDA "
                        "is not available on this machine")


#: config keys that size the model: each must be a positive integer when present
SIZE_KEYS = ("vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers",
             "num_attention_heads", "n_head", "intermediate_size", "n_inner", "max_position_embeddings",
             "n_positions", "num_key_value_heads", "head_dim", "d_ff", "image_size", "patch_size", "num_channels")
#: no real model has a dimension this large (a 7B model's vocabulary is 32k, its width 4096)
MAX_DIM = 2**24
#: nor this many blocks (the deepest published LLMs have ~120; building 2^24 modules alone would take hours)
MAX_LAYERS = 2**12
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def check_config(config, origin: str) -> None:
    """The size fields of a model config: positive integers within reason (0 or -1 crash deep in transformers)."""
    for key in SIZE_KEYS:
        v = getattr(config, key, None)
        if v is None:
            continue
        top = MAX_LAYERS if key in LAYER_KEYS else MAX_DIM
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= top:
            raise RKSPError(f"invalid config {origin}: {key} must be a positive integer up to {top}, got {v!r}")
