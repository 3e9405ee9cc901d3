"""ZCA whitening of a block's snapshots (the paper's Eqs. 7-9), reduced to the range of X~.

Snapshots are row-major here: ``x``, ``y`` are (N x d), one token state per
row (the paper's X, Y are their transposes).  With Xc = X - mean(X),
Yc = Y - mean(Y) and the eigen-decomposition Xc^T Xc = V S^2 V^T,

    Sigma = Xc^T Xc / (N - 1) + eps I,     W = Sigma^(-1/2)
          = V diag(w) V^T + eps^(-1/2) (I - V V^T),   w_i = (s_i^2 / (N - 1) + eps)^(-1/2)
    X~ = Xc W,   Y~ = Yc W                 (X's W for both)

so the singular values of X~ are Sigma_i = s_i w_i, its right singular
vectors (in feature space) are V, and every DMD quantity on the range of X~
can be written with k x k matrices in the V coordinates:

    C    = (Yc V)^T (Xc V)     cross moment            (k x k)
    Syy  = (Yc V)^T (Yc V)     Y's moment in range(V)  (k x k)

plus a few scalars for what Y~ has outside range(V) (scaled by eps^(-1/2);
it enters eta_nl only).  ``whiten`` gets these from the moments of the
smaller side: the d x d moments when N > d, the N x N kernels when N <= d
(LLaMA-7B width), so no d x d whitening matrix is ever formed.  With N > d
the three moments Xc^T Xc, Yc^T Xc, Yc^T Yc are the only N-length products
(the symmetric two by blocks, ~2/3 of a product each); C and Syy are them
rotated by V (d x d products), ~35% cheaper than projecting Xc and Yc on V.

Numerical rank (the pseudo-inverse cut, **[ours]**): a direction is kept when
Sigma_i > rel_cut * max Sigma (rel_cut = 1e-6, the cut the paper's
pseudo-inverse needs to be finite) and s_i^2 > m * 2^-52 * s_1^2 (m the
Gram's size): below that an eigenvalue of a float64 Gram is rounding noise,
as is any direction of float32 activations that small.

Gradients (KSS).  The basis V comes from ``x.detach()``; it is only a basis:
with it fixed, everything that depends on X is kept differentiable through
the k x k Gram H = (Xc V)^T (Xc V) (``xx``, equal to S^2 at the point), and
the whitening matrix in V coordinates is W_V = f(H), f(t) = (t/(N-1) + eps)^-1/2,
whose first-order change is the Daleckii-Krein divided difference
dW_V = Phi o dH with Phi_ij = (f(t_i) - f(t_j)) / (t_i - t_j) (``whitening``).
Phi is bounded by max |f'| for any spacing of the t_i, so unlike the
eigenvector derivatives of V (1 / (s_i^2 - s_j^2)) it cannot blow up.  At full
rank (k = d) V f(V^T G V) V^T = f(G) for any orthonormal V, so this is the
exact derivative of the paper's W; when k < d the rotation of range(X~) itself
is not followed (as for any pseudo-inverse cut).  A stop-gradient through W
instead (our first KSS) is badly wrong for every parameter upstream of the
block: the detached X Gram makes A~ scale like |X|^2, so the gradient asks
the stream to shrink, which changes nothing in the real operator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_rksp.errors import SnapshotError

#: Relative cut of the pseudo-inverse of X~: 1e-6 x the largest singular value [ours] (docs/method.md).
REL_CUT = 1e-6
#: The paper's whitening regularizer (absolute, Eq. 9).
EPS = 1e-5


@dataclass
class Whitened:
    """A block's whitened snapshots, in the coordinates of the right singular vectors V of Xc.

    ``s`` are the kept singular values of Xc, ``w`` the whitening weights, so
    X~ has singular values ``sigma = s * w``.  ``basis`` (d x k) is V itself
    (None in N-space, where V is never formed).
    """

    s: torch.Tensor  # (k,)
    w: torch.Tensor  # (k,)
    cross: torch.Tensor  # C = (Yc V)^T (Xc V), (k, k)
    yy: torch.Tensor  # Syy = (Yc V)^T (Yc V), (k, k)
    y_norm2: float  # ||Yc||_F^2
    diff_norm2: float  # ||Yc - Xc||_F^2
    y_rows_norm2: float  # ||Vr^T Yc||_F^2: Yc projected on the row space of Xc (Vr = Xc V S^-1)
    n: int
    d: int
    eps: float
    basis: torch.Tensor | None = None
    xx: torch.Tensor | None = None  # H = (Xc V)^T (Xc V), (k, k), differentiable in x; None without grad

    def whitening(self) -> torch.Tensor:
        """W_V = (H / (N-1) + eps I)^(-1/2) in V coordinates (k x k): diag(w) in value, with the exact
        first-order derivative in H (module docstring) when ``xx`` carries gradient."""
        w = torch.diag(self.w)
        if self.xx is None or not self.xx.requires_grad:
            return w
        a = 1.0 / (self.n - 1)
        u = self.s.detach() ** 2 * a + self.eps  # (t / (N-1) + eps) at the point, t = s^2
        ru = u.sqrt()
        # Phi_ij = (u_i^-1/2 - u_j^-1/2) / (t_i - t_j), written without the difference (no cancellation)
        phi = -a / ((ru[:, None] * ru[None, :]) * (ru[:, None] + ru[None, :]))
        return w + phi * (self.xx - self.xx.detach())

    @property
    def k(self) -> int:
        return int(self.s.shape[0])

    @property
    def sigma(self) -> torch.Tensor:
        return self.s * self.w

    @property
    def full_rank(self) -> bool:
        """True when range(X~) is the whole feature space (k = d): nothing of Y~ lies outside it."""
        return self.k == self.d

    def outside(self) -> tuple[float, float]:
        """(||Y~ (I - P)||^2, ||(Y~ - X~)||^2) outside range(V), P the row projector of X~.

        Both are eps^-1 x the part of Yc (resp. Yc - Xc) that V does not span;
        zero when k = d.
        """
        if self.full_rank:
            return 0.0, 0.0
        s2 = self.s.detach() ** 2
        cross, yy = self.cross.detach(), self.yy.detach()
        y_in = float(torch.diagonal(yy).sum())
        y_perp = max(self.y_norm2 - y_in, 0.0)
        rows_in = float(((cross.T / self.s.detach()[:, None]) ** 2).sum())  # ||Vr^T Yc V||^2 = ||S^-1 C^T||^2
        y_perp_rows = max(self.y_rows_norm2 - rows_in, 0.0)
        d_in = y_in - 2 * float(torch.diagonal(cross).sum()) + float(s2.sum())
        d_perp = max(self.diff_norm2 - d_in, 0.0)
        return max(y_perp - y_perp_rows, 0.0) / self.eps, d_perp / self.eps


def _keep(s2: torch.Tensor, n: int, eps: float, rel_cut: float, constant_level: float) -> torch.Tensor:
    """Indices (descending s) of the directions kept: see the module docstring.

    ``constant_level``: the largest s_1^2 that centering rounding alone leaves in a constant stream.
    """
    s2 = s2.clamp_min(0)
    order = torch.argsort(s2, descending=True)
    s2 = s2[order]
    if s2.numel() == 0 or not bool(s2[0] > constant_level):
        raise SnapshotError("the residual stream entering this block is constant: nothing to whiten")
    sigma = (s2 / (s2 / (n - 1) + eps)).sqrt()
    floor = s2.numel() * torch.finfo(torch.float64).eps * s2[0]
    kept = (sigma > rel_cut * sigma[0]) & (s2 > floor)
    return order[: int(kept.sum())]


def _gram(a: torch.Tensor, blocks: int = 3) -> torch.Tensor:
    """a^T a for a tall (N x d) ``a`` without gradient, as the upper blocks of a ``blocks`` x ``blocks``
    column partition mirrored: (b + 1) / 2b of a plain product's flops (torch has no syrk)."""
    d = a.shape[1]
    if d < 64 * blocks:
        return a.T @ a
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    cols = [a[:, lo:hi] for lo, hi in zip(edges, edges[1:])]
    out = a.new_empty(d, d)
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        row = cols[i].T @ a[:, lo:]  # (block i)^T (blocks i..)
        out[lo:hi, lo:] = row
        out[hi:, lo:hi] = row[:, hi - lo:].T
    return out


