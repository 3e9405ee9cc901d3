"""Compare two audits (a base model and its fine-tune, init vs trained, two seeds...)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import RKSPError
from .report import validate_audit

FEATURES = ("near_unit_mass", "spectral_radius", "outside_mass", "fit_r2")


def load_audit(ref: str | Path, out_dir: str | Path = ".") -> dict:
    """An audit from a path to audit.json, an audit directory, or a slug under ``out_dir``/audits."""
    p = Path(ref)
    candidates = [p, p / "audit.json", Path(out_dir) / "audits" / str(ref) / "audit.json"]
    for c in candidates:
        if c.is_file():
            try:
                data = json.loads(c.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RKSPError(f"{c} is not valid JSON: {e}") from None
            validate_audit(data)
            return data
    raise RKSPError(f"no audit found for {ref!r} (a path to audit.json, an audit directory, or a slug)")


def compare(a: dict, b: dict) -> dict:
    """Per-block and model-level differences b - a, with a short verdict."""
    na, nb = len(a["blocks"]), len(b["blocks"])
    same_depth = na == nb
    per_block = []
    if same_depth:
        for ba, bb in zip(a["blocks"], b["blocks"]):
            per_block.append({"index": ba["index"], **{f"{f}_delta": bb[f] - ba[f] for f in FEATURES}})
    sa, sb = a["summary"], b["summary"]
    keys = ("near_unit_mass", "spectral_radius_max", "spectral_radius_mean", "outside_mass_mean", "fit_r2_mean")
    summary = {k: {"a": sa[k], "b": sb[k], "delta": sb[k] - sa[k]} for k in keys}
    warnings = []
    for field in ("delta", "tokens", "rank", "version"):
        if a["method"][field] != b["method"][field]:
            warnings.append(f"method.{field} differs ({a['method'][field]} vs {b['method'][field]})")
    if a["inputs"]["sha256"] != b["inputs"]["sha256"]:
        warnings.append("calibration tokens differ (different tokenizer, text or seed)")
    if not same_depth:
        warnings.append(f"block counts differ ({na} vs {nb}): per-block differences omitted")
    dm = summary["near_unit_mass"]["delta"]
    dr = summary["spectral_radius_max"]["delta"]
    moved = max(per_block, key=lambda r: abs(r["near_unit_mass_delta"]), default=None)
    verdict = (
        f"B vs A: near-unit mass M {sa['near_unit_mass']:.3f} -> {sb['near_unit_mass']:.3f} ({dm:+.3f}); "
        f"max spectral radius {sa['spectral_radius_max']:.3f} -> {sb['spectral_radius_max']:.3f} ({dr:+.3f})."
    )
    if moved is not None:
        verdict += f" Largest per-block change in near-unit mass: block {moved['index']} ({moved['near_unit_mass_delta']:+.3f})."
    return {
        "a": {"slug": a["slug"], "id": a["source"]["id"], "init": a["source"]["init"]},
        "b": {"slug": b["slug"], "id": b["source"]["id"], "init": b["source"]["init"]},
        "summary": summary,
        "blocks": per_block,
        "warnings": warnings,
        "verdict": verdict,
    }


def compare_png(a: dict, b: dict) -> bytes:
    """Both profiles on one figure, against relative depth so different depths still line up."""
    from . import plots

    plt = plots.plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for audit, style in ((a, "o-"), (b, "s--")):
        n = len(audit["blocks"])
        depth = [i / max(1, n - 1) for i in range(n)]
        label = plots.title(audit)
        ax1.plot(depth, [x["near_unit_mass"] for x in audit["blocks"]], style, ms=3, label=label)
        ax2.plot(depth, [x["spectral_radius"] for x in audit["blocks"]], style, ms=3, label=label)
    ax1.set_ylabel("near-unit mass")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_ylabel("spectral radius")
    ax2.set_xlabel("relative depth")
    ax1.set_title("RKSP profiles compared")
    return plots.to_png(fig)
