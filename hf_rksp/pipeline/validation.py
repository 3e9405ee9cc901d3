"""One validation layer: every option and config value is checked here, before any heavy work.

The audit, the streaming path, push and compare call these functions instead
of checking values where they use them, so a bad value fails the same way
(a ConfigError naming its parameter, worded as a flag by the CLI) whichever
path it would have taken.  Iteration counts are bounded here too: an option
that would make the audit run for days or allocate terabytes is refused.
"""

from __future__ import annotations

from pathlib import Path

from hf_rksp.capture.calibration import check_shape
from hf_rksp.capture.profile import rksp_config
from hf_rksp.errors import ConfigError
from hf_rksp.models.loading import parse_dtype
from hf_rksp.utils.checks import (
    check_device,
    check_hub_id,
    check_int,
    check_no_secret,
    check_positive_float,
    check_repo_id,
    check_revision,
    parse_max_memory,
)
from hf_rksp.utils.options import option_fields
from hf_rksp.utils.secrets import active_tokens


def check_audit_options(opts, *, init: bool = False) -> None:
    """Every audit option (``hf_rksp.pipeline.options.AuditOptions``), alone and in combination; raises ConfigError/RKSPError.

    The simple checks come from each field's :class:`~hf_rksp.utils.options.Option`: integer ``bounds``,
    ``positive`` floats and ``choices``; the rest (combinations, files, devices) are written out here.
    """
    declared = option_fields(opts)
    tokens = active_tokens()
    for f, _ in declared:  # every string given ends up in the audit's JSON, its card or a message: no token
        check_no_secret(getattr(opts, f.name), f.name, tokens)
    for f, meta in declared:  # tokens, seq_len, seed, batch_size, threads (None: the default)
        if meta.bounds is not None and not (getattr(opts, f.name) is None and f.default is None):
            check_int(f.name, getattr(opts, f.name), *meta.bounds)
    check_shape(opts.tokens, opts.seq_len)
    if not (opts.rank in ("auto", "full") or (isinstance(opts.rank, int) and not isinstance(opts.rank, bool))):
        raise ConfigError(f"rank must be 'full', 'auto' or an integer, got {opts.rank!r}", param="rank")
    if isinstance(opts.rank, int) and opts.rank < 1:
        raise ConfigError(f"rank must be at least 1, got {opts.rank}", param="rank")
    if isinstance(opts.rank, int) and opts.rank > opts.tokens - 1:
        raise ConfigError(f"rank {opts.rank} needs at least {opts.rank + 1} tokens; with {opts.tokens} tokens "
                          f"the largest possible rank is {opts.tokens - 1}", param="rank")
    rksp_config(opts, opts.tokens, opts.tokens)  # the spectral core's own checks: eps, the bands in order, tau
    for f, meta in declared:  # eps, band_upper, band_lower, contractive, resdmd_tau, lr (None: the default)
        value = getattr(opts, f.name)
        if meta.positive and value is not None:
            check_positive_float(f.name, value)
        if meta.choices is not None and value is not None and value not in meta.choices:
            raise ConfigError(f"must be one of {', '.join(map(str, meta.choices))}, got {value!r}", param=f.name)
    parse_dtype(opts.dtype)
    check_device(opts.device)
    if opts.name is not None:
        check_hub_id(opts.name, "name")
    check_revision(opts.revision)
    if opts.text is not None and not _is_file(opts.text, "text"):
        raise ConfigError(f"`text` file not found: {opts.text}", param="text")
    if opts.prompts is not None:
        if opts.text is not None or opts.dataset is not None:
            raise ConfigError("`prompts` is a calibration input of its own: not with `text` or `dataset`",
                              param="prompts")
        if opts.prompts != "shipped" and not _is_file(opts.prompts, "prompts"):
            raise ConfigError(f"`prompts` file not found: {opts.prompts} ('shipped': the package's set)",
                              param="prompts")
    if opts.stream and (opts.prompts is not None or opts.snapshots != "hooks"):
        raise ConfigError("`stream` reads one block at a time: it takes neither `prompts` nor `snapshots` "
                          "hidden-states (audit the model whole)", param="stream")
    _check_placement(opts, init)


def _is_file(path: str, param: str) -> bool:
    """Whether ``path`` is a file; a path the file system refuses to look up (a name too long, no permission)
    is a ConfigError naming ``param``, the path shortened to one readable line."""
    try:
        return Path(path).is_file()
    except OSError as e:
        shown = path if len(path) <= 160 else f"{path[:80]}...{path[-80:]} ({len(path)} characters)"
        raise ConfigError(f"`{param}` {shown}: {e.strerror or e}", param=param) from None


