"""The audit's options, defined once: what changes its numbers, and how a command line gives and records them.

Every option is a field of :class:`AuditOptions` (or of the :class:`ProfileOptions` it extends) declared with
:func:`hf_rksp.utils.options.option`: its meaning, default, help group, checks and whether the reproducing
command records it.  `hf-rksp audit`'s flags (``hf_rksp.cli.commands``), :func:`command_line`, the range
checks (``hf_rksp.pipeline.validation``), compare's method fields and :func:`options_markdown` (the docs'
option table) are all derived from these fields.  A new option is one field here (plus its test).
"""

from __future__ import annotations

import shlex
from dataclasses import Field, dataclass, fields

from hf_rksp.capture.profile import ProfileOptions
from hf_rksp.utils.checks import MAX_TOKENS
from hf_rksp.utils.options import (
    Option,
    flag,
    format_value,
    help_text,
    option,
    option_fields,
    switch,
)

#: the groups of `hf-rksp audit --help` (and of the docs' table), in order: key -> title
GROUPS = {
    "source": "what to audit",
    "method": "method (RKSP v2; defaults are the paper's)",
    "risk": "risk (a probability only from a model with held-out AUROC >= 0.8 that covers these settings; "
            "otherwise null, with the reason)",
    "calibration": "calibration input (default: the English text embedded in the package)",
    "runtime": "runtime",
}


@dataclass
class AuditOptions(ProfileOptions):
    """Everything that changes the numbers of an audit (recorded in the JSON): the profiling options
    (method, seed, batching, block path) plus what to load and calibrate on."""

    tokens: int = option(2048, group="method", parse=int, bounds=(2, MAX_TOKENS), recorded="always", compared=True,
                         help="calibration tokens N")
    seq_len: int = option(512, group="method", parse=int, bounds=(1, MAX_TOKENS), recorded="always",
                          help="sequence length T; N/T sequences, no padding")
    dtype: str = option("float32", group="runtime", recorded="always", help="forward dtype: float32, bfloat16, float16")
    device: str = option("cpu", group="runtime", recorded="never", help="cpu, cuda, cuda:N or auto")
    text: str | None = option(None, group="calibration", metavar="FILE", help="UTF-8 text file to calibrate on")
    prompts: str | None = option(None, group="calibration", metavar="FILE",
                                 help="one prompt per line, each its own sequence from position 0, padded into a "
                                      "batch (padding kept out of the snapshots): the paper's protocol for "
                                      "pretrained models, with --snapshots hidden-states; 'shipped' for the package's "
                                      "stand-in set (8 prompts x 4, as in the paper's D.3)")
    dataset: str | None = option(None, group="calibration", metavar="NAME_OR_PATH",
                                 help="a `datasets` dataset to calibrate on")
    dataset_config: str | None = option(None, group="calibration", help="dataset configuration name")
    split: str = option("train", group="calibration", help="dataset split")
    column: str = option("text", group="calibration", help="dataset text column")
    trust_remote_code: bool = option(False, group="source",
                                     help="allow custom modeling code from the repo (off by default)")
    revision: str | None = option(None, group="source", help="hub revision (branch, tag or commit)")
    name: str | None = option(None, group="source", metavar="HUB_ID",
                              help="the hub id a local directory or .gguf stands for: names the slug and the "
                                   "card's base_model")
    stream: bool = option(False, group="runtime",
                          help="layer-major: read (or, with --init, create) and run one block at a time "
                               "(peak memory ~ one block + activations); automatic when the model would take "
                               "more than half the available RAM; resumes after an interruption")
    low_disk: bool = option(False, group="runtime", recorded="never",
                            help="streaming a sharded hub checkpoint: delete each shard from the HF cache after "
                                 "the last block that uses it, so the cache holds at most one shard (implies --stream)")
    gguf_file: str | None = option(None, group="source", metavar="NAME",
                                   help="the GGUF file to audit in a hub repo (only that file is downloaded; or "
                                        "name it org/repo/NAME)")
    lr: float | None = option(None, group="risk", metavar="LR", parse=float, positive=True,
                              default_help="the family's typical pretraining value, e.g. gpt2 6e-4, llama 3e-4, "
                                           "bert 1e-4 (hf_rksp.models.families)",
                              help="peak learning rate the probability of divergence is given for")
    device_map: str | None = option(None, group="runtime", choices=("auto", "cpu", "cuda", "disk"),
                                    help="whole-model loading through accelerate's device map (disk: offload what "
                                         "does not fit)")
    max_memory: str | None = option(None, group="runtime", metavar="DEV=SIZE,...",
                                    help="accelerate max_memory for --device-map, e.g. 'cuda:0=20GiB,cpu=30GiB'")
    threads: int | None = option(None, group="runtime", parse=int, bounds=(1, 4096), recorded="never",
                                 default_help="half the usable cores on the command line (ours, "
                                              "hf_rksp.utils.threads.default_threads); torch's own setting "
                                              "in the library",
                                 help="torch intra-op threads for this audit (restored after it); on a loaded "
                                      "machine fewer threads than cores can be much faster")
    overwrite: bool = option(False, group="runtime", recorded="never",
                             help="replace the audit in this audit's output folder even when it is of another "
                                  "source, method or inputs (an audit of the same source, method and inputs "
                                  "is refreshed in place without it)")
    quantize: str | None = option(None, group="runtime", switches={
        "8bit": ("--load-in-8bit", "bitsandbytes 8-bit weights (needs CUDA)"),
        "4bit": ("--load-in-4bit", "bitsandbytes 4-bit NF4 weights (needs CUDA)"),
    }, help="bitsandbytes quantization of the weights, CUDA only")