def _centered(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a in ``dtype`` minus its column means; in place when ``to`` made a copy that needs no gradient."""
    b = a.to(dtype)
    if b is a or b.requires_grad:
        return b - b.mean(dim=0)
    return b.sub_(b.mean(dim=0))


def whiten(x: torch.Tensor, y: torch.Tensor, *, eps: float = EPS, rel_cut: float = REL_CUT,
           dtype: torch.dtype = torch.float64) -> Whitened:
    """The paper's ZCA-whitened snapshots of one block, reduced to the range of X~ (see module doc).

    ``x``, ``y``: (N x d) input and output token states of the block, the
    same tokens in the same order.  The small algebra runs in ``dtype``.
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise SnapshotError(f"snapshots must be two (N x d) matrices of one shape, got {tuple(x.shape)} "
                            f"and {tuple(y.shape)}")
    n, d = x.shape
    if n < 2:
        raise SnapshotError(f"whitening needs at least 2 token states, got {n}")
    if not (eps > 0 and 0 < rel_cut < 1):
        raise SnapshotError(f"eps must be > 0 and rel_cut in (0, 1), got {eps}, {rel_cut}")
    lo, hi = torch.aminmax(x.detach())
    xc, yc = _centered(x, dtype), _centered(y, dtype)
    xd = xc.detach()
    # a constant stream leaves only centering rounding, |xc| <~ 64 eps |x|, in each of the N d entries
    constant_level = n * d * (64 * torch.finfo(dtype).eps * max(float(hi), -float(lo))) ** 2
    y_norm2 = float(torch.linalg.vector_norm(yc.detach())) ** 2  # no (N x d) temporary
    if n > d:  # d-space: the (d x d) moments, rotated by V (k x k); no N-length product after the Grams
        gxx = xc.T @ xc if xc.requires_grad else None  # KSS: X's Gram in the graph, formed once
        evals, evecs = torch.linalg.eigh(_gram(xd) if gxx is None else gxx.detach())
        idx = _keep(evals, n, eps, rel_cut, constant_level)
        v = evecs[:, idx]
        s = evals[idx].clamp_min(0).sqrt()
        gyx = yc.T @ xc  # Yc^T Xc, differentiable in x and y
        gyy = yc.T @ yc if yc.requires_grad else _gram(yc)
        gyx_v = gyx @ v
        cross = v.T @ gyx_v  # C = (Yc V)^T (Xc V)
        yy = v.T @ (gyy @ v)  # Syy = (Yc V)^T (Yc V)
        y_rows = float((gyx_v.detach() / s).pow(2).sum())  # ||S^-1 V^T Xc^T Yc||^2
        basis = v
        xx = None if gxx is None else v.T @ (gxx @ v)  # H, differentiable in x
    else:  # N-space: the (N x N) kernel; V = Xc^T U S^-1 is never formed
        evals, evecs = torch.linalg.eigh(xd @ xd.T)
        idx = _keep(evals, n, eps, rel_cut, constant_level)
        u = evecs[:, idx]
        s = evals[idx].clamp_min(0).sqrt()
        px = (xc @ (xd.T @ u)) / s  # = U S, differentiable in x
        py = (yc @ (xd.T @ u)) / s  # = Yc V
        y_rows = float((u.T @ yc.detach()).pow(2).sum())
        basis = None
        cross, yy = py.T @ px, py.T @ py
        xx = px.T @ px if px.requires_grad else None
    # ||Yc - Xc||^2, in Yc's own buffer when nothing needs it any more (a fresh (N x d) buffer costs ~5 ms)
    in_graph = xc.requires_grad or yc.requires_grad  # (autograd may have saved Yc)
    diff_norm2 = float(torch.linalg.vector_norm(yc.detach() - xd if in_graph else yc.sub_(xd))) ** 2
    w = (s ** 2 / (n - 1) + eps).rsqrt()
    return Whitened(s=s, w=w, cross=cross, yy=yy, y_norm2=y_norm2, diff_norm2=diff_norm2,
                    y_rows_norm2=y_rows, n=n, d=d, eps=eps, basis=basis, xx=xx)
