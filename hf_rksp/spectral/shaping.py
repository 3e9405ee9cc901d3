"""The differentiable KSS terms of Definition 2 (Eqs. 14-15), on one layer's eigenvalues."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
