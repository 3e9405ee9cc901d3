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

#: Power iterations the randomized range finder runs at least (more if it has not converged; see _whiten_randomized).
DEFAULT_POWER_ITERS = 6

#: Predicted top-r subspace error, (s_k / s_r)^(2q+2), the range finder iterates down to.
RANGE_TOL = 1e-2

#: Around this many power iterations the exact Gram path costs as much (d = 4096, N = 2048, 2 CPU cores);
#: a block whose spectrum is too flat to converge by then falls back to it.
MAX_POWER_ITERS = 32

#: "auto" whitening is randomized when min(N - 1, d) >= this x rank (see resolve_method).
RANDOMIZED_MIN_RATIO = 4

__all__ = [
    "REL_TOL",
    "DEFAULT_POWER_ITERS",
    "RANDOMIZED_MIN_RATIO",
    "RANGE_TOL",
    "MAX_POWER_ITERS",
    "Whitening",
    "BlockSpectrum",
    "whiten",
    "dmd_operator",
    "whitened_operator",
    "spectral_features",
    "block_spectrum",
    "max_rank",
    "resolve_method",
    "default_oversample",
]


@dataclass
class Whitening:
    """A whitening transform z = (x - mean) @ basis / scale."""

    mean: torch.Tensor  # (d,)
    basis: torch.Tensor  # (d, r), orthonormal columns
    scale: torch.Tensor  # (r,), singular values of Xc in that basis, descending
    method: str
    #: dtype of the (N x d) @ (d x r) product in apply(); None: the basis's own
    work_dtype: torch.dtype | None = None
    #: the whitened snapshots Zx themselves, when the method had them at no cost (randomized)
    z: torch.Tensor | None = None
    #: randomized only: power iterations run, and the predicted subspace error they reached
    #: (set on a gram fallback too, with what the range finder had reached when it gave up)
    power_iters: int | None = None
    error_estimate: float | None = None

    @property
    def rank(self) -> int:
        return int(self.scale.shape[0])

    def apply(self, x: torch.Tensor, mean: torch.Tensor | None = None, *, own_mean: bool = False) -> torch.Tensor:
        """Whitened snapshots, centered on the whitening's mean, on ``mean``, or (``own_mean``) on x's own.

        The (N x d) work runs in ``work_dtype`` with a single cast of x.
        """
        wdt = self.work_dtype or self.basis.dtype
        xw = x.to(wdt)
        m = xw.mean(dim=0) if own_mean else (self.mean if mean is None else mean).to(wdt)
        return ((xw - m) @ self.basis.to(wdt)).to(self.basis.dtype) / self.scale


@dataclass
class BlockSpectrum:
    """RKSP v1 features of one block."""

    eigenvalues: torch.Tensor  # (r,) complex
    near_unit_mass: float
    spectral_radius: float
    outside_mass: float
    fit_r2: float
    rank_used: int
    whitening: Whitening | None = None


def max_rank(n_tokens: int, d: int) -> int:
    """Largest rank the data allow: centering removes one degree of freedom."""
    return max(0, min(n_tokens - 1, d))


def _row_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(n, start + chunk))


def _capped_rank(n: int, d: int, rank: int) -> tuple[int, int]:
    """(largest rank the data allow, the requested rank capped by it); too few tokens is an error."""
    possible = max_rank(n, d)
    if possible < 1:
        raise RKSPError(f"need at least 2 tokens to whiten, got {n}")
    return possible, min(rank, possible)


