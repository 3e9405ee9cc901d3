"""The one spectral core of hf-rksp (RKSP v2, the paper's method): pure torch, no models, files or flags.

    whitening.py  ZCA whitening with X's covariance + eps I, reduced to range(X~)  (Eqs. 7-9)
    operator.py   A = Y~ X~^+ on range(X~): full, or seeded rank-r randomized DMD (Eq. 6)
    kreiss.py     the Kreiss constant (Eq. 29)
    features.py   mass partition, rho, kappa(V), eta_nl, ResDMD; the typed record; the feature registry
    shaping.py    the differentiable KSS terms (Eqs. 14-15) and eigenvalues safe to differentiate

The audit (no grad) and KSS (with grad) call the same functions.
"""

from hf_rksp.spectral.features import (
                       FEATURE_NAMES,
                       FEATURES,
                       BlockFeatures,
                       Feature,
                       RKSPConfig,
                       eigen,
                       eigvec_condition,
                       features_of,
                       mass_partition,
                       nonlinearity_ratio,
                       profile_block,
                       resdmd_residuals,
)
from hf_rksp.spectral.kreiss import kreiss_constant
from hf_rksp.spectral.operator import (
                       DMDOperator,
                       dmd_operator,
                       full_operator,
                       pod_operator,
                       randomized_operator,
)
from hf_rksp.spectral.shaping import (
                       MAX_CONDITION,
                       Spectrum,
                       differentiable_eigenvalues,
                       eigenvalue_condition,
                       kss_penalty,
                       soft_near_unit_mass,
                       unstable_penalty,
)
from hf_rksp.spectral.whitening import EPS, REL_CUT, Whitened, whiten

METHOD_VERSION = "2"

__all__ = [
    "METHOD_VERSION", "EPS", "REL_CUT", "FEATURES", "FEATURE_NAMES", "Feature", "BlockFeatures", "RKSPConfig",
    "Whitened", "whiten", "DMDOperator", "dmd_operator", "full_operator", "pod_operator", "randomized_operator", "eigen",
    "eigvec_condition", "features_of", "mass_partition", "nonlinearity_ratio", "profile_block",
    "resdmd_residuals", "kreiss_constant", "kss_penalty", "soft_near_unit_mass", "unstable_penalty",
    "MAX_CONDITION", "Spectrum", "differentiable_eigenvalues", "eigenvalue_condition",
]
