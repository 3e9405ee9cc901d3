"""Old module paths (before the package was split into the pipeline's folders) keep importing, with a warning.

``import hf_rksp.trainer`` gives :mod:`hf_rksp.training.trainer` itself (the same module object, so patching
it patches the real one) and a ``DeprecationWarning`` naming the new path.  Modules that were split point to
the part that kept most of their names; the table says where each went.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module (under hf_rksp) -> new module
MOVED = {
    "atomic": "utils.atomic", "record": "record.records", "summary": "record.summary",
    "loading": "models.loading", "blocks": "models.blocks", "init_weights": "models.init",
    "memory": "models.memory", "placement": "models.placement", "gguf_checkpoint": "models.checkpoints.gguf",
    "dequant": "models.checkpoints.dequant", "hub_stream": "models.checkpoints.hub",
    "capture": "capture.hooks", "moe": "capture.routers", "calibration": "capture.calibration",
    "profiling": "capture.profile", "streaming": "capture.streaming", "report": "report.card",
    "plots": "report.plots", "compare": "report.compare", "publish": "publish.local", "hub": "publish.hub",
    "audit": "pipeline.run", "risk": "pipeline.risk", "validation": "pipeline.validation",
    "kss": "training.kss", "trainer": "training.trainer", "cli": "cli.commands",
}


class _Loader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        pass


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds ``hf_rksp.<old>`` for the old names that are no longer packages or modules of their own."""

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, leaf = fullname.rpartition(".")
        # record and cli are packages now, and hf_rksp.audit is the function
        if pkg != "hf_rksp" or leaf not in MOVED or leaf in ("record", "cli", "audit"):
            return None
        new = f"hf_rksp.{MOVED[leaf]}"
        warnings.warn(f"{fullname} moved to {new}; the old path will be removed", DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _Loader(new))


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
