"""The registry of per-block features: one ``Feature`` per scalar, with how to name, print and bound it.

Tables, plots, the audit JSON schema, compare and the summary all read it; a new feature is one entry here
(and its computation in ``features.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feature:
    """One scalar per-block feature: how to name it, print it and bound it.

    Every feature is aggregated over blocks the same way (mean, max, min, std and the depth thirds:
    ``hf_rksp.record.summary``); ``lo``/``hi`` and ``nullable`` are what the audit JSON schema allows.
    """

    name: str
    label: str  # for tables and plot axes
    symbol: str  # the paper's symbol
    fmt: str = ".4f"
    unbounded: bool = False  # may be infinite (stored as null)
    lo: float | None = 0  # smallest value (None: no bound)
    hi: float | None = None  # largest value (None: no bound); 1 for shares
    nullable: bool = False  # may be null: infinite (unbounded), or undefined for some blocks

    def json_schema(self) -> dict:
        """The JSON Schema of one block's value."""
        out: dict = {"type": ["number", "null"] if self.nullable or self.unbounded else "number"}
        if self.lo is not None:
            out["minimum"] = self.lo
        if self.hi is not None:
            out["maximum"] = self.hi
        return out


#: Every scalar feature of a block, in the order tables show them.
FEATURES: tuple[Feature, ...] = (
    Feature("near_unit_mass", "near-unit mass", "M_~1", hi=1),
    Feature("expansive_mass", "expansive mass", "M_>1", hi=1),
    Feature("mid_mass", "intermediate mass", "M_mid", hi=1),
    Feature("contractive_mass", "contractive mass", "M_<1", hi=1),
    Feature("spectral_radius", "spectral radius", "rho"),
    Feature("eigvec_condition", "eigenvector condition number", "kappa(V)", ".4g", unbounded=True, lo=None),
    Feature("nonlinearity_ratio", "nonlinearity ratio", "eta_nl"),
    Feature("kreiss_constant", "Kreiss constant of A/max(rho,1)", "K", ".4g", unbounded=True, lo=None),
    Feature("resdmd_kept", "share of modes with ResDMD residual <= tau", "kept", hi=1),
    Feature("resdmd_residual_median", "median ResDMD residual", "r_med", ".4g", lo=None, nullable=True),
    Feature("resdmd_residual_max", "largest ResDMD residual", "r_max", ".4g", lo=None, nullable=True),
    # the masses of the kept modes are undefined (null) for a block none of whose modes is kept
    Feature("near_unit_mass_kept", "near-unit mass of the kept modes", "M_~1^kept", hi=1, nullable=True),
    Feature("expansive_mass_kept", "expansive mass of the kept modes", "M_>1^kept", hi=1, nullable=True),
    Feature("mid_mass_kept", "intermediate mass of the kept modes", "M_mid^kept", hi=1, nullable=True),
    Feature("contractive_mass_kept", "contractive mass of the kept modes", "M_<1^kept", hi=1, nullable=True),
)


FEATURE_NAMES = tuple(f.name for f in FEATURES)

