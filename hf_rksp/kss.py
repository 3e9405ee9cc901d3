"""Koopman Spectral Shaping (KSS): a differentiable penalty on residual-block spectra.

For each selected block, on a random subsample of n token positions of the
current training batch (the same positions for every block):

    K = whitened DMD operator of (X, Y)           (hf_rksp.spectral: whiten + dmd_operator,
                                                    the audit's own functions; r x r)

The whitening (V, s, w of hf_rksp.spectral.whiten) and the random basis are
computed without gradient: a stop-gradient through them.  Gradients flow
through the projected moments C = (Yc V)^T (Xc V) into the block's weights.

**Soft eigenvalue count** inside the circle of radius rho, with M nodes
z_k = rho * exp(2 pi i (k + theta) / M), k = 0..M-1 (trapezoidal rule of the
argument-principle integral):

    c_rho(K) = Re (1/M) sum_k tr( z_k (z_k I - K)^-1 )
             = Re sum_i 1 / (1 - e^{-2 pi i theta} (lambda_i / rho)^M)        (exact identity)

Each eigenvalue contributes ~1 if |lambda| < rho and ~0 if |lambda| > rho; the
error of one term is at most q / (1 - q) with q = exp(-M |ln(|lambda| / rho)|)
(so the transition has width ~ rho / M).  With target radius R and band delta:

    near    = (c_{R+delta}(K) - c_{R-delta}(K)) / r      soft near-unit mass
    outside = (r - c_{R+delta}(K)) / r                    soft outside mass
    rho_p   = (||K^p||_F^2 / r)^(1 / 2p)                  smooth spectral radius (Gelfand; p = 8)

    L_block = w_near * near + w_out * outside + w_rad * max(0, rho_p - (R + delta))^2
    L_KSS   = mean over selected blocks of L_block

**Why the gradient is stable.** No eigen-decomposition is differentiated:
eigenvector derivatives carry 1 / (lambda_i - lambda_j) and blow up at
(near-)degenerate eigenvalues, which is where residual blocks at init live (all
near 1).  c_rho is the trace of an analytic matrix function f(K), and
d tr f(K) = tr(f'(K) dK): its gradient is f'(K)^T, which has no
1 / (lambda_i - lambda_j) factor; the only singularities of f are the M poles
(z_k themselves).  To keep eigenvalues away from them, the node rotation theta
is chosen each step from the eigenvalues of the *detached* K (computed with
torch.linalg.eigvals, never differentiated): of 8M candidate rotations, the one
that maximizes d_min = min_i |1 - e^{-2 pi i theta} (lambda_i / rho)^M|.  Each
eigenvalue's term is then bounded by 1 / d_min and its derivative by
M / (|lambda| d_min^2); with m eigenvalues near the circle the best rotation
gives d_min >~ pi / m whatever M.  If d_min still falls below
``min_denominator`` (many eigenvalues crowding the circle) that count is
detached for the step (reported as skipped) instead of producing a huge
gradient.  Each term is a linear solve with (z_k I - K), whose condition number
is ~ ||K|| / dist(z_k, spectrum) and does not grow with the far-outside
eigenvalues (a power form tr (I - (K/rho)^M)^-1 would, as rho_max^M).  rho_p
is computed as s * (||(K/s)^p||_F^2 / r)^(1/2p) with s = ||K||_F / sqrt(r)
(detached) so it cannot overflow.  The algebra runs in float64 (complex128)
by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .capture import _hidden_in, _hidden_out
from .spectral import dmd_operator, mass_partition, whiten

__all__ = [
    "choose_rotation",
    "soft_count",
    "soft_spectral_radius",
    "block_kss_loss",
    "BlockKSS",
    "SnapshotSampler",
]


def choose_rotation(
    eigenvalues: torch.Tensor, radius: float, nodes: int, candidates: int | None = None
) -> tuple[float, float]:
    """Node rotation theta in [0, 1) keeping the poles of the soft count farthest from ``eigenvalues``.

    Returns (theta, d_min) with d_min = min_i |1 - e^{-2 pi i theta} (lambda_i / radius)^M|.
    """
    ev = eigenvalues.detach().to(torch.complex128).cpu()
    j = candidates or 8 * nodes
    thetas = (torch.arange(j, dtype=torch.float64) + 0.5) / j
    mod = ev.abs().clamp_min(1e-300)
    u = nodes * torch.log(mod / radius)  # log |w_i|
    keep = u.abs() < 30.0  # farther eigenvalues have |1 - w| >= 1 - e^-30
    if not bool(keep.any()):
        return float(thetas[0]), 1.0
    u, phi = u[keep], nodes * torch.angle(ev[keep])
    ang = phi[None, :] - 2 * math.pi * thetas[:, None]
    w = torch.exp(u)[None, :]
    d = torch.sqrt((1 - w * torch.cos(ang)) ** 2 + (w * torch.sin(ang)) ** 2)  # |1 - w e^{i ang}|
    dmin = d.min(dim=1).values
    best = int(dmin.argmax())
    d_best = float(dmin[best])
    if not bool(keep.all()):
        d_best = min(d_best, 1.0 - math.exp(-30.0))
    return float(thetas[best]), d_best


def soft_count(k: torch.Tensor, radii, nodes: int, thetas) -> torch.Tensor:
    """Soft number of eigenvalues of ``k`` inside each circle: Re (1/M) sum_k tr(z_k (z_k I - K)^-1).

    ``radii`` and ``thetas`` are sequences of the same length; returns a real
    tensor of that length, differentiable in ``k`` (linear solves only).
    """
    r = k.shape[-1]
    cdt = torch.complex128 if k.dtype == torch.float64 else torch.complex64
    rad = torch.as_tensor(list(radii), dtype=torch.float64)
    th = torch.as_tensor(list(thetas), dtype=torch.float64)
    ang = 2 * math.pi * (torch.arange(nodes, dtype=torch.float64)[None, :] + th[:, None]) / nodes  # (R, M)
    z = torch.polar(rad[:, None].expand_as(ang), ang).to(device=k.device, dtype=cdt)  # (R, M)
    eye = torch.eye(r, dtype=cdt, device=k.device)
    a = z[..., None, None] * eye - k.to(cdt)  # (R, M, r, r)
    tr = torch.linalg.inv(a).diagonal(dim1=-2, dim2=-1).sum(-1)  # tr (zI - K)^-1
    return (z * tr).mean(dim=-1).real


def soft_spectral_radius(k: torch.Tensor, power: int = 8) -> torch.Tensor:
    """rho_p = (||K^p||_F^2 / r)^(1/2p), computed with a detached scale so it cannot overflow."""
    r = k.shape[-1]
    s = (k.detach().norm() / math.sqrt(r)).clamp_min(1e-30)
    kp = torch.linalg.matrix_power(k / s, power)
    return s * ((kp * kp).sum() / r).clamp_min(1e-300) ** (1.0 / (2 * power))


@dataclass
class BlockKSS:
    """KSS loss of one block and what it measured (hard features from the detached K)."""

    loss: torch.Tensor
    soft_near: float
    soft_outside: float
    soft_radius: float
    near_unit_mass: float
    spectral_radius: float
    outside_mass: float
    rank: int
    d_min: float
    skipped: int = 0
    extra: dict = field(default_factory=dict)


def block_kss_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rank: int = 64,
    delta: float = 0.05,
    target_radius: float = 1.0,
    nodes: int = 32,
    near_weight: float = 1.0,
    outside_weight: float = 1.0,
    radius_weight: float = 1.0,
    radius_power: int = 8,
    dtype: torch.dtype = torch.float64,
    min_denominator: float = 1e-3,
) -> BlockKSS:
    """The KSS loss of one block from snapshots ``x``, ``y`` (n x d, with grad); see the module docstring."""
    wh = whiten(x, y, dtype=dtype)
    k = dmd_operator(wh, rank if rank < wh.k else None).matrix
    r = k.shape[0]
    with torch.no_grad():
        eig = torch.linalg.eigvals(k.detach())
    parts = mass_partition(eig)
    hard = {"near_unit_mass": parts["near_unit_mass"], "outside_mass": parts["expansive_mass"],
            "spectral_radius": float(eig.abs().max())}
    radii = (target_radius - delta, target_radius + delta)
    thetas, dmins = [], []
    for rho in radii:
        th, dm = choose_rotation(eig, rho, nodes)
        thetas.append(th)
        dmins.append(dm)
    counts = soft_count(k, radii, nodes, thetas)
    skipped = 0
    parts = []
    for i, dm in enumerate(dmins):
        if dm < min_denominator:
            parts.append(counts[i].detach())
            skipped += 1
        else:
            parts.append(counts[i])
    c_in, c_out = parts
    near = (c_out - c_in) / r
    outside = (r - c_out) / r
    rho_p = soft_spectral_radius(k, radius_power)
    hinge = torch.relu(rho_p - (target_radius + delta)) ** 2
    loss = near_weight * near + outside_weight * outside + radius_weight * hinge
    return BlockKSS(
        loss=loss,
        soft_near=float(near.detach()),
        soft_outside=float(outside.detach()),
        soft_radius=float(rho_p.detach()),
        near_unit_mass=hard["near_unit_mass"],
        spectral_radius=hard["spectral_radius"],
        outside_mass=hard["outside_mass"],
        rank=r,
        d_min=min(dmins),
        skipped=skipped,
    )


class SnapshotSampler:
    """Forward hooks that keep, with grad, a token subsample of each block's input and output.

    The same ``n`` random non-padding positions are taken in every block.  Use
    as a context manager around the training forward pass; hooks are removed
    on exit.
    """

    def __init__(
        self,
        blocks: list[nn.Module],
        n: int,
        generator: torch.Generator,
        valid: torch.Tensor | None = None,
    ):
        self.blocks = blocks
        self.n = n
        self.generator = generator
        self.valid = valid  # flattened bool mask of non-padding positions, or None
        self.inputs: list[torch.Tensor | None] = [None] * len(blocks)
        self.outputs: list[torch.Tensor | None] = [None] * len(blocks)
        self._idx: torch.Tensor | None = None
        self._handles = []

    def _index(self, n_positions: int, device) -> torch.Tensor:
        if self._idx is None:
            if self.valid is not None and self.valid.numel() == n_positions:
                pos = torch.nonzero(self.valid.reshape(-1).cpu(), as_tuple=False).squeeze(1)
            else:
                pos = torch.arange(n_positions)
            perm = torch.randperm(pos.numel(), generator=self.generator)[: self.n]
            self._idx = pos[perm].sort().values
        return self._idx.to(device)

    def _take(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        return flat.index_select(0, self._index(flat.shape[0], flat.device))

    def __enter__(self) -> "SnapshotSampler":
        for i, block in enumerate(self.blocks):

            def pre(_m, args, kwargs, i=i):
                self.inputs[i] = self._take(_hidden_in(args, kwargs))

            def post(_m, args, kwargs, out, i=i):
                self.outputs[i] = self._take(_hidden_out(out))

            self._handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(block.register_forward_hook(post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if any(t is None for t in self.inputs + self.outputs):
            raise RuntimeError("KSS hooks did not see every selected block in the forward pass")
        return list(zip(self.inputs, self.outputs))
