"""Profiling a model in memory: capture every block's snapshots and run the spectral core on them.

The layer between capture and the spectral core that both the audit pipeline
(loading, calibration, report) and training (KSS auto mode, the monitor
callback) build on; it knows nothing of files, sources or the CLI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from hf_rksp.capture.hooks import capture_snapshots
from hf_rksp.capture.routers import RouterRecorder, find_routers
from hf_rksp.errors import RKSPError
from hf_rksp.models.blocks import find_blocks, stack_labels
from hf_rksp.models.init import group_seed
from hf_rksp.record.records import BlockRecord
from hf_rksp.spectral import FEATURE_NAMES, RKSPConfig, profile_block
from hf_rksp.utils.checks import MAX_BATCH, MAX_SEED
from hf_rksp.utils.options import option, parse_rank

#: --rank auto: full DMD while the operator is at most this wide, else rank AUTO_RANK
#: (docs/method.md, "Choices the paper leaves open (ours)")
FULL_DMD_MAX = 1024
AUTO_RANK = 32


@dataclass
class ProfileOptions:
    """What changes the numbers of a profile of a model already in memory (each field an option of
    `hf-rksp audit`: see :mod:`hf_rksp.utils.options`)."""

    rank: str | int = option(
        "auto", group="method", metavar="full|auto|R", parse=parse_rank, recorded="always", compared=True,
        help="full: all k eigenvalues of the operator on the range of X~ (k = its numerical rank); "
             f"R: seeded rank-R randomized DMD; auto: full while min(N-1, d) <= {FULL_DMD_MAX}, "
             f"rank {AUTO_RANK} beyond (7B widths, where full costs several block forwards on a CPU)")
    eps: float = option(RKSPConfig.eps, group="method", parse=float, positive=True, compared=True,
                        help="whitening regularizer: Sigma = Xc Xc^T/(N-1) + eps I")
    band_upper: float = option(RKSPConfig.band_upper, group="method", parse=float, positive=True, compared=True,
                               help="expansive above, near-unit up to this |lambda| (1 + eps_u)")
    band_lower: float = option(RKSPConfig.band_lower, group="method", parse=float, positive=True, compared=True,
                               help="near-unit from this |lambda| (1 - eps_n)")
    contractive: float = option(RKSPConfig.contractive, group="method", parse=float, positive=True, compared=True,
                                help="contractive below this |lambda| (1 - delta_c)")
    resdmd_tau: float = option(RKSPConfig.resdmd_tau, group="method", parse=float, positive=True, compared=True,
                               help="ResDMD residual threshold: modes with r_j <= tau are kept")
    sketch: str = option("random", group="method", choices=("random", "pod"), compared=True,
                         help="the subspace of rank-R DMD (no effect at full rank): random, the seeded randomized "
                              "range of the whitened snapshots; pod, their top-R principal directions before "
                              "whitening (docs/method.md)")
    snapshots: str = option("hooks", group="method", choices=("hooks", "hidden-states"), compared=True,
                            help="hooks: each residual block's own input and output; hidden-states: the model's "
                                 "output_hidden_states pairs (embeddings -> h1 ... -> h_L, the last after the "
                                 "final norm: the paper's protocol for pretrained models)")
    kreiss: bool = option(True, group="method", help="skip the Kreiss constant (the costliest feature)")
    seed: int = option(0, group="method", parse=int, bounds=(0, MAX_SEED), recorded="always",  # block i: group_seed
                       help="seed for random init, random token ids and the range finder")
    batch_size: int = option(1, group="runtime", parse=int, bounds=(1, MAX_BATCH), recorded="never",
                             help="sequences per forward batch")
    blocks: str | None = option(None, group="source", metavar="PATH",
                                help="attribute path of the residual block list for an unknown family "
                                     "(e.g. model.layers)")


def resolve_rank(rank: str | int, n_tokens: int, d_model: int) -> int | None:
    """The DMD rank an audit uses: None for full DMD, or r.

    ``"auto"`` **[ours]**: full DMD while the operator (min(N - 1, d) wide) is
    at most FULL_DMD_MAX wide, rank AUTO_RANK (the paper's own default
    recipe) beyond, where the full eigen-decomposition and Kreiss search
    would cost several block forwards on a CPU (LLaMA-7B: k = 2047).
    """
    if rank == "full":
        return None
    if rank == "auto":
        return None if min(n_tokens - 1, d_model) <= FULL_DMD_MAX else AUTO_RANK
    return int(rank)


def rksp_config(opts: ProfileOptions, n_tokens: int, d_model: int) -> RKSPConfig:
    """The spectral core's parameters for this audit (raises ConfigError on a bad value)."""
    return RKSPConfig(eps=opts.eps, rank=resolve_rank(opts.rank, n_tokens, d_model), band_upper=opts.band_upper,
                      band_lower=opts.band_lower, contractive=opts.contractive, resdmd_tau=opts.resdmd_tau,
                      kreiss=opts.kreiss, sketch=opts.sketch)


