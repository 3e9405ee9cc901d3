"""hf-rksp: Residual Koopman Spectral Profiling (RKSP v2) audits and KSS for Hugging Face transformers."""

from hf_rksp import _moved
from hf_rksp.errors import RKSPError
from hf_rksp.pipeline.options import AuditOptions
from hf_rksp.pipeline.preflight import PreflightOptions, preflight
from hf_rksp.pipeline.run import AuditResult, audit
from hf_rksp.record import AuditRecord, PreflightResult, read_audit
from hf_rksp.spectral import (
    FEATURES,
    BlockFeatures,
    RKSPConfig,
    kss_penalty,
    profile_block,
)
from hf_rksp.version import __version__

_moved.install()

__all__ = [
    "__version__",
    "audit",
    "AuditOptions",
    "preflight",
    "PreflightOptions",
    "PreflightResult",
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
    "KSSMixin",
    "KSSTrainer",
    "kss_trainer",
    "RKSPMonitorCallback",
]

_LAZY = {"KSSConfig", "KSSMixin", "KSSTrainer", "kss_trainer", "RKSPMonitorCallback"}


def __getattr__(name):
    # The trainer imports transformers.Trainer (heavy): load it only when asked for.
    if name in _LAZY:
        from hf_rksp.training import monitor, trainer

        return getattr(monitor if name == "RKSPMonitorCallback" else trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
