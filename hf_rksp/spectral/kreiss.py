"""The Kreiss constant (Eq. 29) of a DMD operator, from its eigen-decomposition.

    K(A) = sup_{|z| > 1} (|z| - 1) ||(zI - A)^-1||_2

K is finite only when A is power-bounded; for rho(A) > 1 it is infinite, and
rho already says so.  **[ours]** We report K(A / max(rho, 1)): Eq. 29 itself
when rho <= 1, and otherwise the transient growth on top of the growth rate
rho, which is what non-normality adds (K = 1 for every normal operator).

How it is computed.  Below, A is the normalized operator (rho(A) <= 1),
R(z) = (zI - A)^-1 and f(z) = (|z| - 1) ||R(z)||.

1. Exact limits, free: f -> 1 as |z| -> inf, and radially into an eigenvalue
   lam_j on the unit circle (there is one whenever rho > 1) f -> kappa_j =
   ||v_j|| ||u_j||, its condition number (u_j^* = row j of V^-1).
2. Products R(z) Y = V diag(1/(z - lam)) V^-1 Y for a block Y with its own z
   per column: one matrix product for all points.  For a real A, in the real
   basis of the conjugate pairs (``real_basis``): two real products and a
   2 x 2 block per pair.  Every value kept is ||R(z) y|| for a unit vector y,
   i.e. a lower bound of ||R(z)||, so the result is a lower bound of K.
3. Screening: on the rays through the 16 eigenvalues with the largest
   kappa_j / (1 + (1 - |lam_j|) / 0.05) and the 8 of largest modulus, at
   |z| - 1 = max(1 - |lam_j|, 1e-3) x {0.05, 0.2, 1, 4}, two power steps from
   u_j (products R, R^*, R); at 12-15 far-field points (|z| - 1 in {0.3, 1, 3},
   angles every 45 or 90 degrees), 4 Golub-Kahan steps from random vectors.
   For a real A only Im z >= 0 is searched (||R(conj z)|| = ||R(z)||).
4. Newton ascent of f itself from the 4 best rays and the best far-field
   point, batched: the gradient is exact from the singular pair (R y = s x
   gives ds = -s^2 Re(dz y^* x)), the Hessian comes from gradients at two
   points 1e-3 away (on a saddle -- e.g. the real axis of a real A, where the
   angular gradient vanishes by symmetry -- the step follows the direction
   of positive curvature), steps stay in a trust region in
   (ln(|z| - 1), angle / (|z| - 1)) with |z| - 1 >= 1e-6; every point gets
   products R^*, R, R^*, R warm-started from the last best left vector.  An
   ascent stops when its step (< 1e-6) or predicted relative gain (< 1e-10)
   is negligible, when even 4x the gain its concave quadratic model predicts
   would leave it below the best value known, when it slides (angle within
   3(|z| - 1), |z| decreasing) toward an eigenvalue on the circle whose radial
   limit exceeds its value, or after 15 steps.

With ``matrix`` given and V singular to working precision
(||V||_F ||V^-1||_F > 4.5e13, e.g. a defective A such as a Jordan block) --
or, for m <= 256, ill-conditioned (> 1e10) -- the same search runs on LU
solves of zI - A (m^3 per point: slow for large m, but rare); without it,
such a V, or a non-finite one, gives inf.

Accuracy.  A lower bound of K, up to rounding (the products carry a relative
error ~ 1e-16 ||V||_F ||V^-1||_F).  Measured relative shortfall:
- against a brute force (exact SVD of zI - A on 400 radii 1 + 10^[-5, 1] x
  720 angles, Nelder-Mead polishing of the 8 best grid points, the exact
  radial limits) on 75 random 6 x 6 to 40 x 40 matrices (Gaussian real and
  complex, upper-triangular with off-diagonal up to 3x the diagonal,
  clusters near the circle, ill-conditioned eigenbases, normal; rho below
  and above 1; K from 1 to 3e5): median 1e-12, 90th percentile 1e-9,
  worst 4e-4 (a K = 1.0004 whose bump above the limit 1 was missed; else
  <= 1e-5).  Two numerically defective matrices (K ~ 1e14, 1e17, where no
  double-precision evaluation is reliable) came out 4x and 7x below it;
- on the DMD operators of the paper's six GPT-2 variants at init (d = 256:
  rank 32 against that brute force, full m = 255-256 against a Lanczos
  grid search; 39 operators, K from 1.5 to 27): at most 2e-10;
- the previous grid + power-iteration version was 2e-5 to 6% low on the
  full m = 256 ones and 0.8% low at m = 2047.
Cost, single thread: ~10 ms at m = 32 (Python-bound), ~25 ms at m = 256
(about one torch.linalg.eig), ~45 ms at m = 576 (a quarter of eig), ~1 s at
m = 2047 (a quarter of eig); benchmarks/spectral_speed.py times it in situ.
"""

