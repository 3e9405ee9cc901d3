"""Analysis of the divergence sweep: grouped-CV AUROC with bootstrap intervals, transfer, KSS rates, risk fit.

Every predictor is a logistic model on its feature(s) plus log10(learning
rate): the learning rate is known before training, so every predictor gets
it.  Cross-validation folds are made of whole configurations (all seeds of a
configuration on the same side).  Intervals are 95% percentile bootstraps
over configurations.  numpy only (no scikit-learn dependency).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from .. import atomic
from ..audit import DEFAULT_RANK, METHOD_VERSION, AuditOptions
from .run import MARGIN, WINDOW

_AUDIT = AuditOptions()  # the sweep's features use the audit's defaults (hf_rksp.sweep.run.rksp_features)

#: predictor name -> list of (row field, transform); "lr only" is the covariate alone
PREDICTORS: dict[str, list[tuple[str, str]]] = {
    "lr only": [],
    "RKSP (M, radius, outside)": [("rksp_near_unit_mass", "id"), ("rksp_spectral_radius_max", "log"),
                                  ("rksp_outside_mass_mean", "id")],
    "RKSP near-unit mass M": [("rksp_near_unit_mass", "id")],
    "global gradient norm": [("grad_norm_global", "log")],
    "max per-block gradient norm": [("grad_norm_block_max", "log")],
    "activation-norm growth": [("activation_growth", "log")],
    "max attention logit": [("attn_max_logit", "log")],
    "min attention entropy": [("attn_min_entropy", "id")],
}
RKSP = "RKSP (M, radius, outside)"
L2 = 0.1  # ridge on standardized coefficients: keeps separable folds finite
FOLDS = 5


def _transform(v: np.ndarray, how: str) -> np.ndarray:
    return np.log10(np.maximum(v, 1e-12)) if how == "log" else v


def design_matrix(rows: list[dict], feats: list[tuple[str, str]]) -> np.ndarray:
    cols = [_transform(np.array([float(r[f]) for r in rows]), how) for f, how in feats]
    cols.append(np.log10(np.array([float(r["lr"]) for r in rows])))
    return np.stack(cols, axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, iters: int = 100) -> dict:
    """Newton-IRLS on standardized columns; returns mean, std, coef, intercept (on standardized inputs)."""
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    z = np.column_stack([np.ones(len(x)), (x - mu) / sd])
    w = np.zeros(z.shape[1])
    pen = np.full(z.shape[1], l2)
    pen[0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -40, 40)))
        grad = z.T @ (p - y) + pen * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(pen + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return {"mean": mu.tolist(), "std": sd.tolist(), "intercept": float(w[0]), "coef": w[1:].tolist()}


def predict(model: dict, x: np.ndarray) -> np.ndarray:
    z = (x - np.array(model["mean"])) / np.array(model["std"])
    return 1.0 / (1.0 + np.exp(-np.clip(model["intercept"] + z @ np.array(model["coef"]), -40, 40)))


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half); nan when one class is absent."""
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _ranks(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _ranks(a: np.ndarray) -> np.ndarray:
    order = a.argsort(kind="mergesort")
    r = np.empty(len(a))
    r[order] = np.arange(1, len(a) + 1)
    s = a[order]
    i = 0
    while i < len(a):  # average ranks of ties
        j = i
        while j + 1 < len(a) and s[j + 1] == s[i]:
            j += 1
        r[order[i: j + 1]] = (i + j + 2) / 2
        i = j + 1
    return r


def grouped_folds(groups: list[str], k: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Fold index per row; every configuration (group) lies in exactly one fold."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(uniq))
    fold_of = {uniq[i]: int(n % k) for n, i in enumerate(perm)}
    return np.array([fold_of[g] for g in groups])


def cv_scores(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    out = np.empty(len(y))
    for f in np.unique(folds):
        test = folds == f
        out[test] = predict(fit_logistic(x[~test], y[~test]), x[test])
    return out


def bootstrap_auroc(score: np.ndarray, y: np.ndarray, groups: list[str], n: int, seed: int = 0) -> list[float]:
    """95% percentile interval of the AUROC, resampling configurations with replacement."""
    g = np.array(groups)
    uniq = np.unique(g)
    idx_of = {u: np.flatnonzero(g == u) for u in uniq}
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        pick = np.concatenate([idx_of[u] for u in rng.choice(uniq, len(uniq))])
        a = auroc(score[pick], y[pick])
        if not math.isnan(a):
            vals.append(a)
    if not vals:
        return [float("nan"), float("nan")]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, c - h), min(1.0, c + h)]


def data_hash(rows: list[dict]) -> str:
    """sha256 of the runs (sorted by id, every recorded field but wall-clock times)."""
    clean = [{k: v for k, v in sorted(r.items()) if not k.endswith("_seconds")}
             for r in sorted(rows, key=lambda r: (r["part"], r["run_id"]))]
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()


def predictor_table(fit: list[dict], transfer: list[dict], bootstrap: int) -> dict:
    y = np.array([float(r["diverged"]) for r in fit])
    groups = [r["config_id"] for r in fit]
    folds = grouped_folds(groups)
    yt = np.array([float(r["diverged"]) for r in transfer])
    gt = [r["config_id"] for r in transfer]
    table, curves = {}, {}
    for name, feats in PREDICTORS.items():
        x = design_matrix(fit, feats)
        s = cv_scores(x, y, folds)
        entry = {"auroc_cv": auroc(s, y), "auroc_cv_ci95": bootstrap_auroc(s, y, groups, bootstrap)}
        if transfer:
            st = predict(fit_logistic(x, y), design_matrix(transfer, feats))
            entry["auroc_transfer"] = auroc(st, yt)
            entry["auroc_transfer_ci95"] = bootstrap_auroc(st, yt, gt, bootstrap)
        # where the signal comes from: the same out-of-fold scores within each normalization
        norms = np.array([r["norm"] for r in fit])
        entry["auroc_cv_within_norm"] = {n: auroc(s[norms == n], y[norms == n]) for n in sorted(set(norms))}
        table[name] = entry
        curves[name] = (s, y)
    m = np.array([r["rksp_near_unit_mass"] for r in fit])
    table["raw near-unit mass M (no model, no lr)"] = {
        "auroc_cv": auroc(m, y), "auroc_cv_ci95": bootstrap_auroc(m, y, groups, bootstrap)}
    if transfer:
        mt = np.array([r["rksp_near_unit_mass"] for r in transfer])
        table["raw near-unit mass M (no model, no lr)"].update(
            auroc_transfer=auroc(mt, yt), auroc_transfer_ci95=bootstrap_auroc(mt, yt, gt, bootstrap))
    return table, curves


def kss_table(rows: list[dict], threshold: float = 0.125) -> dict:
    rates: dict[str, list[dict]] = {"off": [], "on": []}
    for kss, key in ((False, "off"), (True, "on")):
        for lr in sorted({r["lr"] for r in rows}):
            sel = [r for r in rows if r["lr"] == lr and bool(r["kss"]) == kss]
            k = sum(bool(r["diverged"]) for r in sel)
            rates[key].append({"lr": lr, "runs": len(sel), "diverged": k,
                               "rate": k / len(sel) if sel else float("nan"), "ci95": wilson(k, len(sel))})

    def edge(entries):
        ok = [e["lr"] for e in entries if e["runs"] and e["rate"] <= threshold]
        return max(ok) if ok else None

    off, on = edge(rates["off"]), edge(rates["on"])
    return {"rates": rates, "threshold": threshold, "max_lr_off": off, "max_lr_on": on,
            "headroom_ratio": (on / off) if (off and on) else None}


def risk_model(fit: list[dict]) -> dict:
    """The shipped model: RKSP features + log10 lr, fitted on every 'fit' run, with its validity ranges."""
    feats = PREDICTORS[RKSP]
    x = design_matrix(fit, feats)
    y = np.array([float(r["diverged"]) for r in fit])
    model = fit_logistic(x, y)

    def rng(key):
        v = [float(r[key]) for r in fit]
        return [min(v), max(v)]

    return {
        "format": 1,
        "features": [{"name": f, "transform": how} for f, how in feats] + [{"name": "lr", "transform": "log"}],
        **model,
        "l2": L2,
        "n_runs": len(fit),
        "n_diverged": int(y.sum()),
        "divergence_definition": f"non-finite loss, or the {WINDOW}-step mean loss after warm-up above the "
                                 f"initial loss + {MARGIN} nats, within the step budget",
        "valid": {"lr": rng("lr"), "d_model": rng("d_model"), "n_blocks": rng("n_layers"),
                  "rksp_near_unit_mass": rng("rksp_near_unit_mass"),
                  "rksp_spectral_radius_max": rng("rksp_spectral_radius_max"),
                  "rksp_outside_mass_mean": rng("rksp_outside_mass_mean"),
                  "weights": "random init (the sweep audits models before their first step)",
                  "architecture": "decoder-only transformers, GPT-style (pre-LN, post-LN, no norm)"},
        "sweep_data_sha256": data_hash(fit),
        "rksp": {"version": METHOD_VERSION, "delta": _AUDIT.delta, "tokens": _AUDIT.tokens, "rank": DEFAULT_RANK},
    }


def headline(summary: dict) -> dict:
    t = summary["predictors"]
    best_base = max((n for n in t if n not in (RKSP, "RKSP near-unit mass M", "lr only")
                     and not n.startswith("raw")), key=lambda n: t[n]["auroc_cv"])
    return {"runs": summary["runs"], "divergence_rate_fit": summary["divergence_rate_fit"],
            "rksp_auroc": t[RKSP]["auroc_cv"], "rksp_auroc_ci95": t[RKSP]["auroc_cv_ci95"],
            "best_baseline": best_base, "best_baseline_auroc": t[best_base]["auroc_cv"],
            "lr_only_auroc": t["lr only"]["auroc_cv"],
            "rksp_auroc_transfer": t[RKSP].get("auroc_transfer"),
            "kss_rate_off_on": summary["kss"]["headline_rates"], "kss_headroom_ratio": summary["kss"]["headroom_ratio"]}


def analyze(rows: list[dict], out: Path, bootstrap: int = 1000) -> dict:
    errors = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    fit = [r for r in rows if r["part"] == "fit"]
    transfer = [r for r in rows if r["part"] == "transfer"]
    kss_rows = [r for r in rows if r["part"] == "kss"]
    write_csv(out / "runs.csv", rows)
    table, curves = predictor_table(fit, transfer, bootstrap)
    kss = kss_table(kss_rows)
    above = [i for i, e in enumerate(kss["rates"]["off"]) if e["rate"] > kss["threshold"]]
    kss["headline_rates"] = (
        {"lrs_above_edge": [kss["rates"]["off"][i]["lr"] for i in above],
         "off": _pooled(kss["rates"]["off"], above), "on": _pooled(kss["rates"]["on"], above)} if above else None)
    summary = {
        "runs": len(rows), "runs_fit": len(fit), "runs_transfer": len(transfer), "runs_kss": len(kss_rows),
        "divergence_rate_fit": float(np.mean([r["diverged"] for r in fit])) if fit else None,
        "divergence_rate_transfer": float(np.mean([r["diverged"] for r in transfer])) if transfer else None,
        "predictors": table, "kss": kss, "risk_model": risk_model(fit),
        "cv": {"folds": FOLDS, "grouped_by": "config_id (all seeds of a configuration in one fold)", "l2": L2},
        "train_seconds_total": float(sum(r["train_seconds"] for r in rows)),
        "failed_runs": [{"part": r["part"], "run_id": r["run_id"], "error": r["error"]} for r in errors],
    }
    from .plots import plot_kss, plot_roc

    plot_roc(curves, out / "roc.png")
    plot_kss(kss, out / "kss_rates.png")
    return summary


def _pooled(entries: list[dict], idx: list[int]) -> dict:
    k = sum(entries[i]["diverged"] for i in idx)
    n = sum(entries[i]["runs"] for i in idx)
    return {"diverged": k, "runs": n, "rate": k / n if n else float("nan"), "ci95": wilson(k, n)}


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["part"], r["run_id"])):
            w.writerow(r)
    tmp.replace(path)


def _clean(v):
    """JSON has no NaN: undefined statistics (a class absent from a small run) are written as null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(path: Path, data: dict) -> None:
    atomic.write_json(str(path), _clean(data))
