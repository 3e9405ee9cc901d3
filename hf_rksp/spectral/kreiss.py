"""The Kreiss constant (Eq. 29) of a DMD operator, from its eigen-decomposition.

    K(A) = sup_{|z| > 1} (|z| - 1) ||(zI - A)^-1||_2

K is finite only when A is power-bounded; for rho(A) > 1 it is infinite, and
rho already says so.  **[ours]** We report K(A / max(rho, 1)): Eq. 29 itself
when rho <= 1, and otherwise the transient growth on top of the growth rate
rho, which is what non-normality adds (K = 1 for every normal operator).

How it is computed.  With A = V Lambda V^-1, (zI - A)^-1 = V (zI - Lambda)^-1 V^-1,
so ||(zI - A)^-1||_2 is the largest singular value of V D_z V^-1, found by
power iteration on (V D_z V^-1)^* (V D_z V^-1): four (m x m) by (m x b)
products an iteration for a batch of b points z at once, no factorization.
The supremum is searched on rays through the eigenvalues of largest modulus
and on a uniform set of angles, at radii 1 + t with t log-spaced in
[1e-4, 10], then refined around the best point by three rounds of a local
5 x 5 grid in (log t, angle), each 4x finer.  Each value is a lower bound of the resolvent norm at
that z (power iteration converges from below), so the result is a lower
bound of K; tests check it within 1e-3 relative of a brute-force dense-grid
SVD on small matrices and of the closed form for a 2 x 2 Jordan block.
"""

from __future__ import annotations

import math

import torch

RAYS = 8  # rays through the eigenvalues of largest modulus
ANGLES = 16  # plus uniformly spaced angles
RADII = torch.logspace(-4, 1, 8, dtype=torch.float64)  # t in z = (1 + t) e^{i theta}
REFINE = 3  # rounds of a local 5 x 5 grid around the best point, each 4x finer
POWER_STEPS = 40
POWER_TOL = 1e-4


def _resolvent_norms(v: torch.Tensor, vinv: torch.Tensor, lam: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """||(z_j I - A)^-1||_2 for each z_j, A = V diag(lam) V^-1 (power iteration, a lower bound).

    Points whose estimate has settled to POWER_TOL leave the batch.
    """
    d = 1.0 / (z[None, :] - lam[:, None])  # (m, b)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(v.shape[0], z.numel(), dtype=torch.float64, generator=g).to(v.dtype)
    x = x / x.norm(dim=0)
    est = torch.zeros(z.numel(), dtype=torch.float64)
    live = torch.arange(z.numel())
    vh, vinvh = v.mH, vinv.mH
    for _ in range(POWER_STEPS):
        dl = d[:, live]
        y = v @ (dl * (vinv @ x))  # R x
        new = y.norm(dim=0)
        moving = (new - est[live]) > POWER_TOL * new
        est[live] = torch.maximum(est[live], new)
        if not bool(moving.any()):
            break
        live, y, dl = live[moving], y[:, moving], dl[:, moving]
        x = vinvh @ (dl.conj() * (vh @ y))  # R^* R x
        x = x / x.norm(dim=0).clamp_min(1e-300)
    return est


def kreiss_constant(eigenvalues: torch.Tensor, vectors: torch.Tensor, inverse: torch.Tensor) -> float:
    """K(A / max(rho, 1)) from A's eigenvalues, right eigenvectors and their inverse (see module doc)."""
    lam = eigenvalues.to(torch.complex128)
    v, vinv = vectors.to(torch.complex128), inverse.to(torch.complex128)
    if not (torch.isfinite(torch.view_as_real(v)).all() and torch.isfinite(torch.view_as_real(vinv)).all()):
        return math.inf
    lam = lam / max(float(lam.abs().max()), 1.0)
    top = lam[torch.argsort(lam.abs(), descending=True)[:RAYS]]
    angles = torch.cat([torch.angle(top), torch.linspace(-math.pi, math.pi, ANGLES + 1, dtype=torch.float64)[:-1]])
    lt, th = torch.meshgrid(RADII.log(), angles, indexing="ij")
    lt, th = lt.reshape(-1), th.reshape(-1)
    dlt, dth = float(RADII[1].log() - RADII[0].log()), 2 * math.pi / ANGLES
    best_val = 0.0
    for _ in range(REFINE + 1):
        vals = (lt.exp()) * _resolvent_norms(v, vinv, lam, torch.polar(1 + lt.exp(), th))
        i = int(torch.argmax(vals))
        if float(vals[i]) >= best_val:
            best_val, blt, bth = float(vals[i]), float(lt[i]), float(th[i])
        dlt, dth = dlt / 2, dth / 2
        off = torch.linspace(-1, 1, 5, dtype=torch.float64)
        lt, th = torch.meshgrid(blt + dlt * off, bth + dth * off, indexing="ij")
        lt, th = lt.reshape(-1), th.reshape(-1)
        dlt, dth = dlt / 2, dth / 2
    return max(best_val, 1.0) if math.isfinite(best_val) else math.inf
