"""The DMD operator A = Y~ X~^+ on the range of X~: full, or rank-r randomized (Eq. 6).

Both variants are the same thing on a different orthonormal basis B (k x m)
of a subspace of range(X~), in the V coordinates of ``Whitened``: with the
compressed snapshots Xb = B^T X~, Yb = B^T Y~ (m x N),

    Hb  = Xb Xb^T = B^T Sigma^2 B          (diagonal for both bases below)
    GH  = Yb Xb^T = B^T D_w C D_w B
    GG  = Yb Yb^T = B^T D_w Syy D_w B
    A~  = Yb Xb^+ = GH Hb^-1               (m x m)

- full (B = I, m = k): A~ is the compression of the paper's A onto range(X~),
  and its k eigenvalues are all the nonzero eigenvalues of A (A = Y~ X~^+ is
  zero on the orthogonal complement of range(X~)).
- rank r, sketch "pod": B spans the r principal directions of the raw centered
  snapshots with the largest variance (their top-r POD modes).  Xc's covariance
  is diagonal in V, so projecting X and Y on those directions and whitening
  there (the paper's Eqs. 7-9 on the projected snapshots) is exactly A~
  compressed onto those r coordinates of V: no randomness, and a growing
  high-variance direction stays in the sketch.
- rank r, sketch "random" (Erichson et al. 2019): B spans the seeded randomized range of X~,
  Q = orth(X~ Omega) after ``power_iters`` power iterations with ``oversample``
  extra columns, cut to the top-r left singular vectors of Q^T X~.  X~ Omega
  for a Gaussian Omega (N x (r + p)) has, in V coordinates, the distribution
  of Sigma Omega' with a Gaussian Omega' (k x (r + p)): that is what is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_rksp.errors import ConfigError
from hf_rksp.spectral.whitening import Whitened

#: Erichson et al.'s defaults for the randomized range finder.
OVERSAMPLE = 10
POWER_ITERS = 2


@dataclass
class DMDOperator:
    """A~ on an m-dimensional subspace of range(X~), with the Gram blocks its features need."""

    matrix: torch.Tensor  # A~ (m x m)
    hb: torch.Tensor  # diag of Xb Xb^T (m,)
    gh: torch.Tensor  # Yb Xb^T (m x m)
    gg: torch.Tensor  # Yb Yb^T (m x m)
    full: bool  # B = I: the operator on all of range(X~)

    @property
    def m(self) -> int:
        return int(self.matrix.shape[0])


def _compress(wh: Whitened, basis: torch.Tensor | None, hb: torch.Tensor) -> DMDOperator:
    if wh.xx is None or not wh.xx.requires_grad:  # the audit: Hb is diagonal, A~ = GH Hb^-1 by columns
        dw = wh.w
        gh = dw[:, None] * wh.cross * dw[None, :]
        gg = dw[:, None] * wh.yy * dw[None, :]
        if basis is not None:
            gh = basis.T @ gh @ basis
            gg = basis.T @ gg @ basis
        return DMDOperator(matrix=gh / hb[None, :], hb=hb, gh=gh, gg=gg, full=basis is None)
    # KSS: the same values, with X's Gram and the whitening matrix in the graph (whitening.py, Gradients)
    w = wh.whitening()
    gh, gg, hx = w @ wh.cross @ w, w @ wh.yy @ w, w @ wh.xx @ w
    if basis is not None:
        gh, gg, hx = (basis.T @ m @ basis for m in (gh, gg, hx))
    # A~ = GH Hx^-1 (Hx symmetric, diagonal = hb in value)
    matrix = torch.linalg.solve(hx, gh.mT).mT
    return DMDOperator(matrix=matrix, hb=hb, gh=gh, gg=gg, full=basis is None)


def full_operator(wh: Whitened) -> DMDOperator:
    """The paper's A = Y~ X~^+ on all of range(X~) (k eigenvalues; k = d at full rank)."""
    return _compress(wh, None, wh.sigma.detach() ** 2)


def randomized_operator(wh: Whitened, rank: int, *, generator: torch.Generator | None = None,
                        oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS) -> DMDOperator:
    """Seeded rank-r randomized DMD of the whitened snapshots (m = min(r, k)).

    The basis is computed without gradient (a stop-gradient through the random
    range: a sampling device, not part of the model); the operator is
    differentiable in C, Syy and, through the whitening, in X's Gram.
    """
    if rank < 1 or oversample < 0 or power_iters < 0:
        raise ConfigError(f"rank must be >= 1, oversample and power_iters >= 0; got {rank}, {oversample}, "
                          f"{power_iters}")
    k = wh.k
    if rank >= k:
        return full_operator(wh)
    sigma = wh.sigma.detach()
    cols = min(rank + oversample, k)
    omega = torch.randn(k, cols, generator=generator, dtype=torch.float64).to(sigma)
    q = torch.linalg.qr(sigma[:, None] ** (2 * power_iters + 1) * omega).Q  # orth(X~ (X~^T X~)^q Omega)
    evals, ub = torch.linalg.eigh(q.T @ (sigma[:, None] ** 2 * q))  # (Q^T X~)(Q^T X~)^T = Ub Sb^2 Ub^T
    top = torch.argsort(evals, descending=True)[:rank]
    basis = q @ ub[:, top]
    return _compress(wh, basis, evals[top].clamp_min(torch.finfo(sigma.dtype).tiny))


def pod_operator(wh: Whitened, rank: int) -> DMDOperator:
    """Rank-r DMD on the top-r POD subspace of the raw centered snapshots, whitened there (m = min(r, k)).

    The basis selects the r coordinates of V with the largest singular values of Xc (module docstring);
    it is a function of the detached snapshots, like V itself.
    """
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    k = wh.k
    if rank >= k:
        return full_operator(wh)
    top = torch.argsort(wh.s.detach(), descending=True)[:rank]
    basis = torch.eye(k, dtype=wh.s.dtype, device=wh.s.device)[:, top]
    return _compress(wh, basis, wh.sigma.detach()[top] ** 2)


SKETCHES = ("random", "pod")


def dmd_operator(wh: Whitened, rank: int | None = None, *, generator: torch.Generator | None = None,
                 oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS, sketch: str = "random") -> DMDOperator:
    """Full DMD (``rank=None``) or rank-r DMD of whitened snapshots on a ``sketch`` subspace: the seeded
    randomized range of X~ (``"random"``) or the top-r POD subspace of the raw snapshots (``"pod"``)."""
    if sketch not in SKETCHES:
        raise ConfigError(f"sketch must be one of {', '.join(SKETCHES)}, got {sketch!r}", param="sketch")
    if rank is None:
        return full_operator(wh)
    if sketch == "pod":
        return pod_operator(wh, rank)
    return randomized_operator(wh, rank, generator=generator, oversample=oversample, power_iters=power_iters)