from __future__ import annotations

import math

import torch

from hf_rksp.spectral.linalg import all_finite, col_norms, real_basis

SCREEN_BY_KAPPA = 16  # eigenvalue rays screened, by kappa_j / (1 + (1 - |lam_j|) / KAPPA_SCALE) ...
SCREEN_BY_MODULUS = 8  # ... and by |lam_j|
KAPPA_SCALE = 0.05
SCREEN_LEVELS = (0.05, 0.2, 1.0, 4.0)  # on each ray, |z| - 1 = max(1 - |lam_j|, 1e-3) x these
FAR_T = (0.3, 1.0, 3.0)  # far-field screening: |z| - 1 ...
FAR_ANGLES = 4  # ... at this many angles (+1 for a real A: 0..pi)
SCREEN_PRODUCTS = 2  # products with R per eigenvalue-ray screening point (R^* between them)
FAR_PRODUCTS = 4  # Golub-Kahan steps per far-field screening point
STARTS = 4  # Newton ascents from the best eigenvalue rays ...
STARTS_FAR = 1  # ... and from the best far-field points
NEWTON_ITERS = 15
NEWTON_PRODUCTS = 2  # products with R per Newton point (after one with R^*), warm-started
HOPE = 4.0  # a Newton ascent stops when f + HOPE x (its quadratic model's gain) is below the best known
FD_STEP = 1e-3  # finite-difference step for the Hessian, in (ln t, theta / t)
STEP_TOL = 1e-6  # a Newton ascent stops when its step (in ln t, theta / t) ...
GAIN_TOL = 1e-10  # ... or its predicted relative gain falls below these
T_FLOOR = 1e-6  # smallest |z| - 1 the ascent visits (the radial limits cover t -> 0)
ILL_CONDITIONED = 1e10  # ||V||_F ||V^-1||_F above which ``matrix`` (when given) replaces V
SINGULAR = 1e-2  # ||V||_F ||V^-1||_F x float64 eps above which V counts as singular
MATRIX_MAX_M = 256  # between the two, ``matrix`` is used up to this size (LU solves cost m^3 per point)


