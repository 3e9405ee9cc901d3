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
    "KSSConfig",
    "KSSTrainer",
    "RKSPMonitorCallback",
]

_LAZY = {"KSSConfig", "KSSTrainer", "RKSPMonitorCallback"}


def __getattr__(name):
    # The trainer imports transformers.Trainer (heavy): load it only when asked for.
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
