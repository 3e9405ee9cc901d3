"""The audit's options: what changes its numbers, and how a command line records them."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from hf_rksp.capture.profile import ProfileOptions


@dataclass
class AuditOptions(ProfileOptions):
    """Everything that changes the numbers of an audit (recorded in the JSON): the profiling options
    (method, seed, batching, block path) plus what to load and calibrate on."""

    tokens: int = 2048
    seq_len: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    text: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    column: str = "text"
    trust_remote_code: bool = False
    revision: str | None = None
    name: str | None = None  # hub id a local copy stands for: names the slug and card
    stream: bool = False  # layer-major: one block's weights in memory at a time
    low_disk: bool = False  # streamed hub checkpoint: one shard in the HF cache at a time (implies stream)
    gguf_file: str | None = None  # the GGUF file of a hub repo (or directory) to audit
    lr: float | None = None  # learning rate the risk is assessed at (None: the family's default)
    device_map: str | None = None  # accelerate device map for whole-model loading: auto | cpu | cuda | disk
    max_memory: str | None = None  # "cuda:0=20GiB,cpu=30GiB"
    quantize: str | None = None  # "8bit" | "4bit" (bitsandbytes, CUDA only)


#: the options the reproducing command records, in its order: ALWAYS_RECORDED always, the others when they
#: differ from AuditOptions' defaults; NOT_RECORDED do not change the numbers
COMMAND_OPTIONS = ("tokens", "seq_len", "rank", "eps", "band_upper", "band_lower", "contractive", "resdmd_tau",
                   "kreiss", "seed", "dtype", "text", "dataset", "split", "column", "dataset_config", "revision",
                   "trust_remote_code", "name", "gguf_file", "blocks", "lr", "device_map", "max_memory", "quantize",
                   "stream")


ALWAYS_RECORDED = ("tokens", "seq_len", "rank", "seed", "dtype")


NOT_RECORDED = ("device", "batch_size", "low_disk")


def option_words(name: str, value) -> list[str]:
    """One option as `hf-rksp audit` words: ``--flag VALUE``, a switch, ``--no-kreiss`` or ``--load-in-8bit``."""
    if name == "quantize":
        return [f"--load-in-{value}"]
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + flag[2:]]
    return [flag, f"{value:g}" if isinstance(value, float) else str(value)]


def command_line(source: str | None, init: bool, config: str | None, opts: AuditOptions) -> str:
    """The exact `hf-rksp audit` command that reproduces this audit."""
    parts = ["hf-rksp", "audit"]
    if source and not (config and source == config):
        parts.append(source)
    if config:
        parts += ["--config", config]
    elif init:
        parts.append("--init")
    defaults = AuditOptions()
    for name in COMMAND_OPTIONS:
        value = getattr(opts, name)
        if name in ALWAYS_RECORDED or value != getattr(defaults, name):
            parts += option_words(name, value)
    return shlex.join(parts)