class _Resolvent:
    """R(z) = (zI - A)^-1 and R(z)^* applied to (m x b) blocks, one point z per column.

    Three forms: the real basis of a real A (R = Wr (U D U^*) Wr^-1, D = diag(1/(z - lam)): two real
    products and a 2 x 2 block per conjugate pair), the complex eigenvectors (R = V D V^-1), or LU
    solves with the matrix itself.
    """

    def __init__(self, lam: torch.Tensor, v: torch.Tensor, w: torch.Tensor, matrix: torch.Tensor | None = None,
                 basis: tuple | None = None):
        self.matrix, self.basis, self._lu_z = matrix, None, None
        if matrix is not None:
            return
        if basis is None:
            basis = real_basis(v)
        if basis is not None:
            wr, jp, jq, jr = basis
            npair = jp.numel()
            s2 = math.sqrt(2.0)
            wv = torch.view_as_real(w)
            # Wr^-1 = U V^-1: rows Re(w_p + w_q) / sqrt2, Re(i (w_p - w_q)) / sqrt2, Re w_r
            wi = torch.cat([(wv[jp, :, 0] + wv[jq, :, 0]) / s2, (wv[jq, :, 1] - wv[jp, :, 1]) / s2, wv[jr, :, 0]], 0)
            self.basis, self.wr, self.wi, self.npair = basis, wr, wi, npair
            self.lam_p, self.lam_q, self.lam_r = lam[jp], lam[jq], lam[jr]
        else:
            self.lam, self.v, self.w = lam, v, w

    @staticmethod
    def _real_mm(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """a @ y for a real a and a complex (m x b) y, as one real product (y^T a^T)^T: with the b
        vectors as rows BLAS runs 1.5-2.5x faster for the narrow blocks here (b <~ 100)."""
        m, b = y.shape
        rows = torch.view_as_real(y).permute(1, 2, 0).reshape(2 * b, m)  # Re y_1, Im y_1, Re y_2, ...
        out = rows @ a.mT
        return torch.view_as_complex(out.reshape(b, 2, a.shape[0]).permute(2, 0, 1).contiguous())

    def _weights(self, z: torch.Tensor):
        """(al, be, dr) of ``_middle`` at the points z, kept for the next call with the same z (the
        products alternate R, R^* at fixed points)."""
        cached = getattr(self, "_weights_z", None)
        if cached is None or cached[0] is not z or cached[1] != z._version:
            dp = 1.0 / (z[None, :] - self.lam_p[:, None])
            dq = 1.0 / (z[None, :] - self.lam_q[:, None])
            dr = 1.0 / (z[None, :] - self.lam_r[:, None])
            cached = self._weights_z = (z, z._version, (dp + dq) / 2, (dq - dp) * 0.5j, dr)
        return cached[2:]

    def _middle(self, z: torch.Tensor, y: torch.Tensor, adjoint: bool) -> torch.Tensor:
        """U diag(1/(z - lam)) U^* y (or its adjoint): per pair the block [[al, be], [-be, al]]."""
        npair = self.npair
        al, be, dr = self._weights(z)
        if adjoint:
            al, be, dr = al.conj(), -be.conj(), dr.conj()
        ya, yb = y[:npair], y[npair:2 * npair]
        return torch.cat([al * ya + be * yb, al * yb - be * ya, dr * y[2 * npair:]], 0)

    def _lu(self, z: torch.Tensor):
        if self._lu_z is None or self._lu_z[0].shape != z.shape or not torch.equal(self._lu_z[0], z):
            m = self.matrix.shape[0]
            mats = z[:, None, None] * torch.eye(m, dtype=torch.complex128) - self.matrix
            self._lu_z = (z.clone(), torch.linalg.lu_factor(mats))
        return self._lu_z[1]

    def apply(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            lu, piv = self._lu(z)
            return torch.linalg.lu_solve(lu, piv, y.T[:, :, None])[:, :, 0].T
        if self.basis is not None:
            return self._real_mm(self.wr, self._middle(z, self._real_mm(self.wi, y), False))
        return self.v @ ((self.w @ y) / (z[None, :] - self.lam[:, None]))

    def apply_adjoint(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            lu, piv = self._lu(z)
            return torch.linalg.lu_solve(lu, piv, x.T[:, :, None], adjoint=True)[:, :, 0].T
        if self.basis is not None:
            return self._real_mm(self.wi.T, self._middle(z, self._real_mm(self.wr.T, x), True))
        return self.w.mH @ ((self.v.mH @ x) / (z[None, :] - self.lam[:, None]).conj())

    def symmetric(self, lam: torch.Tensor) -> bool:
        """Whether A is real, so that ||R(conj z)|| = ||R(z)||."""
        if self.matrix is not None:
            return bool((self.matrix.imag == 0).all())
        if self.basis is None:
            return False
        _, jp, jq, jr = self.basis
        return bool((lam[jq] == lam[jp].conj()).all() and (lam[jr].imag == 0).all())


def _power(res: _Resolvent, z: torch.Tensor, y: torch.Tensor, products: int, *, adjoint_first: bool = False):
    """``products`` products with R(z), R^* between them, from y (one point per column).

    With ``adjoint_first`` the start is a left vector x and R^* comes first (y = R^* x).
    Returns (sigma, y, x): y unit, x unit with R y = sigma x, so sigma <= ||R(z)||.
    """
    if adjoint_first:
        y = res.apply_adjoint(z, y)
    for i in range(products):
        y = y / col_norms(y).clamp_min(1e-300)
        x = res.apply(z, y)
        sigma = col_norms(x)
        x = x / sigma.clamp_min(1e-300)
        if i < products - 1:
            y = res.apply_adjoint(z, x)
    return torch.nan_to_num(sigma, nan=0.0, posinf=0.0), y, x


def _reorthogonalize(x: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """x with its components along the (column-wise, per point) unit vectors in ``basis`` removed, twice."""
    for _ in range(2):
        for v in basis:
            x = x - v * (v.conj() * x).sum(0)
    return x

def _lanczos(res: _Resolvent, z: torch.Tensor, y: torch.Tensor, products: int):
    """Golub-Kahan bidiagonalization, ``products`` products with R (R^* between them) from y, per column.

    R Q = P B exactly on the Krylov basis, so the top singular triplet (sigma, w, u) of the small B gives
    y = Q w, x = P u with R y = sigma x: sigma <= ||R(z)||, and far better than a power step.
    Returns (sigma, y, x) like ``_power``.
    """
    b = z.numel()
    bidiag = torch.zeros(b, products, products, dtype=torch.complex128)
    qs, ps = [], []
    q = y / col_norms(y).clamp_min(1e-300)
    for i in range(products):
        qs.append(q)
        p = _reorthogonalize(res.apply(z, q), ps)
        a = col_norms(p)
        p = p / a.clamp_min(1e-300)
        ps.append(p)
        bidiag[:, i, i] = a
        if i == products - 1:
            break
        q = _reorthogonalize(res.apply_adjoint(z, p), qs)
        bb = col_norms(q)
        q = q / bb.clamp_min(1e-300)
        bidiag[:, i, i + 1] = bb
    u, s, vh = torch.linalg.svd(torch.nan_to_num(bidiag))
    w, uu = vh[:, 0, :].conj(), u[:, :, 0]  # (b, k)
    y = sum(qq * w[:, i] for i, qq in enumerate(qs))
    x = sum(pp * uu[:, i] for i, pp in enumerate(ps))
    return torch.nan_to_num(s[:, 0], nan=0.0, posinf=0.0), y, x


def _ascend(res: _Resolvent, z0: torch.Tensor, x0: torch.Tensor, f0: torch.Tensor, t_max: float, best: float,
            peripheral: torch.Tensor, limits: torch.Tensor) -> float:
    """Trust-region Newton ascent of f from each z0 (left start vectors x0, values f0); the best f met.

    Coordinates (ln t, theta / t) around each start's best point (t = |z| - 1).  Every step evaluates, per
    live start, the trial point and two points FD_STEP away (for the Hessian) in one batch, with products
    R^*, R, ... (NEWTON_PRODUCTS with R) warm-started from the best point's left vector.  A start stops when
    its step or predicted gain is negligible, when even HOPE x the gain its (concave) quadratic model
    predicts would leave it below the best value known, or when it heads (t decreasing, angle within 3t)
    toward an eigenvalue on the circle (angles ``peripheral``) whose radial limit (``limits``) is above
    its value: that limit is already counted.
    """
    n = z0.numel()
    best_known = best
    s_best, th_best, f_best = torch.log(z0.abs() - 1), torch.angle(z0), f0.clone()
    g_best = torch.zeros(n, 2, dtype=torch.float64)
    h_best = torch.zeros(n, 2, 2, dtype=torch.float64)
    x_best = x0.clone()
    fresh = torch.ones(n, dtype=torch.bool)  # the start point is evaluated first, whatever its value
    radius = torch.ones(n, dtype=torch.float64)
    s, th = s_best.clone(), th_best.clone()
    live = torch.ones(n, dtype=torch.bool)
    lo, hi = math.log(T_FLOOR), math.log(t_max)
    for _ in range(NEWTON_ITERS):
        idx = torch.nonzero(live).flatten()
        if idx.numel() == 0:
            break
        si, thi = s[idx], th[idx]
        ti = si.exp()
        z = torch.polar(1 + torch.stack([si, si + FD_STEP, si], 1).reshape(-1).exp(),
                        torch.stack([thi, thi, thi + FD_STEP * ti], 1).reshape(-1))
        sigma, yl, xl = _power(res, z, x_best[:, idx].repeat_interleave(3, dim=1), NEWTON_PRODUCTS,
                               adjoint_first=True)
        w = (yl.conj() * xl).sum(0)  # y^* x; d sigma = -sigma^2 Re(dz y^* x)
        rho = z.abs()
        tz = rho - 1
        ds_drho = -(sigma ** 2) * ((z / rho) * w).real
        ds_dth = -(sigma ** 2) * ((1j * z) * w).real
        f = (tz * sigma).reshape(-1, 3)
        g = torch.stack([tz * (sigma + tz * ds_drho), tz * ds_dth * tz], 1).reshape(-1, 3, 2)
        hess = torch.stack([(g[:, 1] - g[:, 0]) / FD_STEP, (g[:, 2] - g[:, 0]) / FD_STEP], 2)
        hess = (hess + hess.mT) / 2
        best = max(best, float(f.max()))
        for k, c in enumerate(idx.tolist()):
            fc = float(f[k, 0])
            if fc > float(f_best[c]) or bool(fresh[c]):
                s_best[c], th_best[c], f_best[c] = s[c], th[c], max(fc, float(f_best[c]))
                x_best[:, c] = xl[:, 3 * k]
                g_best[c], h_best[c] = g[k, 0], hess[k]
                fresh[c] = False
            else:
                radius[c] /= 4
            gq, hq = g_best[c], h_best[c]
            ev, evec = torch.linalg.eigh(hq)
            concave = bool((ev < 0).all())
            if concave:
                d = -torch.linalg.solve(hq, gq)
                lead = max(best_known, float(f_best.max()))  # values at trial points, not the FD ones
                gain = 0.5 * float(gq @ d)  # the concave model's rise to its peak (>= 0)
                if float(f_best[c]) + HOPE * gain < lead and float(f_best[c]) < (1 - 1e-9) * lead:
                    live[c] = False  # even HOPE x the gain its quadratic model predicts stays below the best
                    continue
            else:  # along the gradient plus the direction of positive curvature (leaves saddles, e.g. the
                # real axis of a real A, where the angular gradient vanishes by symmetry)
                e = evec[:, -1]
                gn = gq / max(float(gq.norm()), 1e-300)
                d = gn + (1.0 if float(gq @ e) >= 0 else -1.0) * e
                d = d * (radius[c] / max(float(d.norm()), 1e-300))
            dn = float(d.norm())
            if dn > radius[c]:
                d = d * (radius[c] / dn)
            t0 = math.exp(float(s_best[c]))
            s_new = min(max(float(s_best[c] + d[0]), lo), hi)
            d[0] = s_new - float(s_best[c])
            pred = float(gq @ d + 0.5 * d @ hq @ d)
            if float(d.abs().sum()) < STEP_TOL or pred <= GAIN_TOL * max(float(f_best[c]), 1.0):
                live[c] = False
                continue
            if float(d[0]) < 0 and peripheral.numel():
                gap = torch.remainder(peripheral - float(th_best[c]) + math.pi, 2 * math.pi) - math.pi
                if bool(((gap.abs() <= 3 * t0) & (limits >= float(f_best[c]))).any()):
                    live[c] = False  # sliding into a radial limit already counted
                    continue
            if dn >= 0.9 * radius[c]:
                radius[c] = min(float(radius[c]) * 2, 8.0)
            s[c] = s_new
            th[c] = th_best[c] + d[1] * t0
    return best


def kreiss_constant(eigenvalues: torch.Tensor, vectors: torch.Tensor, inverse: torch.Tensor, *,
                    matrix: torch.Tensor | None = None) -> float:
    """K(A / max(rho, 1)) from A's eigenvalues, right eigenvectors and their inverse (see module doc).

    ``matrix`` (optional): A itself, used instead of the eigenvectors when they are singular to working
    precision (||V||_F ||V^-1||_F > 4.5e13, e.g. a defective A) -- without it such a V gives inf -- and,
    for m <= 256, already when they are ill-conditioned (> 1e10).
    """
    return kreiss_core(eigenvalues, vectors, inverse, matrix=matrix)


def kreiss_core(eigenvalues: torch.Tensor, vectors: torch.Tensor, inverse: torch.Tensor, *,
            matrix: torch.Tensor | None = None, basis: tuple | None = None) -> float:
    """``kreiss_constant``; ``basis``: ``real_basis(vectors)`` when the caller has it already."""
    lam = eigenvalues.detach().to(torch.complex128)
    m = lam.numel()
    if m == 0:
        return 1.0
    v = vectors.detach().to(torch.complex128)
    w = inverse.detach().to(torch.complex128)
    a = None if matrix is None else matrix.detach().to(torch.complex128)
    if not bool(torch.isfinite(torch.view_as_real(lam)).all()):
        return math.inf
    scale = max(float(lam.abs().max()), 1.0)
    lam = lam / scale
    finite = all_finite(v) and all_finite(w)
    vn = col_norms(v) if finite else None
    if finite and bool((vn > 0).all()):
        if not bool(((vn - 1).abs() <= 1e-14).all()):
            v, w, basis = v / vn, w * vn[:, None], None
        kappa = col_norms(w.T)
        cond_f = float(kappa.square().sum().sqrt()) * math.sqrt(m)  # ||V||_F ||V^-1||_F, unit columns
    else:
        kappa, cond_f = torch.full((m,), math.inf, dtype=torch.float64), math.inf
    singular = not cond_f * torch.finfo(torch.float64).eps <= SINGULAR
    use_matrix = a is not None and (singular or (not cond_f <= ILL_CONDITIONED and m <= MATRIX_MAX_M))
    if not use_matrix and singular:
        return math.inf  # V singular to working precision
    if use_matrix:
        a = a / scale
        if not all_finite(a):
            return math.inf
        if not finite or not bool(torch.isfinite(kappa).all()):
            v = w = torch.eye(m, dtype=torch.complex128)
            kappa = torch.ones(m, dtype=torch.float64)
    res = _Resolvent(lam, v, w, a if use_matrix else None, basis=basis)
    real = res.symmetric(lam)
    mod = lam.abs()
    delta = (1 - mod).clamp_min(0)
    best = 1.0
    peripheral = mod >= 1 - 1e-12
    if bool(peripheral.any()):
        best = max(best, float(kappa[peripheral].max()))  # radial limits
    if not math.isfinite(best):
        return math.inf

    # --- screening: eigenvalue rays (power steps from u_j) and far field (Golub-Kahan from random) ---
    ok = lam.imag >= 0 if real else torch.ones(m, dtype=torch.bool)
    okf = ok.double()
    n_ok = int(ok.sum())
    by_kappa = torch.argsort(okf * kappa / (1 + delta / KAPPA_SCALE), descending=True)[:min(SCREEN_BY_KAPPA, n_ok)]
    by_modulus = torch.argsort(okf * (1 + mod), descending=True)[:min(SCREEN_BY_MODULUS, n_ok)]
    cand = torch.cat([by_kappa, by_modulus])
    cand = torch.unique(cand)
    pc = cand.numel()
    levels = torch.tensor(SCREEN_LEVELS, dtype=torch.float64)
    nl = levels.numel()
    t_c = (delta[cand].clamp_min(1e-3)[:, None] * levels[None, :]).clamp_min(T_FLOOR)
    z_c = torch.polar(1 + t_c, torch.angle(lam[cand])[:, None].expand(-1, nl)).reshape(-1)
    y_c = (w[cand].mH / kappa[cand]).repeat_interleave(nl, dim=1)
    na = FAR_ANGLES + 1 if real else FAR_ANGLES
    angles = (torch.linspace(0, math.pi, na, dtype=torch.float64) if real
              else torch.arange(na, dtype=torch.float64) * (2 * math.pi / na))
    far_t = torch.tensor(FAR_T, dtype=torch.float64)
    z_f = torch.polar((1 + far_t)[:, None].expand(-1, na).reshape(-1), angles.repeat(far_t.numel()))
    gen = torch.Generator().manual_seed(0)
    shape = (m, z_f.numel())
    y_f = torch.complex(torch.randn(shape, generator=gen, dtype=torch.float64),
                        torch.zeros(shape, dtype=torch.float64) if real
                        else torch.randn(shape, generator=gen, dtype=torch.float64))
    z_s = torch.cat([z_c, z_f])
    sig_c, y_c, x_c = _power(res, z_c, y_c, SCREEN_PRODUCTS)
    sig_f, y_f, x_f = _lanczos(res, z_f, y_f, FAR_PRODUCTS)
    sigma, y_s, x_s = torch.cat([sig_c, sig_f]), torch.cat([y_c, y_f], 1), torch.cat([x_c, x_f], 1)
    f_s = (z_s.abs() - 1) * sigma
    best = max(best, float(f_s.max()))
    # ||A x|| of the unit screening vectors (A x = z x - y / sigma) bounds where f can still exceed 2:
    # f <= (|z| - 1) / (|z| - ||A||) < 2 for |z| > 2 ||A||
    a_norm = float(col_norms(z_s[None, :] * x_s - y_s / sigma.clamp_min(1e-300)).max())
    t_max = min(max(10.0, 2 * a_norm), 1e6)

    # --- Newton ascents from the best rays and the best far-field point ---
    f_ray, i_ray = f_s[: pc * nl].reshape(pc, nl).max(1)
    rays = torch.argsort(f_ray, descending=True)[:STARTS]
    starts = (rays * nl + i_ray[rays]).tolist()
    starts += (pc * nl + torch.argsort(f_s[pc * nl:], descending=True)[:STARTS_FAR]).tolist()
    starts = torch.tensor(starts, dtype=torch.long)
    return _ascend(res, z_s[starts], x_s[:, starts], f_s[starts], t_max, best, torch.angle(lam[peripheral]),
                   kappa[peripheral])