def check_inputs(**values: str | None) -> None:
    """The strings given besides the options (``source``, ``config``, ``out_dir``, ``from_audit``, a
    ``push_to`` repo...) hold no Hugging Face token; raises SecretError naming the parameter, never the value.

    A source path or an output folder ends up in the audit's JSON, its card and the messages; so is refused
    like ``name`` or ``repo_id`` (:func:`hf_rksp.utils.checks.check_no_secret`)."""
    tokens = active_tokens()
    for param, value in values.items():
        check_no_secret(None if value is None else str(value), param, tokens)


def check_push_to(repo_id: str | None) -> None:
    """``push_to`` (audit, then push): the repo id a push would take, checked before the audit starts, so a
    bad one fails in a second rather than after the audit (:func:`hf_rksp.utils.checks.check_repo_id`)."""
    if repo_id is not None:
        check_repo_id(repo_id, "push_to")


def _check_placement(opts, init: bool) -> None:
    import torch

    if opts.quantize is not None:
        if opts.quantize not in ("8bit", "4bit"):
            raise ConfigError(f"unknown quantization {opts.quantize!r} (8bit, 4bit)", param="quantize")
        if not torch.cuda.is_available():
            raise ConfigError(f"`quantize` {opts.quantize} uses bitsandbytes, which needs a CUDA GPU; this machine has "
                              "none (audit in float32/bfloat16, with `stream` if the model is large)", param="quantize")
        if opts.stream:
            raise ConfigError(f"`quantize` {opts.quantize} loads the model whole; it cannot be combined with `stream`",
                              param="quantize")
    if opts.max_memory is not None:
        parse_max_memory(opts.max_memory)
        if opts.device_map is None:
            raise ConfigError("`max_memory` goes with `device_map`", param="max_memory")
    if opts.device_map is not None and opts.stream:
        raise ConfigError("`device_map` places a whole model; `stream` loads one block at a time (use one of them)",
                          param="device_map")
    if (opts.device_map is not None or opts.quantize is not None) and init:
        raise ConfigError("`device_map` and `quantize` place pretrained weights; `init` builds on `device` "
                          "(use `stream` for big models at init)", param="device_map")
    if opts.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("`device` mps requested but this machine has no Apple MPS device", param="device")
    if (opts.device.startswith("cuda") or opts.device_map == "cuda") and not torch.cuda.is_available():
        param = "device" if opts.device.startswith("cuda") else "device_map"
        raise ConfigError(f"`{param}` {getattr(opts, param)} requested but CUDA is not available on this machine",
                          param=param)


#: the longest name most file systems take for one file or folder, in bytes
NAME_MAX = 255


def check_output_name(slug: str) -> None:
    """The audit's folder name (``slug``) and every name made from it (the publish's staging folders,
    backups and journal, a streamed audit's ``.partial/<slug>-<key>/``) can be created: at most NAME_MAX
    bytes each in UTF-8, no control character (a newline), no path separator, not hidden (a leading '.'
    is the publish's own working names) nor empty.  Raises OutputError before any work."""
    from hf_rksp.errors import OutputError
    from hf_rksp.publish.local import working_names

    shown = repr(slug) if len(slug) <= 60 else repr(slug[:57] + "...")
    fix = "; choose the name with `name` (a Hub id such as org/model)"
    if not slug or slug in (".", "..") or slug.startswith("."):
        raise OutputError(f"the audit's output name {shown} is empty or starts with '.', which marks hf-rksp's "
                          f"own working files{fix}")
    bad = next((ch for ch in slug if ch in "/\\" or ord(ch) < 32 or ord(ch) == 127), None)
    if bad is not None:
        raise OutputError(f"the audit's output name {shown} holds {bad!r}, which a file name cannot{fix}")
    names = [*working_names(slug), f"{slug}-{'0' * 16}"]  # the last: a streamed audit's progress folder
    longest = max(names, key=lambda n: len(n.encode("utf-8", "surrogateescape")))
    size = len(longest.encode("utf-8", "surrogateescape"))
    if size > NAME_MAX:
        raise OutputError(f"the audit's output name {shown} is {len(slug.encode('utf-8', 'surrogateescape'))} "
                          f"bytes; the names made from it reach {size} bytes, more than the {NAME_MAX} a file "
                          f"name may have (at most {NAME_MAX - size + len(slug.encode('utf-8', 'surrogateescape'))}"
                          f" for the name itself){fix}")
