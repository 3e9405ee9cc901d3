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

from ..errors import ConfigError
from .kreiss import complex_inverse, kreiss_constant, real_basis, unit_columns
from .operator import OVERSAMPLE, POWER_ITERS, DMDOperator, dmd_operator
from .whitening import EPS, REL_CUT, whiten


@dataclass(frozen=True)
class RKSPConfig:
    """Every parameter of RKSP v2, defaulting to the paper's values (PAPER.md).

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
        )
        for param, ok, message in checks:
            if not ok:
                raise ConfigError(message, param=param)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Feature:
    """One scalar per-block feature: how to name it, print it and aggregate it."""

    name: str
    label: str  # for tables and plot axes
    symbol: str  # the paper's symbol
    fmt: str = ".4f"
    unbounded: bool = False  # may be infinite (stored as null)


#: Every scalar feature of a block, in the order tables show them.
FEATURES: tuple[Feature, ...] = (
    Feature("near_unit_mass", "near-unit mass", "M_~1"),
    Feature("expansive_mass", "expansive mass", "M_>1"),
    Feature("mid_mass", "intermediate mass", "M_mid"),
    Feature("contractive_mass", "contractive mass", "M_<1"),
    Feature("spectral_radius", "spectral radius", "rho"),
    Feature("eigvec_condition", "eigenvector condition number", "kappa(V)", ".4g", unbounded=True),
    Feature("nonlinearity_ratio", "nonlinearity ratio", "eta_nl"),
    Feature("kreiss_constant", "Kreiss constant of A/max(rho,1)", "K", ".4g", unbounded=True),
    Feature("resdmd_kept", "share of modes with ResDMD residual <= tau", "kept"),
    Feature("resdmd_residual_median", "median ResDMD residual", "r_med", ".4g"),
    Feature("resdmd_residual_max", "largest ResDMD residual", "r_max", ".4g"),
    Feature("near_unit_mass_kept", "near-unit mass of the kept modes", "M_~1^kept"),
    Feature("expansive_mass_kept", "expansive mass of the kept modes", "M_>1^kept"),
    Feature("mid_mass_kept", "intermediate mass of the kept modes", "M_mid^kept"),
    Feature("contractive_mass_kept", "contractive mass of the kept modes", "M_<1^kept"),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)


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


def eigvec_condition(vectors: torch.Tensor) -> float:
    """kappa(V) = ||V||_2 ||V^-1||_2 with every right eigenvector scaled to unit norm (inf if singular).

    For the eigenvectors of a real operator (real columns and adjacent conjugate pairs, as
    torch.linalg.eig returns them), kappa(V) = kappa(Wr) for the real matrix Wr of ``real_basis``
    (V = Wr U, U unitary): everything below runs in real arithmetic, ~4x cheaper.  From the
    eigenvalues of the Gram M^* M (M = Wr or V; 3x cheaper than an SVD) while they resolve kappa
    (kappa^2 well below 1 / float64 eps); from singular values beyond.
    """
    v = unit_columns(vectors)
    basis = real_basis(v)
    mat = basis[0] if basis is not None else v
    g = torch.linalg.eigvalsh(mat.mH @ mat)
    if float(g[0]) > 1e-8 * float(g[-1]):
        return math.sqrt(float(g[-1]) / float(g[0]))
    sv = torch.linalg.svdvals(mat)
    return float(sv[0] / sv[-1]) if float(sv[-1]) > 0 else math.inf


def resdmd_residuals(op: DMDOperator, eigenvalues: torch.Tensor, left: torch.Tensor, eps_r: float) -> torch.Tensor:
    """Eq. 10 for every mode: ||u^*(Yb - lam Xb)|| / (||u^* Xb|| + eps_r), from the Gram blocks.

    ``left`` holds the left eigenvectors as columns (u_j^* A~ = lam_j u_j^*);
    ||u^*(Yb - lam Xb)||^2 = u^* GG u - 2 Re(conj(lam) u^* GH u) + |lam|^2 u^* Hb u.
    """
    u = left.to(torch.complex128)
    gg, gh = op.gg.detach().to(u.dtype), op.gh.detach().to(u.dtype)
    hb = op.hb.detach().double()
    uu = (u.conj() * (gg @ u)).sum(0).real
    uh = (u.conj() * (gh @ u)).sum(0)
    xx = ((u.abs() ** 2) * hb[:, None]).sum(0)
    lam = eigenvalues.to(u.dtype)
    num = (uu - 2 * (lam.conj() * uh).real + lam.abs() ** 2 * xx).clamp_min(0).sqrt()
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


def eigen(op: DMDOperator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eigenvalues, unit-norm right eigenvectors V, V^-1) of A~ (no gradient).

    V^-1 of a real A~ comes from the real matrix Wr of ``real_basis`` (V = Wr U, U unitary:
    V^-1 = U^* Wr^-1), a real inverse ~4x cheaper than the complex one, with rows of conjugate
    pairs exactly conjugate.
    """
    lam, vec = torch.linalg.eig(op.matrix.detach())
    vec = unit_columns(vec)
    basis = real_basis(vec)
    try:
        inv = complex_inverse(torch.linalg.inv(basis[0]), *basis[1:]) if basis is not None else torch.linalg.inv(vec)
    except RuntimeError:  # defective to working precision
        inv = torch.full_like(vec, complex(math.inf, 0))
    return lam, vec, inv


def features_of(op: DMDOperator, wh, config: RKSPConfig = RKSPConfig()) -> BlockFeatures:
    """Every v2 feature of one operator (see module doc)."""
    lam, vec, inv = eigen(op)
    masses = mass_partition(lam, config)
    finite_inv = bool(torch.isfinite(torch.view_as_real(inv)).all())
    kappa = eigvec_condition(vec) if finite_inv else math.inf
    res = resdmd_residuals(op, lam, inv.mH, config.eps_r) if finite_inv else torch.full(lam.shape, math.inf)
    kept = res <= config.resdmd_tau
    kept_masses = mass_partition(lam[kept], config)
    eta, upd, xnorm = nonlinearity_ratio(op, wh, config.eps_nl)
    kreiss = kreiss_constant(lam, vec, inv) if config.kreiss and finite_inv else (math.inf if config.kreiss else None)
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


def profile_block(x: torch.Tensor, y: torch.Tensor, config: RKSPConfig = RKSPConfig(), *,
                  generator: torch.Generator | None = None) -> BlockFeatures:
    """RKSP v2 of one block from its (N x d) input and output snapshots."""
    if not isinstance(config, RKSPConfig):
        raise ConfigError("config must be an RKSPConfig")
    wh = whiten(x, y, eps=config.eps, rel_cut=config.rel_cut)
    op = dmd_operator(wh, config.rank, generator=generator, oversample=config.oversample,
                      power_iters=config.power_iters)
    return features_of(op, wh, config)
