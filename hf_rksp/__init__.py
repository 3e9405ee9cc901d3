"""hf-rksp: Residual Koopman Spectral Profiling (RKSP v2) audits and KSS for Hugging Face transformers."""

__version__ = "0.1.0"

from .audit import AuditOptions, AuditResult, audit  # noqa: E402
from .errors import RKSPError  # noqa: E402
from .record import AuditRecord, read_audit  # noqa: E402
from .spectral import FEATURES, BlockFeatures, RKSPConfig, kss_penalty, profile_block  # noqa: E402


__all__ = [
    "__version__",
    "audit",
    "AuditOptions",
    "AuditResult",
    "AuditRecord",
    "read_audit",
    "RKSPError",
    "FEATURES",
    "BlockFeatures",
    "RKSPConfig",
    "kss_penalty",
    "profile_block",
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
