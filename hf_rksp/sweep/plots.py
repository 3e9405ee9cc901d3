"""Figures of the divergence sweep: ROC curves (cross-validated) and KSS divergence rates."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import atomic
from ..plots import plt, to_png


def _roc(score: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-score, kind="mergesort")
    ys = y[order]
    tp = np.concatenate([[0], np.cumsum(ys)]) / max(ys.sum(), 1)
    fp = np.concatenate([[0], np.cumsum(1 - ys)]) / max((1 - ys).sum(), 1)
    return fp, tp


def plot_roc(curves: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (s, y) in curves.items():
        fp, tp = _roc(s, y)
        ax.plot(fp, tp, lw=2.2 if name.startswith("RKSP") else 1.2, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Divergence at init: grouped 5-fold CV (each + log lr)")
    ax.legend(fontsize=7, loc="lower right")
    atomic.write_bytes(str(path), to_png(fig))


def plot_kss(kss: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, style in (("off", "o-"), ("on", "s-")):
        e = [x for x in kss["rates"][key] if x["runs"]]
        if not e:
            continue
        lr = np.array([x["lr"] for x in e])
        rate = np.array([x["rate"] for x in e])
        lo = rate - np.array([x["ci95"][0] for x in e])
        hi = np.array([x["ci95"][1] for x in e]) - rate
        ax.errorbar(lr, rate, yerr=[lo, hi], fmt=style, capsize=3, label=f"KSS {key}")
    ax.axhline(kss["threshold"], color="grey", ls=":", lw=1, label=f"{kss['threshold']:.1%}")
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("divergence rate (Wilson 95%)")
    ax.set_title("No normalization: divergence with and without KSS")
    ax.legend(fontsize=8)
    atomic.write_bytes(str(path), to_png(fig))
