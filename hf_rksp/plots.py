"""Plots of an audit, rendered to PNG bytes (written atomically by the report)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def title(audit: dict) -> str:
    src = audit["source"]
    name = src["id"] if src["kind"] == "hub" or src.get("path") else Path(src["id"]).name
    return name + (" (random init)" if src["init"] else "")


def spectrum_png(audit: dict) -> bytes:
    """Every block's eigenvalues over the unit circle and the near-unit band, colored by depth."""
    blocks = audit["blocks"]
    delta = audit["method"]["delta"]
    fig, ax = plt.subplots(figsize=(6, 6))
    t = np.linspace(0, 2 * np.pi, 512)
    ax.fill_between(np.cos(t[:257]), (1 - delta) * np.sin(t[:257]), (1 + delta) * np.sin(t[:257]),
                    color="0.85", lw=0)
    ax.fill_between(np.cos(t[256:]), (1 - delta) * np.sin(t[256:]), (1 + delta) * np.sin(t[256:]),
                    color="0.85", lw=0, label=f"near-unit band |λ| in 1±{delta:g}")
    ax.plot(np.cos(t), np.sin(t), color="k", lw=0.8)
    cmap = plt.get_cmap("viridis")
    n = max(1, len(blocks) - 1)
    for b in blocks:
        ev = np.asarray(b["eigenvalues"], dtype=float).reshape(-1, 2)
        ax.scatter(ev[:, 0], ev[:, 1], s=5, color=cmap(b["index"] / n), alpha=0.6, lw=0)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(blocks) - 1))
    fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.04, label="block")
    mods = np.concatenate([np.hypot(*np.asarray(b["eigenvalues"], dtype=float).reshape(-1, 2).T) for b in blocks])
    # frame the bulk of the spectrum: a few huge modes (often block 0) would shrink the circle to a dot
    lim = max(1.3, 1.1 * float(np.quantile(mods, 0.9)))
    beyond = int((mods > lim).sum())
    if beyond:
        ax.text(0.02, 0.02, f"{beyond} eigenvalue(s) beyond the frame (max |λ| = {mods.max():.3g})",
                transform=ax.transAxes, fontsize=8)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.set_title(f"RKSP spectrum — {title(audit)}")
    ax.legend(loc="upper right", fontsize=8)
    return to_png(fig)


def profile_png(audit: dict) -> bytes:
    """Near-unit mass and spectral radius by block."""
    blocks = audit["blocks"]
    idx = [b["index"] for b in blocks]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    a1.plot(idx, [b["near_unit_mass"] for b in blocks], marker="o", ms=3)
    a1.axhline(audit["summary"]["near_unit_mass"], color="0.5", ls="--", lw=0.8, label="mean M")
    a1.set_ylabel("near-unit mass")
    a1.set_ylim(-0.02, 1.02)
    a1.legend(fontsize=8)
    a2.plot(idx, [b["spectral_radius"] for b in blocks], marker="o", ms=3, color="C3")
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_yscale("log")
    a2.set_ylabel("spectral radius")
    a2.set_xlabel("block")
    a1.set_title(f"RKSP profile — {title(audit)}")
    return to_png(fig)