#: where the options written before this table stand in --help, the docs and the reproducing command (their
#: recorded commands stay the same byte for byte); an option not listed follows them in declaration order
ORDER = ("tokens", "seq_len", "rank", "eps", "band_upper", "band_lower", "contractive", "resdmd_tau", "kreiss",
         "seed", "dtype", "device", "batch_size", "text", "dataset", "split", "column", "dataset_config",
         "revision", "trust_remote_code", "name", "gguf_file", "blocks", "lr", "device_map", "max_memory",
         "quantize", "stream", "low_disk")


def audit_option_fields() -> list[tuple[Field, Option]]:
    """Every option of AuditOptions with its metadata, in the order of --help and the recorded command."""
    found = option_fields(AuditOptions)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(found, key=lambda fo: rank.get(fo[0].name, len(ORDER)))  # stable: unlisted keep their order


#: the options the reproducing command records, in its order: ALWAYS_RECORDED always, the others when they
#: differ from AuditOptions' defaults; NOT_RECORDED do not change the numbers (all three derived from the fields)
COMMAND_OPTIONS = tuple(f.name for f, o in audit_option_fields() if o.recorded != "never")
ALWAYS_RECORDED = tuple(f.name for f, o in audit_option_fields() if o.recorded == "always")
NOT_RECORDED = tuple(f.name for f, o in audit_option_fields() if o.recorded == "never")
#: audits that differ in these have incomparable numbers (``hf_rksp.report.compare`` warns)
COMPARED = tuple(f.name for f, o in option_fields(AuditOptions) if o.compared)


def _field(name: str) -> Field:
    return next(f for f in fields(AuditOptions) if f.name == name)


def option_words(name: str, value) -> list[str]:
    """One option as `hf-rksp audit` words: ``--flag VALUE``, a switch (``--stream``, ``--no-kreiss``) or the
    switch of a value (``--load-in-8bit``)."""
    f = _field(name)
    meta = f.metadata["option"]
    if meta.switches:
        return [meta.switches[value][0]]
    if isinstance(value, bool):
        return [flag(name) if value else "--no-" + flag(name)[2:]]
    return [flag(name), format_value(value)]


def command_line(source: str | None, init: bool, config: str | None, opts: AuditOptions) -> str:
    """The exact `hf-rksp audit` command that reproduces this audit."""
    parts = ["hf-rksp", "audit"]
    if source and not (config and source == config):
        parts.append(source)
    if config:
        parts += ["--config", config]
    elif init:
        parts.append("--init")
    for f, meta in audit_option_fields():
        value = getattr(opts, f.name)
        if meta.recorded == "always" or (meta.recorded == "if_changed" and value != f.default):
            parts += option_words(f.name, value)
    return shlex.join(parts)


def option_flags(f: Field) -> list[tuple[str, str]]:
    """The command-line flags of an option with their help: one, or one per value for ``switches``."""
    meta = f.metadata["option"]
    if meta.switches:
        return list(meta.switches.values())
    return [(switch(f) or flag(f.name), help_text(f))]


def options_markdown() -> str:
    """The options of `hf-rksp audit` as Markdown tables, one per --help group (for the docs' CLI reference)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = []
    for key, title in GROUPS.items():
        rows = [(f, meta) for f, meta in audit_option_fields() if meta.group == key]
        if not rows:
            continue
        out += [f"**{title}**", "", "| Option | Default | Recorded | Meaning |", "|---|---|---|---|"]
        for f, meta in rows:
            default = "" if f.default is None or meta.switches or switch(f) else f"`{format_value(f.default)}`"
            if meta.default_help is not None:
                default = cell(meta.default_help)
            recorded = {"always": "always", "if_changed": "if changed", "never": "no"}[meta.recorded]
            for text, help_ in option_flags(f):
                if not (meta.switches or switch(f)):
                    value = meta.metavar or ("{" + ",".join(meta.choices) + "}" if meta.choices else f.name.upper())
                    text = f"{text} {value}"
                out.append(f"| `{cell(text)}` | {default} | {recorded} | {cell(help_ if meta.switches else meta.help)} |")
        out.append("")
    return "\n".join(out)
