"""Dense linear algebra the features share: the real form of a real operator's eigenvectors, and 2-norms.

An eigenvector matrix V of a real operator (real columns and adjacent conjugate pairs) is V = Wr U with Wr
real and U unitary, so its norms, its inverse and products with it run in real arithmetic (``real_basis``,
``complex_inverse``, ``real_inverse``).  ``spectral_norm`` is a Golub-Kahan-Lanczos 2-norm; ``condition``
is ||M|| ||M^-1|| from a computed inverse.  Pure torch, no knowledge of the method.
"""

from __future__ import annotations

import math

import torch


def col_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norms of the columns of a complex matrix (through its real view: complex abs is slow;
    summed over rows first: a reduction over dims (0, 2) at once is ~10x slower)."""
    return torch.view_as_real(x).square().sum(0).sum(1).sqrt()


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of x is finite: from its sum (~20x faster than ``isfinite(x).all()`` on an
    m x m matrix), and entry by entry only when the sum is not finite (a non-finite entry, or overflow)."""
    r = torch.view_as_real(x.resolve_conj()) if x.is_complex() else x
    return bool(torch.isfinite(r.sum())) or bool(torch.isfinite(r).all())


def unit_columns(x: torch.Tensor) -> torch.Tensor:
    """x with every column scaled to unit Euclidean norm (complex x through its real view: faster)."""
    if not torch.is_complex(x):
        return x / x.norm(dim=0, keepdim=True)
    return torch.view_as_complex(torch.view_as_real(x) / col_norms(x)[None, :, None])


