"""The one spectral core of hf-rksp: whitening, the DMD operator, eigenvalues, features.

RKSP v1 (see README, "What RKSP measures") for one residual block with input
snapshots X (N x d) and output snapshots Y (N x d):

    Xc = X - mean(X),  Yc = Y - mean(Y)
    Xc ~= U_r S_r V_r^T            (top-r right singular subspace of Xc)
    Zx = Xc V_r S_r^-1 (= U_r),    Zy = Yc V_r S_r^-1
    K  = Zx^+ Zy = Zx^T Zy         (r x r; Zx has orthonormal columns)

Both users call these functions: the audit (no grad, float64 for the small
r x r algebra) and KSS (with grad).  Every whitening method returns a basis V
with orthonormal columns and the singular values of Xc in that basis, so Zx
has orthonormal columns (to rounding) and K = Zx^T Zy is the least-squares
operator on the subspace; the methods differ only in how they find it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import RKSPError

#: Relative singular-value cut-off of RKSP v1 (s_i > REL_TOL * s_1 are kept).
REL_TOL = 1e-6

__all__ = [
    "REL_TOL",
    "Whitening",
    "BlockSpectrum",
    "whiten",
    "dmd_operator",
    "whitened_operator",
    "spectral_features",
    "block_spectrum",
    "max_rank",
    "resolve_method",
]


@dataclass
class Whitening:
    """A whitening transform z = (x - mean) @ basis / scale."""

    mean: torch.Tensor  # (d,)
    basis: torch.Tensor  # (d, r), orthonormal columns
    scale: torch.Tensor  # (r,), singular values of Xc in that basis, descending
    method: str

    @property
    def rank(self) -> int:
        return int(self.scale.shape[0])

    def apply(self, x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        m = self.mean if mean is None else mean
        return ((x.to(self.basis.dtype) - m) @ self.basis) / self.scale


@dataclass
class BlockSpectrum:
    """RKSP v1 features of one block."""

    eigenvalues: torch.Tensor  # (r,) complex
    near_unit_mass: float
    spectral_radius: float
    outside_mass: float
    fit_r2: float
    rank_used: int


def max_rank(n_tokens: int, d: int) -> int:
    """Largest rank the data allow: centering removes one degree of freedom."""
    return max(0, min(n_tokens - 1, d))


def _row_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(n, start + chunk))


def _truncate(s: torch.Tensor, rank: int, rel_tol: float) -> int:
    if s.numel() == 0 or not bool(s[0] > 0):
        return 0
    keep = int((s > rel_tol * s[0]).sum())
    return min(rank, keep)


def _randomized_basis(
    xc: torch.Tensor,
    k: int,
    niter: int,
    generator: torch.Generator | None,
    chunk: int,
) -> torch.Tensor:
    """Orthonormal (d x k) basis of the dominant right singular subspace of xc.

    Chunked over rows so that only (d x k) and (chunk x d) blocks are live
    beside xc itself; power iterations sharpen the subspace when the
    spectrum decays slowly (Halko, Martinsson & Tropp 2011, alg. 4.4).
    """
    n, d = xc.shape
    omega = torch.randn(d, k, generator=generator, dtype=xc.dtype, device="cpu").to(xc.device)

    def gram_times(q: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(d, q.shape[1], dtype=xc.dtype, device=xc.device)
        for sl in _row_chunks(n, chunk):
            part = xc[sl]
            out += part.T @ (part @ q)
        return out

    q, _ = torch.linalg.qr(gram_times(omega))
    for _ in range(niter):
        q, _ = torch.linalg.qr(gram_times(q))
    return q


def resolve_method(method: str, d: int) -> str:
    """The whitening method ``"auto"`` stands for.

    Always the exact Gram path: when r < d cuts through a slowly decaying
    singular spectrum (SmolLM2: r = 256 of d = 576), the top-r subspace has a
    small gap and the randomized range finder misses it (near-unit mass off
    by up to 0.02 even with 16 power iterations), so it is opt-in only.
    """
    return "gram" if method == "auto" else method


def whiten(
    x: torch.Tensor,
    rank: int = 256,
    *,
    rel_tol: float = REL_TOL,
    method: str = "auto",
    dtype: torch.dtype | None = torch.float64,
    oversample: int = 16,
    niter: int = 2,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
) -> Whitening:
    """Whitening of snapshots ``x`` (N x d) onto their top-``rank`` principal subspace.

    ``method`` says how the subspace is found:

    - ``"exact"``: thin SVD of the centered snapshots (the reference).
    - ``"gram"``: eigen-decomposition of the Gram matrix Xc^T Xc (d x d, the
      moments DESIGN.md streams) or, when N < d, of the row Gram Xc Xc^T
      (N x N); about 2x faster than the SVD at d ~ 600.  Squaring costs
      accuracy only for components near the 1e-6 cut-off (relative error
      ~ eps * (s_1/s_i)^2, 1e-4 at worst in float64).
    - ``"randomized"``: chunked randomized range finder, then a Rayleigh-Ritz
      SVD inside the found subspace (exact singular values and an exactly
      orthonormal Zx; only the subspace is approximate, see resolve_method).
    - ``"auto"``: gram.

    ``dtype`` is the compute dtype (None keeps the input's, as KSS does under
    autograd).
    """
    if x.ndim != 2:
        raise ValueError(f"snapshots must be 2-D (N x d), got shape {tuple(x.shape)}")
    if dtype is not None:
        x = x.to(dtype)
    n, d = x.shape
    possible = max_rank(n, d)
    if possible < 1:
        raise RKSPError(f"need at least 2 tokens to whiten, got {n}")
    rank = min(rank, possible)
    mean = x.mean(dim=0)
    xc = x - mean
    method = resolve_method(method, d)
    if method == "exact":
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        v = vh.T
    elif method == "gram" and n < d:
        # Fewer tokens than dimensions (KSS's per-step subsample): the (N x N) row
        # Gram Xc Xc^T = U S^2 U^T is the smaller problem, and V = Xc^T U S^-1.
        evals, evecs = torch.linalg.eigh(xc @ xc.T)  # ascending
        s = evals.flip(-1)[:possible].clamp_min(0).sqrt()
        r = _truncate(s, rank, rel_tol)
        if r < 1:
            raise RKSPError("snapshots are constant: the residual stream has no variance to whiten")
        s = s[:r]
        v = (xc.T @ evecs.flip(-1)[:, :r]) / s
    elif method == "gram":
        gram = torch.zeros(d, d, dtype=xc.dtype, device=xc.device)
        for sl in _row_chunks(n, chunk):
            gram += xc[sl].T @ xc[sl]
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        s = evals.flip(-1)[:possible].clamp_min(0).sqrt()
        v = evecs.flip(-1)[:, :possible]
    elif method == "randomized":
        q = _randomized_basis(xc, min(rank + oversample, possible), niter, generator, chunk)
        b = xc @ q  # Rayleigh-Ritz: the data projected exactly onto the found subspace
        _, s, wh = torch.linalg.svd(b, full_matrices=False)
        v = q @ wh.T
    else:
        raise ValueError(f"unknown whitening method {method!r} (exact, gram, randomized, auto)")
    r = _truncate(s, rank, rel_tol)
    if r < 1:
        raise RKSPError("snapshots are constant: the residual stream has no variance to whiten")
    return Whitening(mean=mean, basis=v[:, :r], scale=s[:r], method=method)


def dmd_operator(zx: torch.Tensor, zy: torch.Tensor) -> torch.Tensor:
    """K = Zx^+ Zy for whitened Zx with orthonormal columns, i.e. Zx^T Zy."""
    return zx.T @ zy


def whitened_operator(
    x: torch.Tensor,
    y: torch.Tensor,
    rank: int = 256,
    *,
    method: str = "auto",
    rel_tol: float = REL_TOL,
    dtype: torch.dtype | None = torch.float64,
    niter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Whitening]:
    """Steps 2-4 of RKSP v1: (K, Zx, Zy, whitening) from snapshots ``x``, ``y`` (N x d).

    Differentiable in ``x`` and ``y`` (KSS): the whitening (mean of X, basis,
    scale) is computed on ``x.detach()``, i.e. a stop-gradient through the
    basis, and gradients flow through Zx = (X - mean) V S^-1 and
    Zy = (Y - mean(Y)) V S^-1 into whatever produced the snapshots.  Under
    no_grad (the audit) this is exactly the v1 operator.
    """
    if x.shape != y.shape:
        raise ValueError(f"X and Y shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    w = whiten(x.detach(), rank, rel_tol=rel_tol, method=method, dtype=dtype, niter=niter, generator=generator)
    zx = w.apply(x)
    yy = y.to(w.basis.dtype)
    zy = w.apply(yy, mean=yy.mean(dim=0))
    return dmd_operator(zx, zy), zx, zy, w


def spectral_features(eigenvalues: torch.Tensor, delta: float = 0.05) -> dict[str, float]:
    """Near-unit mass, spectral radius and outside mass of a spectrum."""
    mod = eigenvalues.abs().double()
    if mod.numel() == 0:
        raise ValueError("empty spectrum")
    return {
        "near_unit_mass": float(((mod - 1.0).abs() <= delta).double().mean()),
        "spectral_radius": float(mod.max()),
        "outside_mass": float((mod > 1.0 + delta).double().mean()),
    }


def block_spectrum(
    x: torch.Tensor,
    y: torch.Tensor,
    rank: int = 256,
    delta: float = 0.05,
    *,
    method: str = "auto",
    rel_tol: float = REL_TOL,
    niter: int = 2,
    generator: torch.Generator | None = None,
) -> BlockSpectrum:
    """RKSP v1 spectrum and features of one block from its input/output snapshots."""
    k, zx, zy, w = whitened_operator(x, y, rank, method=method, rel_tol=rel_tol, niter=niter, generator=generator)
    eig = torch.linalg.eigvals(k)
    zy_sq = float((zy * zy).sum())
    resid = float(((zy - zx @ k) ** 2).sum())
    r2 = 1.0 - resid / zy_sq if zy_sq > 0 else math.nan
    feats = spectral_features(eig, delta)
    return BlockSpectrum(eigenvalues=eig, fit_r2=r2, rank_used=w.rank, **feats)
