"""The memory planner: one decision, before anything is loaded, for whole-model and streamed audits.

Sizes come from the model built on the meta device (no memory used): all
parameters, those outside the blocks, and the largest block.  The activations
the audit keeps are added (every block's float32 snapshots for a whole-model
audit; one residual stream and one block's snapshots when streamed).  The
plan streams a model whose weights take more than half the available RAM,
and refuses, with the numbers and what to change, a model that fits neither
way: a single block that is too big is refused up front instead of heading
for the OOM killer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hf_rksp.errors import MemoryPlanError, RKSPError
from hf_rksp.models.blocks import find_blocks

GiB = 2**30
#: whole-model audits stream beyond this share of the available RAM (docs/guides/streaming.md: "more than half")
STREAM_ABOVE = 0.5
#: no plan may need more than this share of the available RAM (the rest is the interpreter, libraries, slack)
USABLE = 0.85


def available_bytes() -> int:
    """Memory this process can still use: the machine's available RAM (page cache counted as free), or less
    under a cgroup memory limit (containers, systemd-run) or an address-space limit (``ulimit -v``)."""
    import resource

    import psutil

    limits = [int(psutil.virtual_memory().available)]
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2, then v1
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            limits.append(int(limit) - usage)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - psutil.Process().memory_info().vms)
    return max(0, min(limits))


@dataclass(frozen=True)
class ModelSizes:
    """Parameter bytes of a model in one dtype, counted on the meta device."""

    whole: int
    outer: int  # embeddings, final norm: what is outside the residual blocks
    block: int  # the largest block
    n_blocks: int
    d_model: int

    @classmethod
    def of(cls, config, dtype: torch.dtype, blocks_path: str | None = None, origin: str = "",
           trust_remote_code: bool = False) -> ModelSizes:
        """Sizes of ``config``'s base model; a config transformers cannot build is an invalid config of ``origin``.

        ``trust_remote_code``: a custom-code model's classes may run (its config came with the same consent).
        """
        from transformers import AutoModel


        try:
            with torch.device("meta"):  # every tensor born on meta: a 270 GB block allocates nothing
                model = AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except RKSPError:
            raise
        except Exception as e:  # the config parses but transformers cannot build it
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RKSPError(f"invalid config{' ' + origin if origin else ''}: {why}") from e
        elem = torch.empty((), dtype=dtype).element_size()
        whole = sum(p.numel() for p in model.parameters()) * elem
        try:
            _, blocks = find_blocks(model, blocks_path)
            block = max((sum(p.numel() for p in b.parameters()) * elem for b in blocks), default=0)
            n_blocks = len(blocks)
        except RKSPError:
            block, n_blocks = whole, 1  # a family found later (--blocks); plan as if it were one block
        d_model = int(getattr(config, "hidden_size", 0) or 0)
        return cls(whole=whole, outer=whole - block * n_blocks, block=block, n_blocks=n_blocks, d_model=d_model)


def activation_bytes(tokens: int, d_model: int, n_blocks: int, streamed: bool, elem: int = 4) -> int:
    """What the audit keeps besides weights: snapshots (float32), the residual stream, the spectral work."""
    per_stream = tokens * d_model
    spectral = 32 * min(tokens, d_model) ** 2  # float64 moments / kernel and their eigenvectors
    if streamed:  # stream entering the block, its outputs, and one block's X and Y in float32
        return per_stream * (2 * elem + 2 * 4) + spectral
    return 2 * n_blocks * per_stream * 4 + spectral


@dataclass(frozen=True)
class MemoryPlan:
    """How the audit will hold the model, and the numbers it was decided on."""

    stream: bool
    need: int  # bytes the chosen way needs at its peak
    available: int
    sizes: ModelSizes


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def plan_memory(sizes: ModelSizes, *, tokens: int, dtype: str, stream: bool, can_stream: bool = True,
                available: int | None = None) -> MemoryPlan:
    """Stream or load whole (``stream``: the user asked to stream), or raise MemoryPlanError with the numbers."""
    avail = available_bytes() if available is None else available
    elem = {"float32": 4, "fp32": 4, "float64": 8}.get(dtype, 2)
    whole_need = sizes.whole + activation_bytes(tokens, sizes.d_model, sizes.n_blocks, False)
    stream_need = sizes.outer + sizes.block + activation_bytes(tokens, sizes.d_model, sizes.n_blocks, True, elem)
    if not stream and sizes.whole < STREAM_ABOVE * avail and whole_need <= USABLE * avail:
        return MemoryPlan(stream=False, need=whole_need, available=avail, sizes=sizes)
    if not can_stream:
        if whole_need <= USABLE * avail:
            return MemoryPlan(stream=False, need=whole_need, available=avail, sizes=sizes)
        raise MemoryPlanError(
            f"the model needs {_gib(sizes.whole)} of weights in {dtype} plus {_gib(whole_need - sizes.whole)} of "
            f"activations for {tokens} tokens, but only {_gib(avail)} of RAM is available and it cannot be "
            "streamed; use `dtype` bfloat16, `device_map` disk or a smaller `tokens`", need=whole_need, available=avail)
    if stream_need <= USABLE * avail:
        return MemoryPlan(stream=True, need=stream_need, available=avail, sizes=sizes)
    acts = stream_need - sizes.outer - sizes.block
    what = (f"one block needs {_gib(sizes.block)} of weights in {dtype}" if sizes.block > acts
            else f"the activations of {tokens} tokens need {_gib(acts)}")
    raise MemoryPlanError(
        f"{what} (streamed peak {_gib(stream_need)}: block {_gib(sizes.block)}, embeddings {_gib(sizes.outer)}, "
        f"activations {_gib(acts)}) but only {_gib(avail)} of RAM is available; use `dtype` bfloat16, "
        "`device_map` disk (pretrained weights, offloaded to disk) or a smaller `tokens`",
        need=stream_need, available=avail)
