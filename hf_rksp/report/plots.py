"""Plots of an audit, rendered to PNG bytes (written atomically by the report)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, LogLocator

from hf_rksp.record.records import AuditRecord

# Figure objects, never pyplot: importing hf_rksp does not touch matplotlib's backend or global state.


def subplots(*args, **kwargs):
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def title(audit: AuditRecord) -> str:
    src = audit.source
    name = src.id if src.kind == "hub" or src.path else Path(src.id).name
    return name + (" (random init)" if src.init else "")


def _radii(audit: AuditRecord) -> list[tuple[float, str, str]]:
    m = audit.method
    return [(m.contractive, "contractive edge", "C0"), (m.band_lower, "near-unit band", "C2"),
            (m.band_upper, "expansive edge", "C3")]


def _eigenvalues(block) -> np.ndarray:
    """A block's eigenvalues as an (m, 2) array of [re, im]."""
    return np.asarray(block.eigenvalues, dtype=float).reshape(-1, 2)


def spectrum_png(audit: AuditRecord) -> bytes:
    """Every block's eigenvalues, colored by depth, with the three radii of the mass partition."""
    blocks = audit.blocks
    m = audit.method
    fig, ax = subplots(figsize=(6, 6))
    t = np.linspace(0, 2 * np.pi, 512)
    lo, hi = m.band_lower, m.band_upper
    ax.fill_between(np.cos(t[:257]), lo * np.sin(t[:257]), hi * np.sin(t[:257]), color="0.88", lw=0)
    ax.fill_between(np.cos(t[256:]), lo * np.sin(t[256:]), hi * np.sin(t[256:]), color="0.88", lw=0,
                    label=f"near-unit band {lo:g} <= |λ| <= {hi:g}")
    for r, label, color in _radii(audit):
        ax.plot(r * np.cos(t), r * np.sin(t), color=color, lw=0.8, ls="--", label=f"|λ| = {r:g} ({label})")
    ax.plot(np.cos(t), np.sin(t), color="k", lw=0.6)
    cmap = matplotlib.colormaps["viridis"]
    n = max(1, len(blocks) - 1)
    for b in blocks:
        ev = _eigenvalues(b)
        ax.scatter(ev[:, 0], ev[:, 1], s=5, color=cmap(b.index / n), alpha=0.6, lw=0)
    sm = ScalarMappable(cmap=cmap, norm=Normalize(0, len(blocks) - 1))
    fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.04, label="block")
    mods = np.concatenate([np.hypot(*_eigenvalues(b).T) for b in blocks])
    # frame the bulk of the spectrum: a few huge modes would shrink the circle to a dot
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
    ax.set_title(f"RKSP v{m.version} spectrum — {title(audit)}")
    ax.legend(loc="upper right", fontsize=7)
    return to_png(fig)


MASS_STACK = (("contractive_mass", "contractive |λ| < {contractive:g}", "C0"),
              ("mid_mass", "intermediate", "0.7"),
              ("near_unit_mass", "near-unit [{band_lower:g}, {band_upper:g}]", "C2"),
              ("expansive_mass", "expansive |λ| > {band_upper:g}", "C3"))


def profile_png(audit: AuditRecord) -> bytes:
    """Per block: the stacked mass partition, then kappa(V) and eta_nl."""
    return to_png(profile_figure(audit))


def profile_figure(audit: AuditRecord) -> Figure:
    """:func:`profile_png`'s figure: legends outside the axes, M and each block's near-unit share as lines
    over the stacked bars, κ(V) on a log axis with a tick per decade."""
    blocks = audit.blocks
    m = audit.method
    idx = np.array([b.index for b in blocks])
    fig, (a1, a2) = subplots(2, 1, figsize=(9, 6), sharex=True)
    bottom = np.zeros(len(blocks))
    bands = dict(contractive=m.contractive, band_lower=m.band_lower, band_upper=m.band_upper)
    for name, label, color in MASS_STACK:
        vals = np.array([b.value(name) for b in blocks], dtype=float)
        a1.bar(idx, vals, bottom=bottom, color=color, label=label.format(**bands), width=0.85)
        bottom += vals
    score = audit.summary.score
    # the near-unit share per block as its own line over the stack, and M as a labelled white-edged line:
    # both readable against the segments
    a1.plot(idx, [b.value("near_unit_mass") for b in blocks], color="k", marker="o", ms=3, lw=1.2,
            label="near-unit share of the block")
    a1.axhline(score, color="w", lw=3.0, zorder=3)
    a1.axhline(score, color="k", ls="--", lw=1.2, zorder=4, label=f"mean near-unit mass M = {score:.3f}")
    a1.set_ylabel("share of eigenvalues")
    a1.set_ylim(0, 1.0)
    a1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # outside the bars
    kappa = [np.nan if b.eigvec_condition is None else b.eigvec_condition for b in blocks]
    a2.plot(idx, kappa, marker="o", ms=3, color="C4", label="κ(V)")
    a2.set_yscale("log")
    a2.yaxis.set_major_locator(LogLocator(base=10, numticks=12))  # a tick per decade, even within one
    a2.yaxis.set_minor_locator(LogLocator(base=10, subs=(2, 5), numticks=12))
    a2.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    a2.set_ylabel("κ(V)  (log)")
    a3 = a2.twinx()
    a3.plot(idx, [b.nonlinearity_ratio for b in blocks], marker="s", ms=3, color="C1", label="η_nl")
    a3.set_ylabel("η_nl")
    lines = a2.get_lines() + a3.get_lines()
    a2.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left", bbox_to_anchor=(1.12, 1.0),
              borderaxespad=0.0)
    a2.set_xlabel("block")
    a1.set_title(f"RKSP v{m.version} profile — {title(audit)}")
    return fig


def drawn(render, audit: AuditRecord) -> bytes:
    """``render(audit)``, or a PNG that says why it cannot be drawn: a value like 1e308 is valid JSON and
    valid for the schema, but matplotlib cannot lay out an axis for it, and the audit must still be written."""
    try:
        return render(audit)
    except (ValueError, OverflowError) as e:
        fig, ax = subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{render.__name__}: not drawn, values out of plotting range\n({str(e)[:80]})",
                ha="center", va="center", fontsize=9)
        return to_png(fig)
