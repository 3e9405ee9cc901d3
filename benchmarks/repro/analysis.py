"""From run records to the paper's tables: Table 1/2 (AUROC), grouped CV, calibration and the risk
model, Tables 3/6 and 5, the sensitivities, summary.json and tables.md."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from hf_rksp.pipeline.risk import KAPPA_CAP, RiskModel, fit_logistic, transform

from .protocol import (ALL_METHODS, GRAD_LIMIT, LM, LOSS_LIMIT, METHODS, NORMS, PAPER, PROFILE_TOKENS, SUMMARY_METHOD_KEYS,
                       Protocol)
from .stats import auroc, bootstrap_ci, ece, fisher_exact, log_loss, wilson
from .training import gradient_baselines, old_label

# --- analysis ---------------------------------------------------------------------------------------------------

def label(r: dict, which: str = "paper") -> bool:
    """Diverged under ``which``: "paper" (the recorded label), "old" (our old label, from the loss trace) or
    "loss" (the paper's loss criterion alone: loss > 50 or non-finite at a step the run reached)."""
    if which == "paper":
        return bool(r["diverged"])
    loss = _trace(r, "loss")
    if which == "old":
        return old_label(loss, r["spec"]["warmup"])
    return any(not math.isfinite(v) or v > LOSS_LIMIT for v in loss)


def kappa(r: dict) -> float:
    k = r["init"]["eigvec_condition"]
    return KAPPA_CAP if k is None else min(float(k), KAPPA_CAP)


PREDICTORS = {  # at init
    "near_unit_mass": lambda r: r["init"]["near_unit_mass"],
    "near_unit_mass_x_log10_kappa": lambda r: r["init"]["near_unit_mass"] * math.log10(max(kappa(r), 1.0)),
    "spectral_radius": lambda r: r["init"]["spectral_radius"],
    "eigvec_condition": kappa,
}
BASELINES = ("grad_norm_step1", "grad_norm_step100", "grad_var_1_100", "loss_spikes_1_500")


def baseline_values(runs: list[dict], name: str, carried: bool, precursor: bool = False) -> list[float | None]:
    """One baseline on every run; ``precursor``: a diverged run's trace without its last (diverging) step."""
    def cut(r, t):
        return t[:-1] if precursor and r["diverged"] and len(t) > 1 else t
    return [gradient_baselines(cut(r, _trace(r, "loss")), cut(r, _trace(r, "grad_norm")), carried=carried)[name]
            for r in runs]


def _trace(r: dict, name: str) -> list[float]:
    return [math.inf if v is None else v for v in r["trace"][name]]


def auroc_table(runs: list[dict], which: str = "paper", n_boot: int = 1000) -> dict:
    """AUROC [95% CI] of every predictor and baseline (baselines carried, and on runs alive at the step)."""
    y = [label(r, which) for r in runs]
    out = {}
    for name, f in PREDICTORS.items():
        s = [f(r) for r in runs]
        out[name] = {"auroc": auroc(s, y), "ci95": bootstrap_ci(s, y, n=n_boot), "n": len(runs)}
    for name in BASELINES:
        s = baseline_values(runs, name, carried=True)
        out[name] = {"auroc": auroc(s, y), "ci95": bootstrap_ci(s, y, n=n_boot), "n": len(runs)}
        alive = [(v, t) for v, t in zip(baseline_values(runs, name, carried=False), y) if v is not None]
        out[name]["alive"] = {"auroc": auroc([v for v, _ in alive], [t for _, t in alive]) if alive else None,
                              "n": len(alive)}
        out[name]["precursor"] = {"auroc": auroc(baseline_values(runs, name, carried=True, precursor=True), y)}
    return out


def mean_sd(vals) -> list[float] | None:
    v = [x for x in vals if x is not None]
    return [float(np.mean(v)), float(np.std(v))] if v else None


def norm_table(runs: list[dict], which: str = "paper", by=("norm",)) -> dict:
    """Per normalization (or per (norm, d, L)): n, divergence rate, M_~1, M_>1, rho at init, accuracy."""
    groups = defaultdict(list)
    for r in runs:
        groups[" ".join(str(r["spec"][k]) for k in by)].append(r)
    out = {}
    for g, rs in sorted(groups.items()):
        y = [label(r, which) for r in rs]
        out[g] = {"n": len(rs), "diverged": int(sum(y)), "rate": sum(y) / len(rs),
                  "near_unit_mass": mean_sd(r["init"]["near_unit_mass"] for r in rs),
                  "expansive_mass": mean_sd(r["init"]["expansive_mass"] for r in rs),
                  "spectral_radius": mean_sd(r["init"]["spectral_radius"] for r in rs),
                  "accuracy_converged": mean_sd(r["accuracy"] for r, d in zip(rs, y) if not d),
                  "auroc_near_unit_mass": auroc([r["init"]["near_unit_mass"] for r in rs], y)}
        out[g]["auroc_near_unit_mass_ci95"] = bootstrap_ci([r["init"]["near_unit_mass"] for r in rs], y, n=300)
    return out


def design(runs: list[dict], cols: tuple[str, ...], norms: tuple[str, ...]) -> np.ndarray:
    """Covariates: M, log10 kappa, log10 lr, and one-hot normalization (the first of ``norms`` dropped)."""
    rows = []
    for r in runs:
        row = []
        for c in cols:
            if c == "norm":
                row += [float(r["spec"]["norm"] == n) for n in norms[1:]]
            elif c == "lr":
                row.append(math.log10(r["spec"]["lr"]))
            else:
                row.append(transform(c, r["init"][c] if c != "eigvec_condition" else kappa(r)))
        rows.append(row)
    return np.asarray(rows, dtype=float).reshape(len(runs), -1)


def grouped_cv(runs: list[dict], cols: tuple[str, ...], group_by: tuple[str, ...], which: str = "paper",
               l2: float = 1e-2) -> dict:
    """Out-of-fold predictions of a logistic model, one fold per group (leave-one-group-out)."""
    norms = tuple(sorted({r["spec"]["norm"] for r in runs}))
    x, y = design(runs, cols, norms), np.array([label(r, which) for r in runs], dtype=float)
    groups = [tuple(r["spec"][k] for k in group_by) for r in runs]
    p = np.empty(len(y))
    for g in sorted(set(groups)):
        test = np.array([gg == g for gg in groups])
        ytr = y[~test]
        if ytr.min() == ytr.max():  # one class left to learn from: its smoothed base rate
            p[test] = (ytr.sum() + 0.5) / (len(ytr) + 1)
        else:
            p[test] = fit_logistic(x[~test], ytr, l2=l2).predict(x[test])
    return {"columns": list(cols), "groups": list(group_by), "n_folds": len(set(groups)),
            "auroc": auroc(p, y.astype(bool)), "log_loss": log_loss(p, y), "brier": float(np.mean((p - y) ** 2)),
            "ece": ece(p, y), "oof": p.tolist()}


CV_MODELS = {  # what M adds beyond the normalization and the learning rate
    "lr": ("lr",), "M": ("near_unit_mass",), "M + lr": ("near_unit_mass", "lr"),
    "norm + lr": ("norm", "lr"), "norm + lr + M": ("norm", "lr", "near_unit_mass"),
}
CV_GROUPINGS = {"norm": ("norm",), "norm_d_L": ("norm", "d_model", "n_layers")}


def cv_table(runs: list[dict], which: str = "paper") -> dict:
    y = [label(r, which) for r in runs]
    if len(set(y)) < 2:
        return {}
    out = {}
    for gname, gby in CV_GROUPINGS.items():
        for mname, cols in CV_MODELS.items():
            if "norm" in cols and gname == "norm":  # an unseen normalization has no coefficient
                continue
            res = grouped_cv(runs, cols, gby, which)
            res.pop("oof")
            out[f"{mname} | groups {gname}"] = res
    return out


RISK_CANDIDATES = ("eigvec_condition", "lr")
RISK_GROUPS = ("norm", "d_model", "n_layers")


def fit_risk_model(runs: list[dict], sha256: str, which: str = "paper") -> tuple[RiskModel | None, dict]:
    """Logistic on M_~1; log10 kappa and log10 lr added (greedily) only if they lower the grouped-CV log-loss."""
    y = np.array([label(r, which) for r in runs])
    if len(set(y.tolist())) < 2:
        return None, {"reason": "one class only"}
    cols, trail = ["near_unit_mass"], []
    best = grouped_cv(runs, tuple(cols), RISK_GROUPS, which)
    trail.append({"features": list(cols), "cv_log_loss": best["log_loss"], "cv_auroc": best["auroc"]})
    for c in RISK_CANDIDATES:
        trial = grouped_cv(runs, tuple(cols + [c]), RISK_GROUPS, which)
        trail.append({"features": cols + [c], "cv_log_loss": trial["log_loss"], "cv_auroc": trial["auroc"]})
        if trial["log_loss"] < best["log_loss"]:
            cols, best = cols + [c], trial
    fit = fit_logistic(design(runs, tuple(cols), ()), y.astype(float))
    feats = {"near_unit_mass": [r["init"]["near_unit_mass"] for r in runs],
             "eigvec_condition": [kappa(r) for r in runs]}
    valid = {"lr": [min(r["spec"]["lr"] for r in runs), max(r["spec"]["lr"] for r in runs)],
             "d_model": [min(r["spec"]["d_model"] for r in runs), max(r["spec"]["d_model"] for r in runs)],
             "n_layers": [min(r["spec"]["n_layers"] for r in runs), max(r["spec"]["n_layers"] for r in runs)],
             **{k: [float(min(v)), float(max(v))] for k, v in feats.items()}}
    model = RiskModel(
        features=tuple(cols), fit=fit, n_runs=len(runs), n_diverged=int(y.sum()),
        divergence_definition=f"loss > {LOSS_LIMIT:g} or gradient norm > {GRAD_LIMIT:g} (or non-finite) at any "
                              f"step within the step budget (the paper's label)",
        sweep_data_sha256=sha256, valid=valid,
        cv={"groups": list(RISK_GROUPS), "n_folds": best["n_folds"], "ece": best["ece"], "auroc": best["auroc"],
            "log_loss": best["log_loss"], "selection": trail},
        rksp={"rank": "full", "tokens": PROFILE_TOKENS, "eps": 1e-5, "band_upper": 1.05, "band_lower": 0.90},
        sweep={"task": "associative recall (4 pairs, length 64, vocabulary 256)",
               "architecture": "benchmarks.paper_models GPT-2-style, N(0, 0.02^2) init, no residual scaling",
               "norms": sorted({r["spec"]["norm"] for r in runs}),
               "training": f"AdamW, batch {runs[0]['spec']['batch']}, {runs[0]['spec']['steps']} steps, "
                           f"{runs[0]['spec']['warmup']} warm-up", "script": "benchmarks/paper_repro.py"})
    return model, {"oof": best["oof"], "selection": trail}


def kss_table(protocol: Protocol, runs: dict, which: str = "paper") -> dict:
    """Table 3/6: per method over its trials, divergence rate (Wilson CI, Fisher p vs no control), accuracy,
    M_~1 at the end (non-diverged runs), and time per step relative to the paired no-control runs."""
    base = {(s.lr, s.seed): runs.get(s.key) for s in protocol.kss("none")}
    out = {}
    for m in METHODS:
        rs = [runs[s.key] for s in protocol.kss(m) if s.key in runs]
        y = [label(r, which) for r in rs]
        k, n = int(sum(y)), len(rs)
        ratios = [r["step_s"] / b["step_s"] for r in rs
                  if (b := base.get((r["spec"]["lr"], r["spec"]["seed"]))) is not None]
        nb = [label(b, which) for b in base.values() if b is not None]
        stops = [r["diverged_step"] for r, d in zip(rs, y) if d and r["diverged_step"] is not None]
        out[m] = {"n": n, "diverged": k, "rate": k / n if n else None, "ci95": wilson(k, n),
                  "fisher_p_vs_none": fisher_exact(k, n - k, int(sum(nb)), len(nb) - int(sum(nb)))
                  if n and nb and m != "none" else None,
                  "accuracy_converged": mean_sd(r["accuracy"] for r, d in zip(rs, y) if not d),
                  "accuracy_all": mean_sd(r["accuracy"] or 0.0 for r in rs),
                  "end_near_unit_mass": mean_sd((r["end"] or {}).get("near_unit_mass") for r in rs),
                  "overhead": float(np.median(ratios)) - 1 if ratios else None,
                  "diverged_on_kss_step": sum(bool(r.get("diverged_on_kss_step")) for r in rs),
                  "rate_loss_only": sum(label(r, "loss") for r in rs) / n if n else None,
                  # when the diverged runs stopped: a method that only delays the catapult shows here
                  "diverged_step_median": float(np.median(stops)) if stops else None,
                  "by_lr": {f"{lr:g}": _rate([r for r in rs if r["spec"]["lr"] == lr], which)
                            for lr in protocol.kss_lrs}}
    return out


def _divergence(rs: list[dict]) -> dict:
    """The divergence statistics both regime tables report for a set of runs: rate under the paper's label
    [Wilson CI] and under its loss criterion alone, how the diverged runs failed, and their median stop step."""
    k, n = sum(label(r) for r in rs), len(rs)
    stops = [r["diverged_step"] for r in rs if r["diverged"] and r["diverged_step"] is not None]
    reasons = sorted(r.get("diverged_reason") or "?" for r in rs if r["diverged"])
    return {"n": n, "diverged": int(k), "rate": k / n if n else None, "ci95": wilson(k, n),
            "rate_loss_only": sum(label(r, "loss") for r in rs) / n if n else None,
            "reasons": {why: reasons.count(why) for why in dict.fromkeys(reasons)},
            "diverged_step_median": float(np.median(stops)) if stops else None}


def regime_table(protocol: Protocol, runs: dict) -> dict:
    """Issue 24's calibration: per lr and method (No-Norm blocks under a final LayerNorm), ``_divergence`` of its
    runs, and whether the lr shows the paper's signature (no control 50-70%, clip 1.0 >= 40%)."""
    out = {}
    for lr in protocol.regime_lrs:
        row = {m: _divergence([runs[s.key] for s in protocol.regime() if s.key in runs and s.lr == lr
                               and s.method == m]) for m in protocol.regime_methods}
        none, clip = row.get("none", {}), row.get("clip_1.0", {})
        row["signature"] = (none.get("rate") is not None and clip.get("rate") is not None
                            and 0.5 <= none["rate"] <= 0.7 and clip["rate"] >= 0.4)
        out[f"{lr:g}"] = row
    return out


def regime_kss_table(protocol: Protocol, runs: dict) -> dict:
    """Tables 3/6 in the calibrated regime: per method, ``_divergence`` of its runs, Fisher's p against no
    control, how many KSS runs failed on a KSS step, and per-lr counts."""
    base = [runs[s.key] for s in protocol.regime_kss("none") if s.key in runs]
    nb, kb = len(base), sum(label(r) for r in base)
    out = {}
    for m in protocol.regime_kss_methods:
        rs = [runs[s.key] for s in protocol.regime_kss(m) if s.key in runs]
        v = _divergence(rs)
        k, n = v["diverged"], v["n"]
        out[m] = {**v, "fisher_p_vs_none": fisher_exact(k, n - k, kb, nb - kb) if n and nb and m != "none" else None,
                  "diverged_on_kss_step": sum(bool(r.get("diverged_on_kss_step")) for r in rs),
                  "by_lr": {f"{lr:g}": _rate([r for r in rs if r["spec"]["lr"] == lr], "paper")
                            for lr in protocol.regime_kss_lrs}}
    return out


def regime_summary(table: dict) -> dict | None:
    """Issue 24's summary of the calibrated regime: divergence rates of no control, clip 1.0 and KSS alpha 0.15,
    the best KSS variant, and the trials per method (None until the regime's runs exist)."""
    def rate(m):
        return (table.get(m) or {}).get("rate")

    kss = {m: v["rate"] for m, v in table.items() if m.startswith("alpha_") and v["n"]}
    if not table or rate("none") is None:
        return None
    best = min(kss, key=kss.get) if kss else None
    return {"no_control": rate("none"), "clip_1.0": rate("clip_1.0"), "kss_alpha_0.15": rate("alpha_0.15"),
            "kss_best": {"method": best, "rate": kss[best]} if best else None,
            "n_per_method": {m: v["n"] for m, v in table.items()}}


def regime_kss_md(protocol: Protocol, table: dict) -> list[str]:
    d, L = protocol.main
    lines = ["", f"## Tables 3/6 in the calibrated regime (No-Norm + final LayerNorm, d {d}, L {L}, lrs "
             f"{', '.join(f'{x:g}' for x in protocol.regime_kss_lrs)}; divergence % [Wilson 95% CI])", "",
             "| method | n | div % [CI] | Fisher p vs none | loss-only % | how | on a KSS step | median stop | by lr "
             "| paper div % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, v in table.items():
        if not v["n"]:
            continue
        byl = ", ".join(f"{lr}: {w['diverged']}/{w['n']}" for lr, w in v["by_lr"].items() if w["n"])
        paper = PAPER["kss"].get(m)
        lines.append(f"| {m} | {v['n']} | {100 * v['rate']:.1f} {_ci(v['ci95'], 100, '.1f')} | "
                     f"{_fmt(v['fisher_p_vs_none'])} | {100 * v['rate_loss_only']:.1f} | "
                     f"{', '.join(f'{k} {c}' for k, c in v['reasons'].items()) or '-'} | "
                     f"{v['diverged_on_kss_step'] if ALL_METHODS[m].kss else '-'} | "
                     f"{_fmt(v['diverged_step_median'], '.0f')} | {byl} | "
                     f"{'-' if paper is None else f'{100 * paper:.1f}'} |")
    return lines


def regime_md(protocol: Protocol, table: dict) -> list[str]:
    d, L = protocol.main
    lines = ["", f"## Regime calibration (issue 24: No-Norm blocks + final LayerNorm, d {d}, L {L}; divergence % "
             "[Wilson 95% CI], the paper's label / its loss criterion alone)", "",
             "| lr | method | n | div % [CI] | loss-only % | how | median stop | signature |",
             "|---|---|---|---|---|---|---|---|"]
    for lr, row in table.items():
        for m in protocol.regime_methods:
            v = row[m]
            if not v["n"]:
                continue
            how = ", ".join(f"{k} {c}" for k, c in v["reasons"].items()) or "-"
            lines.append(f"| {lr} | {m} | {v['n']} | {100 * v['rate']:.0f} {_ci(v['ci95'], 100, '.0f')} | "
                         f"{100 * v['rate_loss_only']:.0f} | {how} | {_fmt(v['diverged_step_median'], '.0f')} | "
                         f"{'yes' if row['signature'] else 'no'} |")
    return lines


def _rate(rs: list[dict], which: str) -> dict:
    k = sum(label(r, which) for r in rs)
    return {"n": len(rs), "diverged": int(k), "rate": k / len(rs) if rs else None}


def _max_stable(per: dict, lrs, limit: float) -> dict:
    """Table 5's reading of one method's per-lr rates (``per``: lr string -> ``_rate``): the largest lr whose
    rate, and every smaller lr's, is below ``limit``."""
    best, complete = None, True
    for lr in sorted(lrs):  # ascending: stop at the first lr that fails or has no runs yet
        r = per[f"{lr:g}"]
        if r["n"] == 0:
            complete = False
            break
        if r["rate"] >= limit:
            break
        best = lr
    return {"by_lr": per, "max_stable_lr": best, "censored": best == max(lrs), "complete": complete}


def maxlr_table(protocol: Protocol, runs: dict, which: str = "paper", limit: float = 0.2) -> dict:
    """Table 5: divergence rate per lr, without and with KSS; the largest lr whose rate, and every smaller
    lr's, is below ``limit`` (None: even the smallest lr fails; ``censored``: the largest lr tested passes;
    ``complete`` false: an lr up to the first failing one has no runs yet)."""
    out = {}
    for norm, lrs in protocol.maxlr_lrs.items():
        out[norm] = {}
        for m in ("none", protocol.maxlr_method):
            per = {f"{lr:g}": _rate([runs[s.key] for s in protocol.maxlr(norm, m) if s.lr == lr and s.key in runs],
                                    which) for lr in lrs}
            out[norm][m] = _max_stable(per, lrs, limit)
    return out


def regime_maxlr_table(protocol: Protocol, runs: dict, limit: float = 0.2) -> dict:
    """Table 5 in the calibrated regime (No-Norm + final LayerNorm): per method, ``_max_stable`` over the
    regime_maxlr lrs (runs shared with the regime groups are counted once: a run is its key)."""
    lrs = protocol.regime_maxlr_lrs
    return {m: _max_stable({f"{lr:g}": _rate([runs[s.key] for s in protocol.regime_maxlr(m)
                                              if s.lr == lr and s.key in runs], "paper") for lr in lrs}, lrs, limit)
            for m in protocol.regime_maxlr_methods} if lrs else {}


def learning_table(protocol: Protocol, runs: dict) -> dict:
    """Issue 24, step 5: per (norm, lr) setting of the learning group and method, ``_divergence``, next-token
    accuracy (over the runs that did not diverge, and over all with 0 for a diverged run), and for KSS Fisher's p
    against the same setting without it."""
    out = {}
    for (norm, final), lrs in protocol.learning_lrs.items():
        for lr in lrs:
            name = f"{norm}{' +final_norm' if final else ''} lr {lr:g}"
            row = {}
            variants = protocol.learning_variant_methods if (norm, final, lr) in protocol.learning_variants_at else ()
            for m in (*protocol.learning_methods, *variants):
                rs = [runs[s.key] for s in protocol.learning() + protocol.learning_variants() if s.key in runs and s.norm == norm and s.lr == lr
                      and s.final_norm == final and s.method == m]
                row[m] = {**_divergence(rs),
                          "accuracy_converged": mean_sd(r["accuracy"] for r in rs if not label(r)),
                          "accuracy_all": mean_sd((r["accuracy"] or 0.0) if not label(r) else 0.0 for r in rs),
                          "final_loss_converged": mean_sd(r["final_loss"] for r in rs if not label(r))}
            base = row.get("none", {})
            for m, v in row.items():
                v["fisher_p_vs_none"] = (fisher_exact(v["diverged"], v["n"] - v["diverged"], base["diverged"],
                                                      base["n"] - base["diverged"])
                                         if m != "none" and v["n"] and base.get("n") else None)
            out[name] = row
    return out


def paper_design_auroc(protocol: Protocol, runs: dict, n_boot: int = 1000) -> dict:
    """Table 2 under the paper's design: every normalization at a standard stable lr and No-Norm where it
    diverges (``Protocol.paper_design_lr``), DeepNorm pre-placed (the variant matching Table 1); AUROC of
    M_~1 at init over those runs, beside the same with our DeepNorm (post-placed, DeepNet's)."""
    def pick(deepnorm: str | None) -> list[dict]:
        out = []
        for d, L in protocol.sizes:
            for n in NORMS:
                lr = protocol.paper_design_lr(n, d)
                for s in protocol.table1_seeds if lr is not None else ():
                    spec = protocol.spec(norm=n, d_model=d, n_layers=L, lr=lr, seed=s,
                                         deepnorm=deepnorm if n == "deepnorm" else None)
                    if spec.key in runs:
                        out.append(runs[spec.key])
        return out

    res = {}
    for name, dn in (("deepnorm_pre", "pre"), ("deepnorm_post", None)):
        rs = pick(dn)
        s, y = [r["init"]["near_unit_mass"] for r in rs], [label(r) for r in rs]
        res[name] = {"n": len(rs), "diverged": int(sum(y)), "auroc": auroc(s, y) if len(set(y)) == 2 else None,
                     "ci95": bootstrap_ci(s, y, n=n_boot) if len(set(y)) == 2 else None,
                     "by_norm": {n: {"n": len(g), "diverged": int(sum(label(r) for r in g)),
                                     "near_unit_mass": float(np.mean([r["init"]["near_unit_mass"] for r in g]))}
                                 for n in NORMS if (g := [r for r in rs if r["spec"]["norm"] == n])}}
    return res


def shared_lr_auroc(runs: list[dict], n_boot: int = 1000) -> dict:
    """AUROC of M_~1 at init among the Table 1 runs trained at one learning rate, for every lr that at
    least two normalizations' grids share: the paper's design (one recipe for every normalization, Table 1)
    as opposed to ours (an lr grid spanning stable to divergent within each normalization)."""
    by_lr = defaultdict(list)
    for r in runs:
        by_lr[r["spec"]["lr"]].append(r)
    out = {}
    for lr, rs in sorted(by_lr.items()):
        norms = {r["spec"]["norm"] for r in rs}
        if len(norms) < 2:
            continue
        s, y = [r["init"]["near_unit_mass"] for r in rs], [label(r) for r in rs]
        out[f"{lr:g}"] = {"n": len(rs), "norms": sorted(norms), "diverged": int(sum(y)), "auroc": auroc(s, y),
                          "ci95": bootstrap_ci(s, y, n=n_boot),
                          "rate_by_norm": {n: float(np.mean([label(r) for r in rs if r["spec"]["norm"] == n]))
                                           for n in sorted(norms)}}
    return out


def pilot_table(runs: list[dict]) -> dict:
    """The pilots (``pilot``, ad-hoc settings) grouped by their settings: divergence by the paper's label, the
    median stop step, and for runs trained on past the label (``--no-stop``) how they ended: non-finite, or
    the mean task loss of their last 50 steps, and the KSS term's and the task's gradient norms on the KSS
    steps after the label (medians over the finite ones)."""
    groups = defaultdict(list)
    for r in runs:
        s = r["spec"]
        groups[(s["task"], s["norm"], s["d_model"], s["n_layers"], s["method"], s["lr"],
                s.get("stop_at_label", True))].append(r)
    out = {}
    for g, rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        stops = [r["diverged_step"] for r in rs if r["diverged"]]
        row = {"n": len(rs), "diverged": len(stops),
               "diverged_step_median": float(np.median(stops)) if stops else None}
        if not g[-1]:
            tails = [_trace(r, "loss")[-50:] for r in rs]
            row["ended_non_finite"] = sum(not all(map(math.isfinite, t)) for t in tails)
            row["last50_loss_mean"] = [float(np.mean(t)) for t in tails if all(map(math.isfinite, t))]
            after = [h for r in rs if r["diverged"] for h in r["kss_trace"] if h["step"] > r["diverged_step"]
                     and all(math.isfinite(h.get(k) or math.nan) for k in ("kss/grad_norm", "kss/task_grad_norm"))]
            if after:
                row["after_label_kss_grad_median"] = float(np.median([h["kss/grad_norm"] for h in after]))
                row["after_label_task_grad_median"] = float(np.median([h["kss/task_grad_norm"] for h in after]))
        out[" ".join(map(str, g))] = row
    return out


def pilot_tables_md(table: dict) -> str:
    L = ["# Pilots (`paper_repro.py pilot`; settings outside the protocol's grids)", "",
         "Key: task norm d_model n_layers method lr stop_at_label.", "",
         "| settings | n | diverged | median stop step | trained past the label: ended non-finite | "
         "last-50 loss mean (finite ends) | after the label: KSS / task gradient (medians) |",
         "|---|---|---|---|---|---|---|"]
    for k, v in table.items():
        past = "-" if "ended_non_finite" not in v else f"{v['ended_non_finite']}/{v['n']}"
        tail = ", ".join(f"{x:.2f}" for x in v.get("last50_loss_mean", [])) or "-"
        grads = "-" if "after_label_kss_grad_median" not in v else \
            f"{v['after_label_kss_grad_median']:.3g} / {v['after_label_task_grad_median']:.3g}"
        L.append(f"| {k} | {v['n']} | {v['diverged']} | {_fmt(v['diverged_step_median'], '.0f')} | {past} | "
                 f"{tail} | {grads} |")
    return "\n".join(L) + "\n"


def _clean(obj):
    """JSON-ready: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def make_summary(protocol: Protocol, runs: dict, res: dict, model: RiskModel | None) -> dict:
    a = res["table1"]["auroc"]
    maxlr = res["maxlr"]
    return _clean({
        "protocol": protocol.name,
        "runs": len(runs),
        "runs_table1": sum(v["n"] for v in res["table1"]["by_norm"].values()),
        "runs_pooled_no_control": res["pooled"]["n"],
        "auroc_near_unit_mass": a["near_unit_mass"]["auroc"],
        "auroc_near_unit_mass_ci95": a["near_unit_mass"]["ci95"],
        "auroc_predictors": {k: a[k]["auroc"] for k in PREDICTORS},
        "auroc_predictors_ci95": {k: a[k]["ci95"] for k in PREDICTORS},
        "auroc_baselines": {k: a[k]["auroc"] for k in BASELINES},
        "auroc_baselines_ci95": {k: a[k]["ci95"] for k in BASELINES},
        "auroc_baselines_alive": {k: a[k]["alive"]["auroc"] for k in BASELINES},
        "auroc_baselines_precursor": {k: a[k]["precursor"]["auroc"] for k in BASELINES},
        "auroc_near_unit_mass_pooled": res["pooled"]["auroc"]["near_unit_mass"]["auroc"],
        "auroc_near_unit_mass_shared_lr": {k: {"auroc": v["auroc"], "ci95": v["ci95"], "n": v["n"]}
                                           for k, v in res["table1"]["auroc_shared_lr"].items()},
        "auroc_near_unit_mass_within_norm": {k: v["auroc_near_unit_mass"]
                                             for k, v in res["table1"]["by_norm"].items()},
        "divergence_rate_by_norm": {k: v["rate"] for k, v in res["table1"]["by_norm"].items()},
        "grouped_cv_auroc": {k: v["auroc"] for k, v in res["pooled"]["grouped_cv"].items()},
        "ece_raw_score": res["calibration"]["ece_raw_score"],
        "ece_risk_model": model.cv["ece"] if model else None,
        "auroc_risk_model_cv": model.cv["auroc"] if model else None,
        "risk_model_features": list(model.features) if model else None,
        "kss": {SUMMARY_METHOD_KEYS[m]: v["rate"] for m, v in res["kss"].items()},
        "kss_n": {SUMMARY_METHOD_KEYS[m]: v["n"] for m, v in res["kss"].items()},
        "max_stable_lr": {n: [maxlr.get(n, {}).get(m, {}).get("max_stable_lr") for m in ("none",
                                                                                         protocol.maxlr_method)]
                          for n in ("pre", "rms", "none")},
        "max_stable_lr_censored": {n: [maxlr.get(n, {}).get(m, {}).get("censored") for m in ("none",
                                                                                            protocol.maxlr_method)]
                                   for n in ("pre", "rms", "none")},
        "max_stable_lr_complete": {n: [maxlr.get(n, {}).get(m, {}).get("complete") for m in ("none",
                                                                                           protocol.maxlr_method)]
                                   for n in ("pre", "rms", "none")},
        "sensitivity_old_label": res["sensitivity_old_label"],
        "sensitivity_loss_only": res["sensitivity_loss_only"],
        "regime": regime_summary(res.get("regime_kss") or {}),
        "regime_max_stable_lr": {m: v["max_stable_lr"] for m, v in (res.get("regime_maxlr") or {}).items()},
        "learning": {k: {m: {"rate": v["rate"], "n": v["n"],
                             "accuracy_converged": (v["accuracy_converged"] or [None])[0]} for m, v in row.items()}
                     for k, row in (res.get("learning") or {}).items()},
        "auroc_paper_design": (res.get("table2_paper") or {}).get("deepnorm_pre", {}).get("auroc"),
        "auroc_paper_design_ci95": (res.get("table2_paper") or {}).get("deepnorm_pre", {}).get("ci95"),
        "kss_diverged_on_kss_step": {SUMMARY_METHOD_KEYS[m]: v["diverged_on_kss_step"] for m, v in res["kss"].items()},
        "paper": PAPER,
    })


def _fmt(v, f=".3f"):
    return "-" if v is None else format(v, f)


def _ci(ci, scale=1.0, f=".3f"):
    return "-" if ci is None else f"[{scale * ci[0]:{f}}, {scale * ci[1]:{f}}]"


def _ms(v, f=".2f"):
    return "-" if v is None else f"{v[0]:{f}} ± {v[1]:{f}}"


def tables_md(protocol: Protocol, res: dict, summary: dict) -> str:
    """The tables, ours beside the paper's."""
    L = [f"# Reproduction of the paper's tables (protocol `{protocol.name}`, {summary['runs']} runs)", "",
         "## Table 1 (associative recall, at init; accuracy over converged runs)", "",
         "| norm | n | div % | M_~1 | M_>1 | rho | acc % | AUROC of M within norm | paper: n, div %, M_~1, M_>1, rho |",
         "|---|---|---|---|---|---|---|---|---|"]
    for k, v in res["table1"]["by_norm"].items():
        p = PAPER["table1"].get(k)
        acc = v["accuracy_converged"]
        L.append(f"| {k} | {v['n']} | {100 * v['rate']:.1f} | {_ms(v['near_unit_mass'])} | "
                 f"{_ms(v['expansive_mass'])} | {_ms(v['spectral_radius'])} | "
                 f"{_ms(None if acc is None else [100 * acc[0], 100 * acc[1]], '.1f')} | "
                 f"{_fmt(v['auroc_near_unit_mass'])} | {', '.join(map(str, p)) if p else '-'} |")
    L += ["", "Per size:", "", "| norm d L | n | div % | M_~1 |", "|---|---|---|---|"]
    L += [f"| {k} | {v['n']} | {100 * v['rate']:.1f} | {_ms(v['near_unit_mass'])} |"
          for k, v in res["table1"]["by_size"].items()]
    L += ["", "## Table 2 (AUROC [95% bootstrap CI], Table 1 runs)", "",
          "Baselines read a stopped run's last value (\"carried\": what a monitor has seen through step s, the "
          "diverging step included); \"precursor\" drops a diverged run's last step; \"alive\" scores only "
          "the runs that reached the step.", "",
          "| predictor | AUROC | 95% CI | precursor | alive at the step (n) | paper |", "|---|---|---|---|---|---|"]
    for k, v in res["table1"]["auroc"].items():
        alive = "" if "alive" not in v else f"{_fmt(v['alive']['auroc'])} ({v['alive']['n']})"
        pre = "" if "precursor" not in v else _fmt(v["precursor"]["auroc"])
        L.append(f"| {k} | {_fmt(v['auroc'])} | {_ci(v['ci95'])} | {pre} | {alive} | {PAPER['auroc'].get(k, '-')} |")
    L += ["", f"Pooled no-control runs (n = {res['pooled']['n']}): AUROC of M_~1 "
              f"{_fmt(res['pooled']['auroc']['near_unit_mass']['auroc'])}.", "",
          "The paper's design, one learning rate for every normalization (the Table 1 runs at each lr that "
          "two or more normalizations' grids share):", "",
          "| lr | n | diverged | AUROC of M_~1 | 95% CI | divergence rate by norm |", "|---|---|---|---|---|---|"]
    for k, v in res["table1"]["auroc_shared_lr"].items():
        rates = ", ".join(f"{n} {100 * r:.0f}%" for n, r in v["rate_by_norm"].items())
        L.append(f"| {k} | {v['n']} | {v['diverged']} | {_fmt(v['auroc'])} | {_ci(v['ci95'])} | {rates} |")
    L += ["",
          "## Grouped cross-validation (logistic, pooled no-control runs; out-of-fold)", "",
          "| model | groups | folds | AUROC | log-loss | ECE |", "|---|---|---|---|---|---|"]
    for k, v in res["pooled"]["grouped_cv"].items():
        L.append(f"| {k.split(' | ')[0]} | {'/'.join(v['groups'])} | {v['n_folds']} | {_fmt(v['auroc'])} | "
                 f"{_fmt(v['log_loss'])} | {_fmt(v['ece'])} |")
    c = res["calibration"]
    L += ["", "## Calibration", "", f"ECE of raw M_~1 as a probability (Table 1 runs): {_fmt(c['ece_raw_score'])} "
          f"(paper 0.283); pooled: {_fmt(c['ece_raw_score_pooled'])}."]
    if "risk_model" in c:
        rm = c["risk_model"]
        L.append(f"Risk model (features {', '.join(rm['features'])}): grouped-CV ECE {_fmt(rm['ece'])}, "
                 f"AUROC {_fmt(rm['auroc'])}, log-loss {_fmt(rm['log_loss'])} ({rm['n_folds']} folds by "
                 f"{'/'.join(rm['groups'])}).")
    L += ["", "## Table 3 / 6 (No-Norm, d {}, L {}, lrs {}; divergence % [Wilson 95% CI])".format(
        *protocol.main, ", ".join(f"{x:g}" for x in protocol.kss_lrs)), "",
          "| method | n | div % | 95% CI | Fisher p vs none | acc % (converged) | M_~1 end | overhead | by lr | "
          "stops on a KSS step | median stop step | div % by loss alone | paper div % |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, v in res["kss"].items():
        if not v["n"]:
            continue
        acc = "-" if v["accuracy_converged"] is None else f"{100 * v['accuracy_converged'][0]:.1f}"
        over = "-" if v["overhead"] is None else f"{100 * v['overhead']:+.0f}%"
        byl = ", ".join(f"{lr}: {b['diverged']}/{b['n']}" for lr, b in v["by_lr"].items())
        L.append(f"| {m} | {v['n']} | {100 * v['rate']:.1f} | {_ci(v['ci95'], 100, '.0f')} | "
                 f"{_fmt(v['fisher_p_vs_none'], '.3g')} | {acc} | {_ms(v['end_near_unit_mass'])} | {over} | "
                 f"{byl} | {v['diverged_on_kss_step']} | {_fmt(v['diverged_step_median'], '.0f')} | "
                 f"{100 * v['rate_loss_only']:.1f} | "
                 f"{100 * PAPER['kss'][m]:.1f} |")
    L += ["", "## Table 5 (largest lr with < 20% divergence, without -> with KSS alpha 0.15)", "",
          "| norm | without | with | paper | divergence per lr (without / with) |", "|---|---|---|---|---|"]
    for n, v in res["maxlr"].items():
        a, b = v["none"], v[protocol.maxlr_method]
        per = ", ".join(f"{lr}: {a['by_lr'][lr]['diverged']}/{a['by_lr'][lr]['n']} / "
                        f"{b['by_lr'][lr]['diverged']}/{b['by_lr'][lr]['n']}" for lr in a["by_lr"])
        L.append(f"| {n} | {_lr(a)} | {_lr(b)} | {PAPER['max_stable_lr'].get(n, '-')} | {per} |")
    s = res["sensitivity_old_label"]
    L += ["", "## Sensitivity: our old label (10-step mean loss > step-1 loss + 0.5 nats after warm-up)", "",
          f"Agreement with the paper's label over all runs: {_fmt(s['agreement_with_paper_label'])}. "
          f"Table 1 AUROC of M_~1: {_fmt(s['table1_auroc_near_unit_mass'])}. Divergence by norm: "
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["table1_by_norm"].items()) + ". KSS table: "
          + ", ".join(f"{k} {'-' if v is None else f'{100 * v:.0f}%'}" for k, v in s["kss"].items())
          + ". Max stable lr: " + ", ".join(f"{k} {v}" for k, v in s["max_stable_lr"].items()) + "."]
    s = res["sensitivity_loss_only"]
    L += ["", "## Sensitivity: the paper's loss criterion alone (loss > 50 or non-finite; runs stopped by the "
          "gradient norm count as stable)", "",
          "KSS table: " + ", ".join(f"{k} {'-' if v is None else f'{100 * v:.0f}%'}" for k, v in s["kss"].items())
          + ". Max stable lr: " + ", ".join(f"{k} {v}" for k, v in s["max_stable_lr"].items()) + "."]
    if res.get("lm"):
        lm = res["lm"]
        a = lm["auroc"]["near_unit_mass"]
        L += ["", "## Synthetic LM (D.2, the optional `lm` group; at init, accuracy over converged runs)", "",
              "| norm | n | div % | M_~1 | M_>1 | rho | next-token acc % | divergence by lr |",
              "|---|---|---|---|---|---|---|---|"]
        for k, v in lm["by_norm"].items():
            acc = v["accuracy_converged"]
            byl = ", ".join(f"{g.split()[1]}: {w['diverged']}/{w['n']}" for g, w in lm["by_norm_lr"].items()
                            if g.split()[0] == k)
            L.append(f"| {k} | {v['n']} | {100 * v['rate']:.1f} | {_ms(v['near_unit_mass'])} | "
                     f"{_ms(v['expansive_mass'])} | {_ms(v['spectral_radius'])} | "
                     f"{_ms(None if acc is None else [100 * acc[0], 100 * acc[1]], '.1f')} | {byl} |")
        L += ["", f"AUROC of M_~1 at init over the {sum(v['n'] for v in lm['by_norm'].values())} LM runs: "
                  f"{_fmt(a['auroc'])} {_ci(a['ci95'])}."]
    t2 = res.get("table2_paper") or {}
    if any(v["n"] for v in t2.values()):
        L += ["", "## Table 2 under the paper's design (each normalization at a standard stable lr, No-Norm where it "
              "diverges: `Protocol.paper_design_lr`; AUROC of M_~1 at init [95% bootstrap CI])", "",
              "| DeepNorm | n | diverged | AUROC [CI] | M_~1 by norm (diverged/n) |", "|---|---|---|---|---|"]
        for name, v in t2.items():
            byn = ", ".join(f"{n} {w['near_unit_mass']:.2f} ({w['diverged']}/{w['n']})"
                            for n, w in v["by_norm"].items())
            L.append(f"| {name.replace('deepnorm_', '')}-placed | {v['n']} | {v['diverged']} | {_fmt(v['auroc'])} "
                     f"{_ci(v['ci95']) if v['ci95'] else ''} | {byn} |")
        L += ["", f"The paper: {PAPER['auroc']['near_unit_mass']}. Ours over the within-normalization lr grid: "
                  "Table 2 above. M_~1 at init cannot see the lr: under this design it separates No-Norm (which "
                  "diverges at any lr it is given here) from the rest, which is what the paper's design measures."]
    if res.get("regime") and any(v[m]["n"] for v in res["regime"].values() for m in protocol.regime_methods):
        L += regime_md(protocol, res["regime"])
    if res.get("regime_kss") and any(v["n"] for v in res["regime_kss"].values()):
        L += regime_kss_md(protocol, res["regime_kss"])
    if any(v["by_lr"][lr]["n"] for v in (res.get("regime_maxlr") or {}).values() for lr in v["by_lr"]):
        t = res["regime_maxlr"]
        L += ["", "## Table 5 in the calibrated regime (No-Norm + final LayerNorm, d {}, L {}; largest lr with < 20% "
              "divergence there and at every smaller lr)".format(*protocol.main), "",
              "| method | largest stable lr | divergence per lr |", "|---|---|---|"]
        for m, v in t.items():
            per = ", ".join(f"{lr}: {w['diverged']}/{w['n']}" for lr, w in v["by_lr"].items() if w["n"])
            L.append(f"| {m} | {_lr(v)} | {per} |")
    if any(v["n"] for row in (res.get("learning") or {}).values() for v in row.values()):
        d, n_layers = protocol.main
        L += ["", f"## A learning regime (issue 24: the synthetic LM, d {d}, L {n_layers}, vocabulary {LM['vocab']}, "
              f"length {LM['seq_len']}; divergence % [Wilson 95% CI], next-token accuracy %)", "",
              "| setting | method | n | div % [CI] | Fisher p vs none | how | median stop | acc % (converged) | "
              "acc % (all, diverged = 0) |", "|---|---|---|---|---|---|---|---|---|"]
        for k, row in res["learning"].items():
            for m, v in row.items():
                if not v["n"]:
                    continue
                acc, acc_all = v["accuracy_converged"], v["accuracy_all"]
                L.append(f"| {k} | {m} | {v['n']} | {100 * v['rate']:.0f} {_ci(v['ci95'], 100, '.0f')} | "
                         f"{_fmt(v['fisher_p_vs_none'], '.3g')} | "
                         f"{', '.join(f'{r} {c}' for r, c in v['reasons'].items()) or '-'} | "
                         f"{_fmt(v['diverged_step_median'], '.0f')} | "
                         f"{_ms(None if acc is None else [100 * acc[0], 100 * acc[1]], '.1f')} | "
                         f"{_ms(None if acc_all is None else [100 * acc_all[0], 100 * acc_all[1]], '.1f')} |")
    return "\n".join(L) + "\n"


def _lr(v: dict) -> str:
    if not v["complete"]:
        return "incomplete" if v["max_stable_lr"] is None else f">= {v['max_stable_lr']:g} (incomplete)"
    if v["max_stable_lr"] is None:
        return "< grid"
    return f"{'>= ' if v['censored'] else ''}{v['max_stable_lr']:g}"
