"""Compare two audits (a base model and its fine-tune, init vs trained, two seeds...)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hf_rksp.capture.profile import ProfileOptions
from hf_rksp.errors import AuditFileError
from hf_rksp.record.records import AuditRecord, read_audit
from hf_rksp.report import plots
from hf_rksp.spectral import FEATURES
from hf_rksp.utils.options import option_fields

#: model-level rows: (feature, aggregate)
SUMMARY_ROWS = tuple((f.name, "mean") for f in FEATURES) + (("spectral_radius", "max"),)
#: method parameters that make two audits' numbers incomparable when they differ: the options marked
#: ``compared`` (the profiling options here, then the calibration size, an audit option of the pipeline layer above,
#: which tests/test_compare.py keeps equal to ``hf_rksp.pipeline.options.COMPARED``); each a MethodRecord field
METHOD_FIELDS = tuple(f.name for f, meta in option_fields(ProfileOptions) if meta.compared) + ("tokens",)


def load_audit(ref: str | Path, out_dir: str | Path = ".") -> AuditRecord:
    """An audit from a path to audit.json, an audit directory, or a slug under ``out_dir``/audits."""
    p = Path(ref)
    for c in (p, p / "audit.json", Path(out_dir) / "audits" / str(ref) / "audit.json"):
        if c.is_file():
            return read_audit(c)
    raise AuditFileError(f"no audit found for {ref!r} (a path to audit.json, an audit directory, or a slug)")


def _delta(a, b):
    """b - a, or None where either is missing or the difference overflows (JSON has no infinity)."""
    if a is None or b is None:
        return None
    d = b - a
    return d if math.isfinite(d) else None


@dataclass(frozen=True)
class ComparedAudit:
    """Which audit is A (or B)."""

    slug: str
    id: str
    init: bool

    def to_dict(self) -> dict:
        return {"slug": self.slug, "id": self.id, "init": self.init}


@dataclass(frozen=True)
class SummaryDelta:
    """One model-level number in both audits, and b - a (None where either is missing or it overflows);
    ``n_a``/``n_b``: how many blocks each aggregate counts (fewer than the blocks where a block has no
    value, e.g. the means over kept modes of blocks that kept none)."""

    a: float | None
    b: float | None
    delta: float | None
    n_a: int | None = None
    n_b: int | None = None

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "delta": self.delta, "n_a": self.n_a, "n_b": self.n_b}


@dataclass(frozen=True)
class BlockDelta:
    """One block's feature differences b - a, by feature name in registry order."""

    index: int
    deltas: dict[str, float | None]

    def delta(self, name: str) -> float | None:
        return self.deltas[name]

    def to_dict(self) -> dict:
        return {"index": self.index, **{f"{name}_delta": d for name, d in self.deltas.items()}}


@dataclass(frozen=True)
class Comparison:
    """Two audits compared: ``to_dict()`` is the JSON that `hf-rksp compare --json` prints."""

    a: ComparedAudit
    b: ComparedAudit
    summary: dict[str, SummaryDelta]  # "<feature>_<aggregate>" (SUMMARY_ROWS) -> the two values and the delta
    blocks: list[BlockDelta]  # empty when the depths differ
    warnings: list[str]
    verdict: str

    def to_dict(self) -> dict:
        return {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "summary": {k: v.to_dict() for k, v in self.summary.items()},
            "blocks": [r.to_dict() for r in self.blocks],
            "warnings": list(self.warnings),
            "verdict": self.verdict,
        }

    def to_csv(self, path_or_buf=None) -> str | None:
        """The comparison as one long CSV table ``row,block,a,n_a,b,n_b,delta``: a row per summary entry
        (``block`` empty), then, when the depths agree, a row per block and main feature with its B - A only
        (``block`` its index).  The text when ``path_or_buf`` is None, else written to that path or buffer."""
        from hf_rksp.utils.atomic import write_csv

        rows = [[k, None, v.a, v.n_a, v.b, v.n_b, v.delta] for k, v in self.summary.items()]
        rows += [[name, r.index, None, None, None, None, d] for r in self.blocks for name, d in r.deltas.items()]
        return write_csv(["row", "block", "a", "n_a", "b", "n_b", "delta"], rows, path_or_buf)


def compare(a: AuditRecord, b: AuditRecord) -> Comparison:
    """Per-block and model-level differences b - a, with a short verdict (same method version only).

    Returns the comparison whose ``to_dict()`` `hf-rksp compare --json` prints.
    """
    va, vb = a.method.version, b.method.version
    if va != vb:
        raise AuditFileError(f"cannot compare an RKSP v{va} audit with an RKSP v{vb} audit: re-run the older one")
    na, nb = len(a.blocks), len(b.blocks)
    same_depth = na == nb
    per_block = []
    if same_depth:
        for ba, bb in zip(a.blocks, b.blocks):
            per_block.append(BlockDelta(index=ba.index, deltas={f.name: _delta(ba.value(f.name), bb.value(f.name))
                                                                for f in FEATURES}))
    fa, fb = a.summary.features, b.summary.features
    summary = {}
    for name, agg in SUMMARY_ROWS:
        xa, xb = getattr(fa[name], agg), getattr(fb[name], agg)
        summary[f"{name}_{agg}"] = SummaryDelta(a=xa, b=xb, delta=_delta(xa, xb), n_a=fa[name].n, n_b=fb[name].n)
    warnings = []
    for field in METHOD_FIELDS:
        xa, xb = getattr(a.method, field), getattr(b.method, field)
        if xa != xb:
            warnings.append(f"method.{field} differs ({xa} vs {xb})")
    if a.inputs.sha256 != b.inputs.sha256:
        warnings.append("calibration tokens differ (different tokenizer, text or seed)")
    if not same_depth:
        warnings.append(f"block counts differ ({na} vs {nb}): per-block differences omitted")
    ma, mb = a.summary.score, b.summary.score
    ra, rb = fa["spectral_radius"].max, fb["spectral_radius"].max
    moved = max(per_block, key=lambda r: abs(r.delta("near_unit_mass")), default=None)
    verdict = (f"B vs A: near-unit mass M {ma:.3f} -> {mb:.3f} ({mb - ma:+.3f}); "
               f"max spectral radius {ra:.3f} -> {rb:.3f} ({rb - ra:+.3f}).")
    if moved is not None:
        verdict += (f" Largest per-block change in near-unit mass: block {moved.index} "
                    f"({moved.delta('near_unit_mass'):+.3f}).")
    return Comparison(
        a=ComparedAudit(slug=a.slug, id=a.source.id, init=a.source.init),
        b=ComparedAudit(slug=b.slug, id=b.source.id, init=b.source.init),
        summary=summary,
        blocks=per_block,
        warnings=warnings,
        verdict=verdict,
    )


def compare_png(a: AuditRecord, b: AuditRecord) -> bytes:
    """Both profiles on one figure, against relative depth so different depths still line up."""
    fig, (ax1, ax2) = plots.subplots(2, 1, figsize=(7, 5), sharex=True)
    for audit, style in ((a, "o-"), (b, "s--")):
        n = len(audit.blocks)
        depth = [i / max(1, n - 1) for i in range(n)]
        label = plots.title(audit)
        ax1.plot(depth, [x.near_unit_mass for x in audit.blocks], style, ms=3, label=label)
        ax2.plot(depth, [x.spectral_radius for x in audit.blocks], style, ms=3, label=label)
    ax1.set_ylabel("near-unit mass")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_ylabel("spectral radius")
    ax2.set_xlabel("relative depth")
    ax1.set_title("RKSP profiles compared")
    return plots.to_png(fig)