def real_basis(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The real form of an eigenvector matrix of a real operator, or None.

    When every column of V is real or one of two adjacent columns that are exact complex conjugates
    (torch.linalg.eig of a real matrix returns them so), V = Wr U with the real matrix
    Wr = [sqrt2 Re v_p, sqrt2 Im v_p, v_r] (columns: the first of each pair p, then the real ones r)
    and U unitary (a 2 x 2 block (1/sqrt2) [[1, 1], [i, -i]] per pair).  So ||V|| = ||Wr||,
    ||V^-1|| = ||Wr^-1||, V^-1 = U^* Wr^-1, and products with V or V^-1 are real products.
    Returns (Wr, jp, jq, jr): pair firsts, their partners, real columns (indices into V).
    """
    if not torch.is_complex(vectors) or vectors.ndim != 2:
        return None
    r = torch.view_as_real(vectors)
    m = vectors.shape[1]
    real_col = (r[..., 1] == 0).all(0).tolist()
    conj_next = ((r[:, 1:, 0] == r[:, :-1, 0]) & (r[:, 1:, 1] == -r[:, :-1, 1])).all(0).tolist() + [False]
    jp, jr = [], []
    j = 0
    while j < m:
        if real_col[j]:
            jr.append(j)
            j += 1
        elif conj_next[j]:
            jp.append(j)
            j += 2
        else:
            return None
    jp_t = torch.tensor(jp, dtype=torch.long)
    jq_t = jp_t + 1
    jr_t = torch.tensor(jr, dtype=torch.long)
    s2 = math.sqrt(2.0)
    wr = torch.cat([s2 * r[:, jp_t, 0], s2 * r[:, jp_t, 1], r[:, jr_t, 0]], 1)
    return wr, jp_t, jq_t, jr_t


def complex_inverse(wr_inv: torch.Tensor, jp: torch.Tensor, jq: torch.Tensor, jr: torch.Tensor) -> torch.Tensor:
    """V^-1 = U^* Wr^-1 (rows back in V's column order) from the inverse of ``real_basis``'s Wr."""
    npair = jp.numel()
    a, b = wr_inv[:npair] / math.sqrt(2.0), wr_inv[npair:2 * npair] / math.sqrt(2.0)
    c = wr_inv[2 * npair:]
    rows = torch.cat([torch.complex(a, -b), torch.complex(a, b), torch.complex(c, torch.zeros_like(c))])  # a - i b,
    return rows[torch.argsort(torch.cat([jp, jq, jr]))]  # its conjugate, the real rows; back in V's column order



def spectral_norm(mat: torch.Tensor, *, rtol: float = 1e-12, max_steps: int = 200) -> float:
    """||mat||_2 by Golub-Kahan-Lanczos bidiagonalization with full reorthogonalization (seeded start).

    After j steps mat V_j = U_j B_j exactly and mat^* U_j = V_j B_j^* + beta_j v_{j+1} e_j^*, so the top
    singular triplet (s, y, x) of the small bidiagonal B_j is a singular triplet of mat up to the residual
    beta_j |y_j|: a singular value of mat lies within it (and s <= ||mat||).  Stops when that bound is
    below ``rtol`` x s (or the Krylov space is exhausted): 20-40 steps (two matrix-vector products
    each) for the unit-column eigenvector matrices at m = 576 and their inverses, ~5x cheaper than an
    eigen-decomposition of mat^* mat.  Falls back to ``svdvals`` after ``max_steps``.
    """
    m, n = mat.shape
    if min(m, n) == 0:
        return 0.0
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(mat.dtype)
    steps = min(m, n, max_steps)
    cap = min(steps + 1, 48)
    vs = torch.empty(cap, n, dtype=mat.dtype)  # rows: v_1, v_2, ... (grown on demand)
    us = torch.empty(cap, m, dtype=mat.dtype)  # rows: u_1, u_2, ...
    vs[0] = v / torch.linalg.vector_norm(v)
    alpha, beta = [], []
    mat_h = mat.mH.contiguous()  # a row-major copy: gemv with mat^* as fast as with mat
    u = None
    for j in range(steps):
        if j + 1 >= vs.shape[0]:
            vs, us = torch.cat([vs, torch.empty_like(vs)]), torch.cat([us, torch.empty_like(us)])
        u = mat @ vs[j] if u is None else mat @ vs[j] - beta[-1] * u
        u = u - (us[:j].conj() @ u) @ us[:j]  # full reorthogonalization (classical Gram-Schmidt)
        a = float(torch.linalg.vector_norm(u))
        if not a > 0:  # the Krylov space is exhausted (B_j is complete), or not finite
            if a == 0 and j > 0:
                return top_singular_value(alpha, beta[:-1])
            break
        u = u / a
        us[j] = u
        alpha.append(a)
        w = mat_h @ u - a * vs[j]
        w = w - (vs[:j + 1].conj() @ w) @ vs[:j + 1]
        b = float(torch.linalg.vector_norm(w))
        beta.append(b)
        if (j >= 11 and j % 6 == 5) or j == steps - 1 or not b > 0:  # test convergence every 6 steps
            bid = bidiagonal(alpha, beta[:-1])
            left, sv, _ = torch.linalg.svd(bid)
            if b == 0 or b * float(left[-1, 0].abs()) <= rtol * float(sv[0]):
                return float(sv[0])
            if j + 1 == min(m, n):  # all of one side spanned: mat's singular values are [B_j, beta_j e_j]'s
                aug = torch.zeros(j + 1, j + 2, dtype=torch.float64)
                aug[:, :j + 1], aug[j, j + 1] = bid, b
                return float(torch.linalg.svdvals(aug)[0])
            if not b > 0:  # not finite
                break
        vs[j + 1] = w / b
    return float(torch.linalg.svdvals(mat)[0])  # not converged in max_steps, or not finite


def bidiagonal(alpha: list[float], beta: list[float]) -> torch.Tensor:
    """The upper bidiagonal matrix with diagonal ``alpha`` and superdiagonal ``beta`` (float64)."""
    bid = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if beta:
        bid += torch.diag(torch.tensor(beta, dtype=torch.float64), 1)
    return bid


def top_singular_value(alpha: list[float], beta: list[float]) -> float:
    """Largest singular value of the upper bidiagonal matrix with diagonal ``alpha``, superdiagonal ``beta``."""
    return float(torch.linalg.svdvals(bidiagonal(alpha, beta))[0])


def condition(mat: torch.Tensor, mat_inv: torch.Tensor) -> float:
    """||M||_2 ||M^-1||_2 from M and its computed inverse (inf if the inverse is not finite)."""
    if not all_finite(mat_inv):
        return math.inf
    return spectral_norm(mat) * spectral_norm(mat_inv)


def real_inverse(inv: torch.Tensor, jp: torch.Tensor, jq: torch.Tensor, jr: torch.Tensor) -> torch.Tensor:
    """Wr^-1 = U V^-1 (the inverse of ``real_basis``'s Wr) from V^-1: rows Re(w_p + w_q) / sqrt2,
    Im(w_q - w_p) / sqrt2, Re w_r (the inverse of ``complex_inverse``)."""
    wv = torch.view_as_real(inv)
    s2 = math.sqrt(2.0)
    return torch.cat([(wv[jp, :, 0] + wv[jq, :, 0]) / s2, (wv[jq, :, 1] - wv[jp, :, 1]) / s2, wv[jr, :, 0]], 0)

