"""The differentiable KSS pieces of Definition 2 (Eqs. 14-15), and eigenvalues safe to differentiate.

``kss_penalty`` is L_l of Eq. 14 on one layer's complex eigenvalues.
``differentiable_eigenvalues`` gives those eigenvalues with a gradient into
the operator only when the eigenvalue derivatives are well conditioned:

    d lam_j = u_j^* dA v_j / (u_j^* v_j),   so  dL/dA = V^-H diag(dL/dlam) V^H

(V the right eigenvectors, V^-1's rows the left ones).  The size of
d lam_j is bounded by c_j = ||u_j|| ||v_j|| / |u_j^* v_j|, the eigenvalue's
condition number; no 1 / (lam_i - lam_j) factor appears (that is in the
*eigenvector* derivatives, which KSS never uses), so clustered eigenvalues,
the near-identity operators of no-norm blocks at init, are fine.  At a
defective (Jordan) eigenvalue c_j is infinite and lam is not differentiable
(it moves like sqrt(perturbation)); when max_j c_j exceeds ``max_condition``
the eigenvalues are returned detached and flagged, so the caller skips the
layer for the step instead of taking a huge or NaN step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Largest eigenvalue condition number whose eigenvalue gradient KSS uses **[ours]** (docs/results/kss.md).
MAX_CONDITION = 1e4


def soft_near_unit_mass(eigenvalues: torch.Tensor, *, T: float = 20.0, tau_u: float = 1.05,
                        tau_l: float = 0.90) -> torch.Tensor:
    """Eq. 15: (1/r) sum_j sigmoid(T(|lam_j| - tau_l)) sigmoid(T(tau_u - |lam_j|))."""
    mod = eigenvalues.abs()
    return (torch.sigmoid(T * (mod - tau_l)) * torch.sigmoid(T * (tau_u - mod))).mean()


def unstable_penalty(eigenvalues: torch.Tensor, *, T: float = 20.0, tau_u: float = 1.05) -> torch.Tensor:
    """Eq. 14's first term: sum_j sigmoid(T(|lam_j| - tau_u)) softplus(|lam_j| - tau_u)^2."""
    excess = eigenvalues.abs() - tau_u
    return (torch.sigmoid(T * excess) * F.softplus(excess) ** 2).sum()


def kss_penalty(eigenvalues: torch.Tensor, *, T: float = 20.0, tau_u: float = 1.05, tau_l: float = 0.90,
                gamma: float = 0.4, beta: float = 1.0) -> torch.Tensor:
    """L_l of Eq. 14 for one layer's complex eigenvalues: unstable penalty + beta (m_soft - gamma)^2."""
    m_soft = soft_near_unit_mass(eigenvalues, T=T, tau_u=tau_u, tau_l=tau_l)
    return unstable_penalty(eigenvalues, T=T, tau_u=tau_u) + beta * (m_soft - gamma) ** 2


class _Eigenvalues(torch.autograd.Function):
    """Eigenvalues of ``matrix`` from a decomposition already computed; backward V^-H diag(g) V^H."""

    @staticmethod
    def forward(ctx, matrix, lam, vec, inv):
        ctx.save_for_backward(vec, inv)
        ctx.real_input = not matrix.is_complex()
        return lam.clone()

    @staticmethod
    def backward(ctx, grad):
        vec, inv = ctx.saved_tensors
        g = inv.mH @ (grad.to(vec.dtype)[:, None] * vec.mH)
        return (g.real if ctx.real_input else g), None, None, None


@dataclass
class Spectrum:
    """One operator's eigenvalues for KSS: differentiable in the operator unless ill-conditioned."""

    eigenvalues: torch.Tensor  # (m,) complex
    condition: float  # max_j ||u_j|| ||v_j|| / |u_j^* v_j| (inf when defective to working precision)
    differentiable: bool  # False: detached, the layer is to be skipped this step


def eigenvalue_condition(vec: torch.Tensor, inv: torch.Tensor) -> float:
    """max_j c_j for unit right eigenvectors (columns of ``vec``) and V^-1 = ``inv``: c_j = ||row_j(V^-1)||."""
    c = torch.linalg.vector_norm(inv, dim=1) * torch.linalg.vector_norm(vec, dim=0)
    worst = float(c.max()) if c.numel() else 1.0
    return worst if math.isfinite(worst) else math.inf


def differentiable_eigenvalues(matrix: torch.Tensor, *, max_condition: float = MAX_CONDITION) -> Spectrum:
    """Eigenvalues of a square matrix, with the gradient above when every c_j <= ``max_condition``."""
    with torch.no_grad():
        a = matrix.detach()
        if not bool(torch.isfinite(a).all()):
            n = a.shape[-1]
            return Spectrum(torch.full((n,), complex(math.nan, math.nan), dtype=torch.complex128), math.inf, False)
        lam, vec = torch.linalg.eig(a)
        vec = vec / torch.linalg.vector_norm(vec, dim=0, keepdim=True)
        try:
            inv = torch.linalg.inv(vec)
            cond = eigenvalue_condition(vec, inv)
        except RuntimeError:  # singular V: defective to working precision
            inv, cond = None, math.inf
    ok = cond <= max_condition and matrix.requires_grad
    if not ok:
        return Spectrum(lam, cond, False)
    return Spectrum(_Eigenvalues.apply(matrix, lam, vec, inv), cond, True)