def default_oversample(rank: int) -> int:
    """Columns the randomized range finder sketches beyond the rank: r/2 (at least 16), for slow spectra."""
    return max(16, rank // 2)


def _truncate(s: torch.Tensor, rank: int, rel_tol: float) -> int:
    """How many singular values RKSP keeps: at most ``rank``, each above rel_tol * s_1; none is an error."""
    keep = int((s > rel_tol * s[0]).sum()) if s.numel() and bool(s[0] > 0) else 0
    if keep < 1:
        raise RKSPError("snapshots are constant: the residual stream has no variance to whiten")
    return min(rank, keep)


def _moments(xc: torch.Tensor, chunk: int) -> tuple[torch.Tensor, bool]:
    """Second moments of the centered snapshots on their smaller side, accumulated over token chunks.

    Returns (G, rows): G = Xc Xc^T (N x N, rows=True) when N < d, else Xc^T Xc (d x d).
    Either has the squared singular values of Xc; the smaller one is cheaper to iterate on.
    The row Gram is built from its lower block triangle, in 8 row blocks, and
    mirrored (exactly symmetric; 1.6x faster than one GEMM at N = 2048, d = 4096).
    """
    n, d = xc.shape
    if n < d:
        g = torch.empty(n, n, dtype=xc.dtype, device=xc.device)
        step = -(-n // 8)
        for i in range(0, n, step):
            blk = xc[i:i + step] @ xc[:i + step].T
            g[i:i + step, :i + step] = blk
            g[:i, i:i + step] = blk[:, :i].T
        return g, True
    g = torch.zeros(d, d, dtype=xc.dtype, device=xc.device)
    for sl in _row_chunks(n, chunk):
        g += xc[sl].T @ xc[sl]
    return g, False


def _lu_normalize(z: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of span(z): the permuted unit-lower factor P L of z = P L U.

    Cheaper than QR (3x at 2048 x 384) and enough between power iterations;
    the basis handed to Rayleigh-Ritz is orthonormalized (_orthonormalize)
    (Halko et al. 2011, sec. 4.5; the normalizer scikit-learn's randomized_svd uses).
    """
    return _permuted_lower(*torch.linalg.lu_factor(z))


def _orthonormalize(z: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(z) by Cholesky QR with the k x k Gram in float64 (2x faster than
    Householder QR at 4096 x 384); Householder QR when that Gram is too ill-conditioned to factor."""
    z64 = z.double()
    gram = z64.T @ z64
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) != 0:
        return torch.linalg.qr(z)[0]
    return torch.linalg.solve_triangular(factor, z64, upper=True, left=False).to(z.dtype)


def _permuted_lower(lu: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """P L from LAPACK's packed LU factors and row swaps."""
    m, k = lu.shape
    perm = list(range(m))  # LAPACK's row swaps, applied in order, as one permutation
    for i, j in enumerate(pivots.tolist()):
        perm[i], perm[j - 1] = perm[j - 1], perm[i]
    lower = lu.tril(-1)
    lower.diagonal().fill_(1)
    out = torch.empty_like(lower)
    out[torch.tensor(perm, device=lu.device)] = lower
    return out


class _SubspaceIteration:
    """Randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) that can be resumed.

    It runs on the moment matrix of the smaller side: once G is formed, a
    power iteration costs m^2 k (m = min(N, d)) instead of 2 N d k, so
    several are cheap.  After q iterations the sketch spans (G^(q+1)) Omega,
    whose top-r subspace error scales as (s_{k+1} / s_r)^(2q+2).
    """

    def __init__(self, xc: torch.Tensor, k: int, generator: torch.Generator | None, chunk: int):
        self.xc = xc
        self.g, self.rows = _moments(xc, chunk)
        m = self.g.shape[0]
        omega = torch.randn(m, k, generator=generator, dtype=torch.float32, device="cpu").to(xc.dtype).to(xc.device)
        self.z = _lu_normalize(self.g @ omega)
        self.iters = 0  # products with G after the first
        self.effective = 0.0  # the power iterations they are worth (Chebyshev steps are worth more)
        self.filtered: tuple[int, float] | None = None  # a Chebyshev filter not yet credited: (degree, hi)
        self._gz: tuple[torch.Tensor, torch.Tensor] | None = None  # (z, G z) from probe(), for the next step

    def _g_times_z(self) -> torch.Tensor:
        """G z for the current z, reusing probe()'s product when z has not moved since."""
        if self._gz is not None and self._gz[0] is self.z:
            gz = self._gz[1]
        else:
            gz = self.g @ self.z
        self._gz = None
        return gz

    def credit_filter(self, lam_r: float, lam_k: float) -> None:
        """Count a Chebyshev filter as the power iterations it equals, judged by the Ritz values after it.

        A filter of degree m with damped interval [0, hi] amplifies lambda_r by
        cosh(m acosh(2 lambda_r / hi - 1)) and nothing in [0, hi]; power
        iterations gain lambda_r / lambda_k each.  If lambda_k turned out above
        hi the filter was not damping all of the unwanted part, and each of its
        steps is counted as one plain iteration only: chebyshev() counts that
        much already (a lower bound: for eigenvalues above hi, T_m(t_r) / T_m(t_k)
        >= (t_r / t_k)^m >= (lambda_r / lambda_k)^m), and the rest is credited here.
        """
        if self.filtered is None:
            return
        degree, hi = self.filtered
        self.filtered = None
        if lam_k <= 0 or lam_r <= lam_k or lam_k > hi:
            return  # chebyshev() already counted its steps as plain iterations
        per_step = math.acosh(2 * lam_r / hi - 1) / math.log(lam_r / lam_k)
        self.effective += degree * (max(1.0, per_step) - 1.0)

    def run_to(self, effective: float) -> None:
        while self.effective < effective:
            self.z = _lu_normalize(self._g_times_z())
            self.iters += 1
            self.effective += 1

    def probe(self) -> torch.Tensor:
        """Ritz values of G in the current sketch, descending, in float64: a cheap look at the spectrum."""
        self.z = _orthonormalize(self.z)
        gz = self.g @ self.z
        self._gz = (self.z, gz)  # the next step's product: the probe costs no extra product with G
        h = (self.z.T @ gz).double()
        return torch.linalg.eigvalsh((h + h.T) / 2).flip(-1).clamp_min(0)

    def chebyshev(self, degree: int, hi: float, top: float) -> None:
        """Filter the sketch with the Chebyshev polynomial T_degree of G, [0, hi] mapped onto [-1, 1].

        Eigenvalues <= hi (the unwanted part) stay bounded by 1 while lambda_r > hi
        grows like exp(degree acosh(t_r)), t_r = 2 lambda_r / hi - 1: on a flat
        spectrum (lambda_k / lambda_r = 0.86) a step does what 5 power iterations do
        (Zhou & Saad 2007, Chebyshev-filtered subspace iteration).  The three-term
        recurrence is kept consistent by rescaling both of its terms alike, by
        the LU factor of the newest one, whenever the eigenvalues up to ``top``
        may have grown by 1e3 since the last time.
        """
        c = hi / 2
        y0 = self.z
        y1 = self._g_times_z().div_(c).sub_(y0)  # T_1 = (G - c) / c
        t1 = max(2 * top / hi - 1, 1.0 + 1e-12)
        growth = t1 + math.sqrt(t1 * t1 - 1)  # per-step growth of the largest term: LU-rescale before 1e3
        every = max(1, int(math.log(1e3) / math.log(growth)))
        for step in range(1, degree):
            y2 = torch.addmm(y0, self.g, y1, beta=-1.0, alpha=2 / c)  # T_{j+1} = 2 (G - c) / c T_j - T_{j-1}
            y0, y1 = y1, y2.add_(y1, alpha=-2.0)
            if step % every == 0:
                lu, pivots = torch.linalg.lu_factor(y1)
                y0 = torch.linalg.solve_triangular(torch.triu(lu[: y1.shape[1]]), y0, upper=True, left=False)
                y1 = _permuted_lower(lu, pivots)
        self.z = _lu_normalize(y1)
        self.iters += degree
        self.effective += degree  # at least what as many power iterations do; credit_filter adds the rest
        self.filtered = (degree, hi)

    def basis(self) -> torch.Tensor:
        """Orthonormal (d x k) basis of the current estimate of the dominant right singular subspace."""
        z = self.xc.T @ self.z if self.rows else self.z  # left -> right subspace: half a power step
        return _orthonormalize(z)


def resolve_method(method: str, n: int, d: int, rank: int) -> str:
    """The whitening method ``"auto"`` stands for, for N snapshots of width d at rank r.

    Randomized when the data's smaller side is at least RANDOMIZED_MIN_RATIO x r
    (LLaMA-7B width: r = 256 of min(N-1, d) = 2047), where forming and
    iterating on the moments is 3x cheaper than a full eigen-decomposition;
    the exact Gram path below that (SmolLM2, GPT-2: min(N-1, d) <= 768),
    where the full problem is cheap and the top-r subspace can sit in a
    slowly decaying spectrum.
    """
    if method != "auto":
        return method
    return "randomized" if max_rank(n, d) >= RANDOMIZED_MIN_RATIO * rank else "gram"


def whiten(
    x: torch.Tensor,
    rank: int = 256,
    *,
    rel_tol: float = REL_TOL,
    method: str = "auto",
    dtype: torch.dtype | None = torch.float64,
    oversample: int | None = None,
    niter: int = DEFAULT_POWER_ITERS,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
    work_dtype: torch.dtype | None = torch.float32,
    device: torch.device | str | None = None,
) -> Whitening:
    """Whitening of snapshots ``x`` (N x d) onto their top-``rank`` principal subspace.

    ``method`` says how the subspace is found:

    - ``"exact"``: thin SVD of the centered snapshots (the reference).
    - ``"gram"``: eigen-decomposition of the Gram matrix Xc^T Xc (d x d, the
      moments DESIGN.md streams) or, when N < d, of the row Gram Xc Xc^T
      (N x N); about 2x faster than the SVD at d ~ 600.  Squaring costs
      accuracy only for components near the 1e-6 cut-off (relative error
      ~ eps * (s_1/s_i)^2, 1e-4 at worst in float64).
    - ``"randomized"``: moments accumulated over token chunks, randomized
      subspace iteration on them (``niter`` power iterations, oversampling
      ``max(16, rank // 2)`` unless ``oversample`` is given), then a
      Rayleigh-Ritz step inside the found subspace; the (N x d)-sized work in
      ``work_dtype`` on ``device`` (float32, GPU-ready), the small k x k
      algebra in ``dtype``.  Only the subspace is approximate; see
      _whiten_randomized.
    - ``"auto"``: randomized for wide data, gram otherwise (resolve_method).

    ``dtype`` is the compute dtype of the small algebra and of the exact and
    gram paths (None keeps the input's, as KSS does under autograd).
    """
    if x.ndim != 2:
        raise ValueError(f"snapshots must be 2-D (N x d), got shape {tuple(x.shape)}")
    method = resolve_method(method, x.shape[0], x.shape[1], rank)
    if method == "randomized":
        return _whiten_randomized(x, rank, rel_tol, dtype, oversample, niter, generator, chunk, work_dtype, device)
    if dtype is not None:
        x = x.to(dtype)
    n, d = x.shape
    possible, rank = _capped_rank(n, d, rank)
    mean = x.mean(dim=0)
    xc = x - mean
    if method == "exact":
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        v = vh.T
    elif method == "gram":
        gram, rows = _moments(xc, chunk)
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        s = evals.flip(-1)[:possible].clamp_min(0).sqrt()
        if rows:
            # Fewer tokens than dimensions (KSS's per-step subsample): the (N x N) row
            # Gram Xc Xc^T = U S^2 U^T is the smaller problem, and V = Xc^T U S^-1.
            s = s[:_truncate(s, rank, rel_tol)]
            v = (xc.T @ evecs.flip(-1)[:, :s.numel()]) / s
        else:
            v = evecs.flip(-1)[:, :possible]
    else:
        raise ValueError(f"unknown whitening method {method!r} (exact, gram, randomized, auto)")
    r = _truncate(s, rank, rel_tol)
    return Whitening(mean=mean, basis=v[:, :r], scale=s[:r], method=method)


def _whiten_randomized(x, rank, rel_tol, dtype, oversample, niter, generator, chunk, work_dtype, device) -> Whitening:
    """The randomized method of whiten(): (N x d)-sized work in ``work_dtype`` on ``device``, k x k algebra in ``dtype``.

    The snapshots are never copied to float64: the mean, the centered copy,
    the moments and the subspace iteration live in ``work_dtype`` (float32
    by default; on the GPU when ``device`` is one).  The Rayleigh-Ritz step
    diagonalizes (Xc Q)^T (Xc Q) in ``dtype``: singular values of the
    float32-rounded data in the found subspace, Zx orthonormal to float32
    rounding.

    Convergence is checked, not assumed: with Ritz values s_1 >= ... >= s_k,
    the predicted subspace error after q iterations is (s_k / s_r)^(2q+2).
    Above RANGE_TOL the iteration goes on to the q that brings it under,
    from where it stopped; when that q exceeds MAX_POWER_ITERS (a flat
    spectrum, e.g. random-init activations, where iterating costs more
    than the exact eigen-decomposition) the block falls back to ``gram``.
    """
    n, d = x.shape
    possible, rank = _capped_rank(n, d, rank)
    cdt = dtype or x.dtype
    wdt = work_dtype or cdt
    dev = x.device if device is None else torch.device(device)
    xw = x.to(device=dev, dtype=wdt)
    mean = xw.mean(dim=0)
    xw = xw - mean
    k = min(rank + (default_oversample(rank) if oversample is None else oversample), possible)
    it = _SubspaceIteration(xw, k, generator, chunk)
    _accelerate_if_slow(it, k, rank, niter)
    target = max(niter, it.effective)
    cap = max(MAX_POWER_ITERS, niter)  # an explicit --power-iters above the cap still runs in full
    while True:
        it.run_to(target)
        q = it.basis()
        b = (xw @ q).to(dtype=cdt)  # Rayleigh-Ritz: the data projected onto the found subspace
        evals, w = torch.linalg.eigh(b.T @ b)  # (k x k), ascending; B^T B = W S^2 W^T
        s = evals.flip(-1).clamp_min(0).sqrt()
        r = _truncate(s, rank, rel_tol)
        ratio = float(s[k - 1] / s[r - 1]) if k > r else 0.0
        it.credit_filter(float(s[r - 1]) ** 2, float(s[k - 1]) ** 2)
        estimate = ratio ** (2 * it.effective + 2)
        if estimate <= RANGE_TOL or k >= it.g.shape[0]:  # converged, or the sketch spans everything
            break
        need = math.ceil(math.log(RANGE_TOL) / (2 * math.log(ratio)) - 1) if ratio < 1 else math.inf
        if need > MAX_POWER_ITERS or it.iters >= cap:
            ran = it.iters
            del it, xw, b
            w_exact = whiten(x, rank, rel_tol=rel_tol, method="gram", dtype=dtype)
            w_exact.power_iters, w_exact.error_estimate = ran, estimate
            return w_exact
        # the Ritz ratio creeps up as s_k converges from below, so the first prediction runs short: 30% margin
        target = min(max(math.ceil(1.3 * need), it.effective + 1), cap)
    w = w.flip(-1)[:, :r]
    v = q.to(cdt) @ w
    home = x.device
    return Whitening(mean=mean.to(cdt).to(home), basis=v.to(home), scale=s[:r].to(home), method="randomized",
                     work_dtype=wdt if wdt != cdt else None, z=((b @ w) / s[:r]).to(home),
                     power_iters=it.iters, error_estimate=estimate)


#: Power iterations before the sketch's Ritz values are looked at to choose between more power
#: iterations and a Chebyshev filter.
PROBE_ITERS = 3


def _accelerate_if_slow(it: _SubspaceIteration, k: int, rank: int, niter: int) -> None:
    """Switch to a Chebyshev filter when power iterations would converge slowly.

    After PROBE_ITERS iterations the Ritz values of G in the sketch estimate
    rho = lambda_k / lambda_r; when rho^(niter + 1) is still above RANGE_TOL
    (random-init activations: rho ~ 0.86, ~30 iterations needed) the filter of
    the degree that brings the predicted error under RANGE_TOL replaces
    them.  A decaying spectrum (every SmolLM2 block) keeps plain iterations.
    """
    if k <= rank or niter <= PROBE_ITERS:
        return
    it.run_to(PROBE_ITERS)
    lam = it.probe()
    lam_r, lam_k = float(lam[rank - 1]), float(lam[k - 1])
    if lam_k <= 0 or lam_r <= lam_k or (lam_k / lam_r) ** (niter + 1) <= RANGE_TOL:
        return
    rho = lam_k / lam_r
    # After a few iterations lambda_k's Ritz value still lags (lambda_r's converges first), so rho is
    # low: the damped interval reaches up to lambda_r rho^(1/3) to be sure to cover lambda_(k+1).
    hi = lam_r * rho ** (1 / 3)
    now = rho ** (it.effective + 1)
    speed = math.acosh(2 * lam_r / hi - 1)  # log-amplification of lambda_r per filter step
    degree = max(1, math.ceil(math.acosh(max(1.0, now / RANGE_TOL)) / speed))
    if degree <= MAX_POWER_ITERS:  # else too flat for any iteration: the Rayleigh-Ritz check falls back to gram
        it.chebyshev(degree, hi=hi, top=float(lam[0]))


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
    niter: int = DEFAULT_POWER_ITERS,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    work_dtype: torch.dtype | None = torch.float32,
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
    w = whiten(x.detach(), rank, rel_tol=rel_tol, method=method, dtype=dtype, niter=niter, generator=generator,
               device=device, work_dtype=work_dtype)
    zx = w.z if w.z is not None and not x.requires_grad else w.apply(x)
    zy = w.apply(y, own_mean=True)
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
    niter: int = DEFAULT_POWER_ITERS,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    work_dtype: torch.dtype | None = torch.float32,
) -> BlockSpectrum:
    """RKSP v1 spectrum and features of one block from its input/output snapshots."""
    k, zx, zy, w = whitened_operator(x, y, rank, method=method, rel_tol=rel_tol, niter=niter, generator=generator,
                                     device=device, work_dtype=work_dtype)
    eig = torch.linalg.eigvals(k)
    zy_sq = float((zy * zy).sum())
    resid = float(((zy - zx @ k) ** 2).sum())
    r2 = 1.0 - resid / zy_sq if zy_sq > 0 else math.nan
    feats = spectral_features(eig, delta)
    return BlockSpectrum(eigenvalues=eig, fit_r2=r2, rank_used=w.rank, whitening=w, **feats)
