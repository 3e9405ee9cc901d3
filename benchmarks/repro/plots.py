"""The analysis's figures (matplotlib Figure objects, no pyplot state)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from hf_rksp.utils import atomic

from .analysis import BASELINES, PREDICTORS, _fmt, baseline_values, label
from .protocol import PAPER
from .stats import auroc

# --- plots (matplotlib Figure objects: no pyplot state) ---------------------------------------------------------

def _fig(w=5.0, h=4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic.write_bytes(path, buf.getvalue())


def roc_points(score, y) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(score, dtype=float), np.asarray(y, dtype=bool)
    thr = np.unique(s)[::-1]
    tpr = [0.0] + [float((s[y] >= t).mean()) for t in thr]
    fpr = [0.0] + [float((s[~y] >= t).mean()) for t in thr]
    return np.array(fpr), np.array(tpr)


def write_plots(protocol, out: Path, t1, pooled, runs, res, fitinfo) -> None:
    y = [label(r) for r in t1]
    fig, ax = _fig()
    if len(set(y)) == 2:
        curves = {k: [PREDICTORS[k](r) for r in t1] for k in ("near_unit_mass", "spectral_radius")}
        curves.update({k: baseline_values(t1, k, carried=True) for k in BASELINES})
        for k, s in curves.items():
            fpr, tpr = roc_points(s, y)
            ax.plot(fpr, tpr, lw=2 if k == "near_unit_mass" else 1, label=f"{k} ({auroc(s, y):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC at init (Table 1 runs, n={len(t1)})")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, out / "roc.png")

    fig, ax = _fig()
    ax.plot([0, 1], [0, 1], color="0.6", ls=":")
    series = [("raw M_~1", res["calibration"]["reliability_raw"], res["calibration"]["ece_raw_score"])]
    if "risk_model" in res["calibration"]:
        rm = res["calibration"]["risk_model"]
        series.append(("risk model (grouped CV)", rm["reliability"], rm["ece"]))
    for name, bins, e in series:
        pts = [(b["mean_p"], b["rate"], b["n"]) for b in bins if b["n"]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name}, ECE {_fmt(e)}")
    ax.set(xlabel="predicted probability of divergence", ylabel="observed divergence rate", xlim=(0, 1),
           ylim=(0, 1), title="Reliability diagram")
    ax.legend(fontsize=8)
    _save(fig, out / "reliability.png")

    fig, ax = _fig()
    k = res["kss"]
    alphas = [(0.0, "none"), (0.10, "alpha_0.10"), (0.15, "alpha_0.15"), (0.20, "alpha_0.20")]
    pts = [(a, k[m]) for a, m in alphas if k[m]["n"]]
    if pts:
        ax.errorbar([a for a, _ in pts], [v["rate"] for _, v in pts],
                    yerr=np.array([[v["rate"] - v["ci95"][0], v["ci95"][1] - v["rate"]] for _, v in pts]).T,
                    marker="o", capsize=3, label="KSS (alpha 0 = no control)")
        for m, ls in (("clip_0.5", "--"), ("clip_1.0", ":")):
            if k[m]["n"]:
                ax.axhline(k[m]["rate"], ls=ls, color="0.4", label=m)
    ax.plot([0, 0.10, 0.15, 0.20], [PAPER["kss"][m] for _, m in alphas], marker="x", color="C3", ls="-.",
            label="paper")
    ax.set(xlabel="KSS alpha", ylabel="divergence rate", ylim=(-0.02, 1.02),
           title=f"No-Norm d{protocol.main[0]} L{protocol.main[1]}, lr {', '.join(f'{x:g}' for x in protocol.kss_lrs)}")
    ax.legend(fontsize=8)
    _save(fig, out / "divergence_vs_alpha.png")

    fig, ax = _fig()
    for i, (norm, v) in enumerate(res["maxlr"].items()):
        for m, ls in (("none", "-"), (protocol.maxlr_method, "--")):
            per = [(float(lr), b["rate"]) for lr, b in v[m]["by_lr"].items() if b["n"]]
            if per:
                ax.plot(*zip(*per), marker="o", ls=ls, color=f"C{i}", label=f"{norm} {'KSS' if m != 'none' else ''}")
    ax.axhline(0.2, color="0.6", ls=":")
    ax.set(xscale="log", xlabel="learning rate", ylabel="divergence rate", ylim=(-0.02, 1.02),
           title="Divergence vs learning rate (solid: no control, dashed: KSS 0.15)")
    ax.legend(fontsize=8)
    _save(fig, out / "divergence_vs_lr.png")
