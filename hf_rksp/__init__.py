"""hf-rksp: Residual Koopman Spectral Profiling audits for Hugging Face transformers."""

__version__ = "0.1.0"

from .audit import AuditOptions, AuditResult, audit  # noqa: E402
from .errors import RKSPError  # noqa: E402
from .spectral import block_spectrum, dmd_operator, spectral_features, whiten  # noqa: E402

__all__ = [
    "__version__",
    "audit",
    "AuditOptions",
    "AuditResult",
    "RKSPError",
    "block_spectrum",
    "dmd_operator",
    "spectral_features",
    "whiten",
]
