"""RKSP v2 features of one block (Def. 1, Eqs. 5, 10, 29) as a typed record, and the feature registry.

``profile_block(x, y, config)`` is the whole method for one residual block:
whiten (whitening.py) -> operator (operator.py) -> eigen-decomposition ->
the features below.  ``FEATURES`` lists every scalar feature once (name,
label, how it is read); the JSON, schema, card, plots, compare, CLI summary
and training logs all loop over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from hf_rksp.errors import ConfigError, SnapshotError
from hf_rksp.spectral.kreiss import kreiss_core
from hf_rksp.spectral.linalg import (
    all_finite,
    complex_inverse,
    condition,
    real_basis,
    real_inverse,
    unit_columns,
)
from hf_rksp.spectral.operator import OVERSAMPLE, POWER_ITERS, SKETCHES, DMDOperator, dmd_operator
from hf_rksp.spectral.registry import FEATURE_NAMES, FEATURES, Feature  # noqa: F401  (re-exported)
from hf_rksp.spectral.whitening import EPS, REL_CUT, whiten


@dataclass(frozen=True)
class RKSPConfig:
    """Every parameter of RKSP v2, defaulting to the paper's values (docs/method.md, "Parameters and defaults").

    ``rank``: None for full DMD (all k eigenvalues), or r for seeded rank-r
    randomized DMD.  ``eps_nl`` and ``eps_r`` are the paper's unspecified
    "small constants" of Eqs. 5 and 10 **[ours]**.
    """

    eps: float = EPS
    rank: int | None = None
    band_upper: float = 1.05  # 1 + eps_u
    band_lower: float = 0.90  # 1 - eps_n
    contractive: float = 0.80  # 1 - delta_c
    resdmd_tau: float = 0.1
    rel_cut: float = REL_CUT
    eps_nl: float = 1e-12
    eps_r: float = 1e-12
    oversample: int = OVERSAMPLE
    power_iters: int = POWER_ITERS
    kreiss: bool = True
    #: a block is flagged near-identity when ||Y~ - X~||_F <= this x ||X~||_F (eta_nl unreliable, App. J)
    identity_tol: float = 1e-3
    #: the subspace of rank-r DMD (no effect at full rank): "random" or "pod" (operator.py) [ours]
    sketch: str = "random"

    def __post_init__(self):
        checks = (
            ("eps", self.eps > 0, f"eps must be > 0, got {self.eps}"),
            ("rank", self.rank is None or (isinstance(self.rank, int) and not isinstance(self.rank, bool)
                                           and self.rank >= 1),
             f"rank must be full (None) or an integer >= 1, got {self.rank}"),
            ("band_upper", self.band_upper > 1, f"band_upper must be above 1, got {self.band_upper}"),
            ("band_lower", 0 < self.band_lower < 1, f"band_lower must be in (0, 1), got {self.band_lower}"),
            ("contractive", 0 < self.contractive <= self.band_lower,
             f"contractive must be in (0, band_lower = {self.band_lower}], got {self.contractive}"),
            ("resdmd_tau", self.resdmd_tau > 0, f"resdmd_tau must be > 0, got {self.resdmd_tau}"),
            ("rel_cut", 0 < self.rel_cut < 1, f"rel_cut must be in (0, 1), got {self.rel_cut}"),
            ("oversample", self.oversample >= 0 and self.power_iters >= 0,
             "oversample and power_iters must be >= 0"),
            ("sketch", self.sketch in SKETCHES, f"sketch must be one of {', '.join(SKETCHES)}, got {self.sketch!r}"),
        )
        for param, ok, message in checks:
            if not ok:
                raise ConfigError(message, param=param)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class BlockFeatures:
    """RKSP v2 features of one residual block; None stands for an infinite or undefined value."""

    near_unit_mass: float
    expansive_mass: float
    mid_mass: float
    contractive_mass: float
    spectral_radius: float
    eigvec_condition: float | None
    nonlinearity_ratio: float
    kreiss_constant: float | None
    resdmd_kept: float
    resdmd_residual_median: float | None
    resdmd_residual_max: float | None
    near_unit_mass_kept: float | None
    expansive_mass_kept: float | None
    mid_mass_kept: float | None
    contractive_mass_kept: float | None
    m: int  # number of eigenvalues
    rank: int  # k, the numerical rank of X~
    eigenvalues: torch.Tensor  # (m,) complex
    flags: list[str] = field(default_factory=list)  # "near_identity", "rank_deficient"

    def value(self, name: str) -> float | None:
        return getattr(self, name)


def mass_partition(eigenvalues: torch.Tensor, config: RKSPConfig = RKSPConfig()) -> dict[str, float]:
    """Def. 1: shares of |lambda| above band_upper, in [band_lower, band_upper], below contractive, the rest."""
    mod = eigenvalues.detach().abs().double()
    if mod.numel() == 0:
        return dict.fromkeys(("near_unit_mass", "expansive_mass", "mid_mass", "contractive_mass"), None)
    exp_ = float((mod > config.band_upper).double().mean())
    near = float(((mod >= config.band_lower) & (mod <= config.band_upper)).double().mean())
    con = float((mod < config.contractive).double().mean())
    return {"near_unit_mass": near, "expansive_mass": exp_, "mid_mass": max(0.0, 1.0 - exp_ - near - con),
            "contractive_mass": con}


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def eigvec_condition(vectors: torch.Tensor, inverse: torch.Tensor | None = None) -> float:
    """kappa(V) = ||V||_2 ||V^-1||_2 with every right eigenvector scaled to unit norm (inf if singular).

    For the eigenvectors of a real operator (real columns and adjacent conjugate pairs, as
    torch.linalg.eig returns them), kappa(V) = kappa(Wr) for the real matrix Wr of ``real_basis``
    (V = Wr U, U unitary): everything below runs in real arithmetic, ~4x cheaper.  With ``inverse``
    (V^-1 of the unit-column V, as ``eigen`` returns it): ||V||_2 ||V^-1||_2 by ``spectral_norm``, a few
    matrix-vector products.  Without it: from the eigenvalues of the Gram M^* M (M = Wr or V; 3x
    cheaper than an SVD) while they resolve kappa (kappa^2 well below 1 / float64 eps); from singular
    values beyond.
    """
    v = unit_columns(vectors)
    basis = real_basis(v)
    mat = basis[0] if basis is not None else v
    if inverse is not None:
        inv = inverse.to(v.dtype) * torch.linalg.vector_norm(vectors, dim=0)[:, None].to(v.dtype)  # unit-column V's
        if basis is not None:
            mat_inv = real_inverse(inv, *basis[1:])
            return condition(mat, mat_inv)
        return condition(mat, inv)
    g = torch.linalg.eigvalsh(mat.mH @ mat)
    if float(g[0]) > 1e-8 * float(g[-1]):
        return math.sqrt(float(g[-1]) / float(g[0]))
    sv = torch.linalg.svdvals(mat)
    return float(sv[0] / sv[-1]) if float(sv[-1]) > 0 else math.inf


def resdmd_residuals(op: DMDOperator, eigenvalues: torch.Tensor, left: torch.Tensor, eps_r: float) -> torch.Tensor:
    """Eq. 10 for every mode: ||u^*(Yb - lam Xb)|| / (||u^* Xb|| + eps_r), from the Gram blocks.

    ``left`` holds the left eigenvectors as columns (u_j^* A~ = lam_j u_j^*);
    ||u^*(Yb - lam Xb)||^2 = u^* GG u - 2 Re(conj(lam) u^* GH u) + |lam|^2 u^* Hb u.
    When ``left``'s columns are real or adjacent conjugate pairs (the left eigenvectors of a real A~ as
    ``eigen`` returns them) and the Grams are real, the quadratic forms run in real arithmetic on one
    real vector per pair (``_real_residuals``), ~8x cheaper than complex products.
    """
    left = left.detach().resolve_conj()
    basis = real_basis(left) if not (op.gg.is_complex() or op.gh.is_complex()) else None
    if basis is not None:
        wr, jp, jq, jr = basis  # columns sqrt2 Re u_p, sqrt2 Im u_p, u_r
        return _real_residuals(op, eigenvalues, wr.T, jp, jq, jr, eps_r)
    u = left.to(torch.complex128)
    gg, gh = op.gg.detach().to(u.dtype), op.gh.detach().to(u.dtype)
    hb = op.hb.detach().double()
    uu = (u.conj() * (gg @ u)).sum(0).real
    uh = (u.conj() * (gh @ u)).sum(0)
    xx = ((u.abs() ** 2) * hb[:, None]).sum(0)
    lam = eigenvalues.to(u.dtype)
    num = (uu - 2 * (lam.conj() * uh).real + lam.abs() ** 2 * xx).clamp_min(0).sqrt()
    return num / (xx.sqrt() + eps_r)


def _real_residuals(op: DMDOperator, eigenvalues: torch.Tensor, rows: torch.Tensor, jp: torch.Tensor,
                    jq: torch.Tensor, jr: torch.Tensor, eps_r: float) -> torch.Tensor:
    """``resdmd_residuals`` from real rows [a_p; b_p; c_r] with u_p = (a_p + i b_p) / sqrt2 the left
    eigenvector of lam_p, u_q = conj(u_p) that of lam_q, u_r = c_r (real) that of lam_r (these rows are
    ``real_basis``'s Wr^-1 for the left eigenvectors of ``eigen``).  With u = (a + i b) / sqrt2 and a real G:
    u^* G u = (a^T G a + b^T G b) / 2 + i (a^T G b - b^T G a) / 2; one real product R [GG^T GH^T].
    """
    r = rows.detach().double()
    m = r.shape[0]
    npair = jp.numel()
    gg, gh = op.gg.detach().double(), op.gh.detach().double()
    hb = op.hb.detach().double()
    prod = r @ torch.cat([gg.T, gh.T], 1)  # row j: (GG r_j)^T, (GH r_j)^T
    pg, ph = prod[:, :m], prod[:, m:]
    qg = (r * pg).sum(1)  # r_j^T GG r_j
    qh = (r * ph).sum(1)  # r_j^T GH r_j
    qx = (r * r * hb).sum(1)  # r_j^T Hb r_j
    uu = torch.empty(m, dtype=torch.float64)
    xx = torch.empty(m, dtype=torch.float64)
    uh = torch.empty(m, dtype=torch.complex128)
    a, b = slice(0, npair), slice(npair, 2 * npair)
    uu[jp] = uu[jq] = (qg[a] + qg[b]) / 2
    xx[jp] = xx[jq] = (qx[a] + qx[b]) / 2
    cross = ((r[a] * ph[b]).sum(1) - (r[b] * ph[a]).sum(1)) / 2  # (a^T GH b - b^T GH a) / 2
    uh_p = torch.complex((qh[a] + qh[b]) / 2, cross)
    uh[jp], uh[jq] = uh_p, uh_p.conj()
    uu[jr], xx[jr], uh[jr] = qg[2 * npair:], qx[2 * npair:], qh[2 * npair:].to(torch.complex128)
    lam = eigenvalues.detach().to(torch.complex128)
    lr, li = lam.real, lam.imag
    num = (uu - 2 * (lr * uh.real + li * uh.imag) + (lr * lr + li * li) * xx).clamp_min(0).sqrt()
    return num / (xx.sqrt() + eps_r)


def nonlinearity_ratio(op: DMDOperator, wh, eps_nl: float) -> tuple[float, float, float]:
    """(eta_nl, ||Y~ - X~||_F, ||X~||_F), Eq. 5, from the Gram blocks (+ what lies outside range(X~), full only).

    ||Y~ - A X~||^2 = tr GG - tr(GH Hb^-1 GH^T) on the basis; the difference
    Y~ - X~ in the basis is Yb - Xb, ||.||^2 = tr GG - 2 tr GH + tr Hb.
    """
    gg, gh, hb = op.gg.detach(), op.gh.detach(), op.hb.detach()
    fit = float(torch.trace(gg) - ((gh / hb.sqrt()[None, :]) ** 2).sum())
    upd = float(torch.trace(gg) - 2 * torch.trace(gh) + hb.sum())
    if op.full:
        fit_out, upd_out = wh.outside()
        fit, upd = fit + fit_out, upd + upd_out
    fit, upd = math.sqrt(max(fit, 0.0)), math.sqrt(max(upd, 0.0))
    return fit / (upd + eps_nl), upd, math.sqrt(float(hb.sum()))


@dataclass
class _Decomposition:
    """An eigen-decomposition of A~ with what the features share: the real form of V and its inverse."""

    lam: torch.Tensor  # (m,) eigenvalues
    vec: torch.Tensor  # unit-norm right eigenvectors V
    inv: torch.Tensor  # V^-1 (inf when V is singular to working precision)
    basis: tuple | None  # ``real_basis(V)``: (Wr, jp, jq, jr), or None
    wr_inv: torch.Tensor | None  # Wr^-1 (None without a real basis or when singular)
    finite: bool  # V^-1 is finite


def _decompose(op: DMDOperator) -> _Decomposition:
    lam, vec = torch.linalg.eig(op.matrix.detach())
    vec = unit_columns(vec)
    basis = real_basis(vec)
    wr_inv = None
    try:
        if basis is not None:
            wr_inv = torch.linalg.inv(basis[0])
            inv = complex_inverse(wr_inv, *basis[1:])
        else:
            inv = torch.linalg.inv(vec)
    except RuntimeError:  # defective to working precision
        inv, wr_inv = torch.full_like(vec, complex(math.inf, 0)), None
    return _Decomposition(lam, vec, inv, basis, wr_inv, all_finite(inv))


def eigen(op: DMDOperator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eigenvalues, unit-norm right eigenvectors V, V^-1) of A~ (no gradient).

    V^-1 of a real A~ comes from the real matrix Wr of ``real_basis`` (V = Wr U, U unitary:
    V^-1 = U^* Wr^-1), a real inverse ~4x cheaper than the complex one, with rows of conjugate
    pairs exactly conjugate.
    """
    dec = _decompose(op)
    return dec.lam, dec.vec, dec.inv


def _kappa(dec: _Decomposition) -> float:
    """``eigvec_condition`` of the decomposition, from the inverse already computed."""
    if not dec.finite:
        return math.inf
    if dec.basis is not None and dec.wr_inv is not None:
        return condition(dec.basis[0], dec.wr_inv)
    return condition(dec.vec, dec.inv)


def _residuals(op: DMDOperator, dec: _Decomposition, eps_r: float) -> torch.Tensor:
    """``resdmd_residuals`` for the left eigenvectors of the decomposition (rows of V^-1)."""
    if not dec.finite:
        return torch.full(dec.lam.shape, math.inf)
    if dec.basis is not None and dec.wr_inv is not None and not (op.gg.is_complex() or op.gh.is_complex()):
        # left eigenvector u_p = conj(row p of V^-1)^T = (a + i b) / sqrt2 for Wr^-1's rows a, b of pair p
        return _real_residuals(op, dec.lam, dec.wr_inv, *dec.basis[1:], eps_r)
    return resdmd_residuals(op, dec.lam, dec.inv.mH, eps_r)


def features_of(op: DMDOperator, wh, config: RKSPConfig = RKSPConfig()) -> BlockFeatures:
    """Every v2 feature of one operator (see module doc)."""
    dec = _decompose(op)
    lam, vec, inv = dec.lam, dec.vec, dec.inv
    masses = mass_partition(lam, config)
    finite_inv = dec.finite
    kappa = _kappa(dec)
    res = _residuals(op, dec, config.eps_r)
    kept = res <= config.resdmd_tau
    kept_masses = mass_partition(lam[kept], config)
    eta, upd, xnorm = nonlinearity_ratio(op, wh, config.eps_nl)
    kreiss = (kreiss_core(lam, vec, inv, basis=dec.basis) if config.kreiss and finite_inv
              else (math.inf if config.kreiss else None))
    flags = []
    if upd <= config.identity_tol * xnorm:
        flags.append("near_identity")
    if wh.k < min(wh.n - 1, wh.d):
        flags.append("rank_deficient")
    resf = res[torch.isfinite(res)]
    return BlockFeatures(
        **{k: masses[k] for k in ("near_unit_mass", "expansive_mass", "mid_mass", "contractive_mass")},
        spectral_radius=float(lam.abs().max()),
        eigvec_condition=_finite_or_none(kappa),
        nonlinearity_ratio=eta,
        kreiss_constant=None if kreiss is None else _finite_or_none(kreiss),
        resdmd_kept=float(kept.double().mean()),
        resdmd_residual_median=float(resf.quantile(0.5)) if resf.numel() else None,
        resdmd_residual_max=float(resf.max()) if resf.numel() else None,
        **{f"{k}_kept": kept_masses[k] for k in ("near_unit_mass", "expansive_mass", "mid_mass", "contractive_mass")},
        m=op.m, rank=wh.k, eigenvalues=lam, flags=flags,
    )


def check_snapshots(x, y) -> None:
    """What :func:`profile_block` takes, refused as a SnapshotError before any algebra (which would fail
    with the linear-algebra library's own error): real tensors (float, integer or bool) with no NaN or inf.
    Shapes are checked by ``whiten``."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise SnapshotError(f"snapshots must be torch tensors; `{name}` is a {type(t).__name__}")
        if t.is_complex():
            raise SnapshotError(f"snapshots must be real; `{name}` is {t.dtype}")
    for name, t in (("x", x), ("y", y)):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
            bad = int((~torch.isfinite(t.detach())).sum())
            raise SnapshotError(f"snapshots must be finite; `{name}` holds {bad} NaN/inf value(s)")


def profile_block(x: torch.Tensor, y: torch.Tensor, config: RKSPConfig = RKSPConfig(), *,
                  generator: torch.Generator | None = None) -> BlockFeatures:
    """RKSP v2 of one block from its (N x d) input and output snapshots."""
    if not isinstance(config, RKSPConfig):
        raise ConfigError("config must be an RKSPConfig")
    check_snapshots(x, y)
    wh = whiten(x, y, eps=config.eps, rel_cut=config.rel_cut)
    op = dmd_operator(wh, config.rank, generator=generator, oversample=config.oversample,
                      power_iters=config.power_iters, sketch=config.sketch)
    return features_of(op, wh, config)