def block_result(i: int, x: torch.Tensor, y: torch.Tensor, opts: ProfileOptions) -> BlockRecord:
    """RKSP v2 features of block ``i`` from its snapshots, as its record (None for inf/undefined values).

    Rank-r randomized DMD of block i draws from its own seed, so a block's
    numbers do not depend on which blocks ran before it (streaming resumes).
    """
    g = torch.Generator().manual_seed(group_seed(opts.seed, i))
    f = profile_block(x, y, rksp_config(opts, x.shape[0], x.shape[1]), generator=g)
    ev = f.eigenvalues
    return BlockRecord(index=i, values={name: f.value(name) for name in FEATURE_NAMES}, m=f.m, rank=f.rank,
                       flags=f.flags, eigenvalues=torch.stack([ev.real, ev.imag], dim=1).tolist())


def profile_blocks(x_list, y_list, opts: ProfileOptions, progress: bool = True) -> list[BlockRecord]:
    """RKSP v2 features of every block, as their records."""
    out = []
    bar = tqdm(range(len(x_list)), desc="spectra", unit="block", disable=not progress)
    for i in bar:
        out.append(block_result(i, x_list[i], y_list[i], opts))
        bar.set_postfix(near_unit=f"{out[-1].near_unit_mass:.3f}", rho=f"{out[-1].spectral_radius:.3f}")
    return out


def profile_model(
    model, input_ids: torch.Tensor, opts: ProfileOptions, *, device: str = "cpu", progress: bool = True,
    input_name: str = "input_ids", attention_mask: torch.Tensor | None = None,
) -> tuple[list[BlockRecord], str, dict]:
    """Capture every block's snapshots on ``input_ids`` and return their RKSP features.

    ``attention_mask`` (B x T, padded prompts): its zero positions are kept out of the snapshots.

    Returns (per-block records, with MoE routing and encoder-decoder stacks where the model has them,
    block path, timings); no files, no loading.
    """
    path, blocks = find_blocks(model, opts.blocks)
    routers = RouterRecorder(find_routers(blocks))
    t0 = time.perf_counter()
    try:
        with routers.recording():
            snaps = capture_snapshots(model, blocks, input_ids, batch_size=opts.batch_size, device=device,
                                      progress=progress, input_name=input_name, attention_mask=attention_mask,
                                      source=opts.snapshots)
    except (torch.OutOfMemoryError, MemoryError):
        raise RKSPError("out of memory in the forward pass; lower `tokens` or `batch_size`") from None
    t1 = time.perf_counter()
    results = profile_blocks(snaps.inputs, snaps.outputs, opts, progress)
    del snaps
    for i, stats in routers.summary().items():
        results[i] = replace(results[i], router=stats)
    for k, (stack, j) in enumerate(stack_labels(path, model) or []):
        if k < len(results):
            results[k] = replace(results[k], stack=stack, stack_index=j)
    return results, path, {"forward_s": t1 - t0, "spectral_s": time.perf_counter() - t1}
