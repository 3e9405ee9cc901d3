"""The pre-flight check, measured: does a 5% probe of a planned run predict whether the run diverges?

Population: the reproduction's runs without KSS (``benchmarks/results/paper_repro/runs.jsonl``; methods none,
clip 0.5, clip 1.0; the paper's label: loss > 50 or gradient norm > 500 within 500 steps), seeds 42 and 123
(the probes' cost: ~2.5-12 s a run at 1 thread).  For each run, ``hf_rksp.pipeline.preflight.run_probe``
replays the run's first K = 25 steps (5% of 500) from the same init and data with the probe's accelerated
warm-up (the lr reaches the planned peak at step 12) and the run's clipping and weight decay; its probe is
cached in ``benchmarks/results/preflight/probes.jsonl`` by run key, so the script is re-runnable on a larger
runs file (only new runs are probed).

HELD-OUT configurations (declared before any model was fitted; no fitting or tuning sees them):
every run at d 256, L 6 (another width and depth), and every run at lr 3.5e-3, 8.5e-3 or 0.2 (the inner
points of the three fine lr grids: No-Norm's, the No-Norm + final-norm regime's, Pre-LN/RMSNorm's max-lr).

Fitting: logistic regression (``hf_rksp.pipeline.risk.fit_logistic``) on candidate feature sets; the set
shipped is the one with the lowest leave-one-group-out log-loss, groups (normalization, d, L), on the
fitting runs alone.  The held-out figures are from that model fitted once on all fitting runs.

    python -m benchmarks.preflight --json          # probe what is missing, fit, print one JSON line
    python -m benchmarks.preflight --json --no-probe   # from the cached probes only

Writes hf_rksp/data/preflight_model.json, benchmarks/results/preflight/result.json and
docs/results/preflight.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import machine, read_by_key, set_threads
from benchmarks.repro.protocol import (
    ALL_METHODS,
    HELDOUT_PROFILE,
    PROFILE_TOKENS,
    RESULTS,
    ROOT,
    RunSpec,
)
from benchmarks.repro.stats import auroc, ece, log_loss
from hf_rksp.pipeline.preflight import (
    FORMAT,
    PROBE_FRACTION,
    PreflightModel,
    ProbeTrace,
    probe_features,
    probe_steps,
    run_probe,
)
from hf_rksp.pipeline.risk import fit_logistic
from hf_rksp.utils import atomic

RUNS = RESULTS / "runs.jsonl"
OUT = ROOT / "benchmarks" / "results" / "preflight"
PROBES = OUT / "probes.jsonl"
MODEL = ROOT / "hf_rksp" / "data" / "preflight_model.json"
DOC = ROOT / "docs" / "results" / "preflight.md"
SEEDS = (42, 123)
HELDOUT_SIZES = {(256, 6)}
HELDOUT_LRS = {3.5e-3, 8.5e-3, 0.2}
GROUPS = ("norm", "d_model", "n_layers")
CEILING_P = 0.5  # lr_ceiling: the lr where P(divergence) = 0.5, as "largest stable lr" below (majority stable)
K_RECORDED = 25  # the recorded traces' first 25 steps: the probe at the *planned* warm-up, no new training
CANDIDATES = {  # feature sets compared by grouped CV on the fitting runs
    "lr": ("log10_lr",),
    "lr + clip": ("log10_lr", "clipped"),
    "grad": ("log10_lr", "clipped", "grad_growth", "grad_max", "loss_rise"),
    "spectral": ("log10_lr", "clipped", "rho_growth", "rho_end"),
    "grad + spectral": ("log10_lr", "clipped", "grad_growth", "grad_max", "loss_rise", "rho_growth", "rho_end"),
    "rho_end": ("log10_lr", "clipped", "rho_end"),
    "rho_growth": ("log10_lr", "clipped", "rho_growth"),
    "rho_end + loss": ("log10_lr", "clipped", "rho_end", "loss_rise"),
}


def spec_of(r: dict) -> RunSpec:
    return RunSpec(**r["spec"])


def in_population(r: dict) -> bool:
    s = r["spec"]
    return not ALL_METHODS[s["method"]].kss and s["seed"] in SEEDS and s.get("stop_at_label", True)


def heldout(r: dict) -> bool:
    s = r["spec"]
    return (s["d_model"], s["n_layers"]) in HELDOUT_SIZES or any(math.isclose(s["lr"], v) for v in HELDOUT_LRS)


def config(r: dict) -> tuple:
    s = r["spec"]
    return (s["task"], s["norm"], s.get("final_norm"), s.get("deepnorm"), s["d_model"], s["n_layers"], s["method"])


# --- probing ----------------------------------------------------------------------------------------------------

def probe_run(r: dict) -> dict:
    """The probe of one run's planned settings, from the run's own init and data."""
    from benchmarks.repro.training import build_model, task_batch, train_data

    spec = spec_of(r)
    model = build_model(spec)
    ids, _ = task_batch(spec, max(1, PROFILE_TOKENS // spec.seq_len), spec.seed + HELDOUT_PROFILE)
    ds = train_data(spec)
    k = probe_steps(spec.steps)
    batches = [{key: torch.stack([ds[i][key] for i in range(j * spec.batch, (j + 1) * spec.batch)])
                for key in ("input_ids", "labels")} for j in range(k)]
    tr = run_probe(model, batches, ids, lr=spec.lr, total_steps=spec.steps, max_grad_norm=ALL_METHODS[spec.method].clip,
                   weight_decay=spec.weight_decay, blocks="gpt.blocks", seed=spec.seed)
    return {"key": r["key"], "loss": tr.loss, "grad_norm": tr.grad_norm, "rho_before": tr.rho_before,
            "rho_after": tr.rho_after, "steps": tr.steps, "seconds": tr.seconds, "diverged": tr.diverged}


def load_probes() -> dict:
    return read_by_key(PROBES)


def probe_missing(runs: list[dict], limit_s: float | None, reverse: bool = False) -> None:
    """Probe every run not in the cache (``reverse``: from the end, so that two processes can share the work)."""
    have = load_probes()
    todo = [r for r in runs if r["key"] not in have][::-1 if reverse else 1]
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, r in enumerate(todo):
        if limit_s is not None and time.perf_counter() - t0 > limit_s:
            print(f"probe: time limit, {len(todo) - i} runs left", file=sys.stderr)
            break
        if r["key"] in load_probes():  # probed by another process meanwhile
            continue
        p = probe_run(r)
        with open(PROBES, "a") as f:
            f.write(json.dumps(p) + "\n")
        print(f"probe {i + 1}/{len(todo)} {spec_of(r).label} {p['seconds']:.1f}s", file=sys.stderr, flush=True)


# --- features ---------------------------------------------------------------------------------------------------

def features(r: dict, p: dict) -> dict:
    s = r["spec"]
    tr = ProbeTrace(loss=[math.inf if v is None else v for v in p["loss"]],
                    grad_norm=[math.inf if v is None else v for v in p["grad_norm"]],
                    rho_before=p["rho_before"], rho_after=p["rho_after"], steps=p["steps"], seconds=p["seconds"],
                    diverged=p["diverged"])
    return probe_features(tr, lr=s["lr"], max_grad_norm=ALL_METHODS[s["method"]].clip)


def recorded_features(r: dict) -> dict:
    """The same gradient features from the run's recorded first K steps (the planned warm-up, lr <= 25% of peak)."""
    s = r["spec"]
    tr = ProbeTrace(loss=[math.inf if v is None else v for v in r["trace"]["loss"][:K_RECORDED]],
                    grad_norm=[math.inf if v is None else v for v in r["trace"]["grad_norm"][:K_RECORDED]],
                    rho_before=[], rho_after=[], steps=K_RECORDED, seconds=0.0, diverged=False)
    f = probe_features(tr, lr=s["lr"], max_grad_norm=ALL_METHODS[s["method"]].clip)
    g = tr.grad_norm
    f["grad_var"] = float(np.log10(np.var(g, ddof=1) + 1e-12))
    return f


def matrix(rows: list[dict], cols: tuple[str, ...], norms: tuple[str, ...] = ()) -> np.ndarray:
    out = []
    for f in rows:
        row = []
        for c in cols:
            if c == "norm":
                row += [float(f["norm"] == n) for n in norms[1:]]
            else:
                row.append(f[c])
        out.append(row)
    return np.asarray(out, dtype=float).reshape(len(rows), -1)


def grouped_oof(rows: list[dict], y: np.ndarray, cols: tuple[str, ...], norms: tuple[str, ...]) -> np.ndarray:
    x = matrix(rows, cols, norms)
    groups = [tuple(f[k] for k in GROUPS) for f in rows]
    p = np.empty(len(y))
    for g in sorted(set(groups), key=str):
        test = np.array([gg == g for gg in groups])
        ytr = y[~test]
        p[test] = (ytr.sum() + 0.5) / (len(ytr) + 1) if ytr.min() == ytr.max() else \
            fit_logistic(x[~test], ytr).predict(x[test])
    return p


def scores(p: np.ndarray, y: np.ndarray, norms_of: list[str]) -> dict:
    within = {n: auroc(p[[m == n for m in norms_of]], y[[m == n for m in norms_of]].astype(bool))
              for n in sorted(set(norms_of))}
    defined = [v for v in within.values() if v is not None]
    return {"auroc_pooled": auroc(p, y.astype(bool)), "auroc_within_norm": within,
            "auroc_within_norm_min": min(defined) if defined else None, "ece": ece(p, y),
            "log_loss": log_loss(p, y), "n": len(y), "n_diverged": int(y.sum())}


def largest_stable(rs: list[dict]) -> float | None:
    """The largest lr of a configuration's grid at which fewer than half its runs diverged, every larger lr
    diverging in half or more; None when the grid has no stable lr or no unstable one above it."""
    by = defaultdict(list)
    for r in rs:
        by[r["spec"]["lr"]].append(r["diverged"])
    lrs = sorted(by)
    rate = {lr: sum(v) / len(v) for lr, v in by.items()}
    stable = [lr for lr in lrs if rate[lr] < 0.5]
    if not stable or not any(rate[lr] >= 0.5 for lr in lrs if lr > stable[-1]):
        return None
    best = stable[-1]
    return best if all(rate[lr] >= 0.5 for lr in lrs if lr > best) else None


def lr_response(runs: list[dict], rows: list[dict], cols: tuple[str, ...]) -> dict:
    """feature -> pooled within-configuration least-squares slope of the feature on log10 lr (configurations
    with 2+ lrs; each demeaned by its own means)."""
    by = defaultdict(list)
    for r, f in zip(runs, rows):
        by[config(r)].append(f)
    out = {}
    for c in cols:
        if c in ("log10_lr", "clipped"):
            continue
        num = den = 0.0
        for fs in by.values():
            x = np.array([f["log10_lr"] for f in fs])
            if np.ptp(x) == 0:
                continue
            v = np.array([f[c] for f in fs])
            num += float(((x - x.mean()) * (v - v.mean())).sum())
            den += float(((x - x.mean()) ** 2).sum())
        out[c] = num / den if den > 0 else 0.0
    return out


# --- KSSConfig(mode="auto"): which rule should switch KSS on? (issue 25, item 4) -----------------------------------

AUTO_METHOD = "alpha_0.15"  # the paper's KSS setting, the one every policy switches on


def monitor_figures() -> dict:
    """The early-warning monitor's held-out figures, from benchmarks/monitor_warning.py on the monitor group's
    runs (None where those runs are absent)."""
    from benchmarks import monitor_warning

    if not monitor_warning.RUNS.is_file():
        return {"monitor_median_lead_steps": None, "monitor_false_alarm_rate": None, "monitor": None}
    raw = monitor_warning.RUNS.read_bytes()
    res = monitor_warning.analyze([json.loads(line) for line in raw.decode().splitlines() if line.strip()],
                                  hashlib.sha256(raw).hexdigest())
    return {"monitor_median_lead_steps": res["monitor_median_lead_steps"],
            "monitor_false_alarm_rate": res["monitor_false_alarm_rate"], "monitor": res}


def auto_policies(runs: list[dict], p_of: dict[str, float], all_runs: list[dict]) -> dict:
    """Each run without clipping or KSS paired with its twin trained with KSS (same model, data, lr, seed;
    method alpha 0.15): the divergences a policy gets by training one of the two.  Policies: never KSS, always
    KSS, the paper's init-only rule (KSS on when M_~1 at init > 0.5 or the layer-mean kappa(V) > 1e4: KSSConfig's
    auto defaults) and the pre-flight's (KSS on when its P(divergence) >= 0.5; P from ``p_of``, out-of-fold or
    held-out, never a fit that saw the run)."""
    from hf_rksp.training.kss import KSSConfig

    cfg = KSSConfig(mode="auto")
    by_key = {r["key"]: r for r in all_runs}
    pairs = []
    for r in runs:
        if r["spec"]["method"] != "none" or r["key"] not in p_of:
            continue
        twin = by_key.get(RunSpec(**{**r["spec"], "method": AUTO_METHOD}).key)
        if twin is not None:
            pairs.append((r, twin))
    rules = {
        "never": lambda r: False,
        "always": lambda r: True,
        "paper init rule": lambda r: r["init"]["near_unit_mass"] > cfg.auto_threshold
        or r["init"]["eigvec_condition"] > cfg.auto_kappa,
        "pre-flight P >= 0.5": lambda r: p_of[r["key"]] >= 0.5,
    }
    out = {"pairs": len(pairs), "diverged_without_kss": sum(a["diverged"] for a, _ in pairs),
           "diverged_with_kss": sum(b["diverged"] for _, b in pairs)}
    for name, on in rules.items():
        out[name] = {"kss_on": sum(on(a) for a, _ in pairs),
                     "diverged": sum((b if on(a) else a)["diverged"] for a, b in pairs)}
    return out


# --- the lr-range test, as users run it (fastai's lr_find, Lightning's Tuner.lr_find) ------------------------

LR_RANGE = OUT / "lr_range.jsonl"
RANGE_STEPS, RANGE_LO, RANGE_HI, RANGE_STOP = 100, 1e-6, 10.0, 4.0  # fastai's defaults: 100 steps, stop at 4x


def lr_range_test(r: dict) -> dict:
    """An exponential lr ramp from RANGE_LO to RANGE_HI over RANGE_STEPS AdamW steps on the configuration's model
    (the run's init, data, weight decay and clipping), stopped when the smoothed loss exceeds RANGE_STOP x its
    minimum; suggestions: fastai's classic (the lr at the smoothed loss's minimum / 10) and Lightning's (the
    steepest descent of the smoothed loss)."""
    from benchmarks.repro.training import build_model, train_data

    spec = spec_of(r)
    torch.manual_seed(spec.seed)
    model = build_model(spec)
    model.train()
    ds = train_data(spec)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=RANGE_LO)
    clip = ALL_METHODS[spec.method].clip
    lrs, smooth, avg = [], [], 0.0
    t0 = time.perf_counter()
    for t in range(RANGE_STEPS):
        lr = RANGE_LO * (RANGE_HI / RANGE_LO) ** (t / (RANGE_STEPS - 1))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = {k: torch.stack([ds[i][k] for i in range(t * spec.batch, (t + 1) * spec.batch)])
                 for k in ("input_ids", "labels")}
        opt.zero_grad(set_to_none=True)
        loss = model(**batch)["loss"]
        if not torch.isfinite(loss):
            break
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        avg = 0.98 * avg + 0.02 * float(loss.detach())
        smooth.append(avg / (1 - 0.98 ** (t + 1)))
        lrs.append(lr)
        if smooth[-1] > RANGE_STOP * min(smooth):
            break
    i_min = int(np.argmin(smooth))
    grads = np.gradient(np.array(smooth), np.log10(np.array(lrs))) if len(smooth) > 2 else np.zeros(1)
    return {"config": " ".join(str(v) for v in config(r)), "lr_min_over_10": lrs[i_min] / 10,
            "lr_steepest": lrs[int(np.argmin(grads[:max(1, i_min)]))] if len(smooth) > 2 else lrs[0],
            "steps": len(lrs), "seconds": time.perf_counter() - t0}


def lr_range_missing(runs: list[dict]) -> None:
    have = {json.loads(line)["config"] for line in LR_RANGE.read_text().splitlines()} if LR_RANGE.exists() else set()
    pop = [r for r in runs if in_population(r)]
    cfgs = {}
    for r in pop:
        if heldout(r) and r["spec"]["seed"] == SEEDS[0]:
            cfgs.setdefault(config(r), r)
    for c, r in sorted(cfgs.items(), key=lambda kv: str(kv[0])):
        if " ".join(str(v) for v in c) in have or largest_stable([x for x in pop if config(x) == c]) is None:
            continue
        res = lr_range_test(r)
        with open(LR_RANGE, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"lr range {res['config']} {res['seconds']:.1f}s", file=sys.stderr, flush=True)


def lr_range_scores(ceil_rows: list[dict]) -> dict | None:
    if not LR_RANGE.exists():
        return None
    tests = {d["config"]: d for d in map(json.loads, LR_RANGE.read_text().splitlines())}
    out = {}
    for key in ("lr_min_over_10", "lr_steepest"):
        rows = [(tests[r["config"]][key] / r["largest_stable_lr"]) for r in ceil_rows if r["config"] in tests]
        out[key] = {"within_1_5x": (sum(1 / 1.5 <= x <= 1.5 for x in rows) / len(rows)) if rows else None,
                    "n": len(rows), "ratios": rows}
    return out


# --- main -------------------------------------------------------------------------------------------------------

def analyze(all_runs: list[dict], sha: str, write: bool) -> dict:
    probes = load_probes()
    pop = [r for r in all_runs if in_population(r) and r["key"] in probes]
    fit_runs = [r for r in pop if not heldout(r)]
    ho_runs = [r for r in pop if heldout(r)]
    norms = tuple(sorted({r["spec"]["norm"] for r in pop}))

    def rows(rs, rec=False):
        out = []
        for r in rs:
            f = recorded_features(r) if rec else features(r, probes[r["key"]])
            f.update({k: r["spec"][k] for k in GROUPS})
            f["M"] = r["init"]["near_unit_mass"]
            out.append(f)
        return out

    xf, xh = rows(fit_runs), rows(ho_runs)
    yf = np.array([r["diverged"] for r in fit_runs], dtype=float)
    yh = np.array([r["diverged"] for r in ho_runs], dtype=float)
    nh = [r["spec"]["norm"] for r in ho_runs]
    cv = {}
    for name, cols in CANDIDATES.items():
        p = grouped_oof(xf, yf, cols, norms)
        cv[name] = {"features": list(cols), **scores(p, yf, [f["norm"] for f in xf])}
    best = min(cv, key=lambda k: cv[k]["log_loss"])
    cols = CANDIDATES[best]
    fit = fit_logistic(matrix(xf, cols), yf)
    ph = fit.predict(matrix(xh, cols))
    held = scores(ph, yh, nh)
    p_oof = grouped_oof(xf, yf, cols, norms)
    auto = {"fitting (out-of-fold P)": auto_policies(fit_runs, {r["key"]: float(v) for r, v in zip(fit_runs, p_oof)},
                                                     all_runs),
            "held-out": auto_policies(ho_runs, {r["key"]: float(v) for r, v in zip(ho_runs, ph)}, all_runs)}

    def heldout_of(cols_, xs_f, xs_h):
        m = fit_logistic(matrix(xs_f, cols_, norms), yf)
        return scores(m.predict(matrix(xs_h, cols_, norms)), yh, nh)

    rf, rh = rows(fit_runs, rec=True), rows(ho_runs, rec=True)
    baselines = {  # each fitted on the fitting runs, scored on the held-out runs
        "M_init": heldout_of(("M",), xf, xh),
        "norm + lr": heldout_of(("norm", "log10_lr"), xf, xh),
        "lr + clip": heldout_of(("log10_lr", "clipped"), xf, xh),
        "probe gradient (grad growth, max, loss rise)": heldout_of(CANDIDATES["grad"], xf, xh),
        "probe spectral (rho growth, rho end)": heldout_of(CANDIDATES["spectral"], xf, xh),
        "planned warm-up, recorded first 25 steps: grad norm, variance, loss rise":
            heldout_of(("log10_lr", "clipped", "grad_growth", "grad_max", "grad_var", "loss_rise"), rf, rh),
    }
    raw = {name: auroc([f[name] for f in xh], yh.astype(bool)) for name in
           ("grad_growth", "grad_max", "loss_rise", "rho_growth", "rho_end")}
    raw["recorded grad_var (planned warm-up)"] = auroc([f["grad_var"] for f in rh], yh.astype(bool))
    raw["recorded loss_rise (planned warm-up)"] = auroc([f["loss_rise"] for f in rh], yh.astype(bool))

    # lr ceiling per held-out configuration: median over its held-out runs' probes
    response = lr_response(fit_runs, xf, cols)
    model = PreflightModel(features=tuple(cols), fit=fit, ceiling_probability=CEILING_P, valid={}, heldout={},
                           cv={}, provenance={}, lr_response=response)
    by_cfg = defaultdict(list)
    for r in pop:
        by_cfg[config(r)].append(r)

    def ceilings(m: PreflightModel, runs_: list[dict], rows_: list[dict]) -> list[dict]:
        """Per configuration of ``runs_`` whose grid brackets its edge: the median ceiling of its probes in
        ``runs_`` against its largest stable lr (read from all its runs' labels)."""
        out = []
        for c in sorted({config(r) for r in runs_}, key=str):
            truth = largest_stable(by_cfg[c])
            cs = [m.lr_ceiling(f) for r, f in zip(runs_, rows_) if config(r) == c]
            cs = [v for v in cs if v is not None]
            if truth is None or not cs:
                continue
            pred = float(np.median(cs))
            out.append({"config": " ".join(str(v) for v in c), "largest_stable_lr": truth, "lr_ceiling": pred,
                        "ratio": pred / truth, "within_1_5x": bool(1 / 1.5 <= pred / truth <= 1.5)})
        return out

    # the first-order ceiling's bias, measured on the fitting configurations only (their runs, their labels),
    # is divided out: ceiling_scale = 10^-(median log10 ratio)
    fit_ceil = ceilings(model, fit_runs, xf)
    scale = float(10 ** -np.median([math.log10(r["ratio"]) for r in fit_ceil])) if fit_ceil else 1.0
    model = dataclasses.replace(model, ceiling_scale=scale)
    ceil_rows = ceilings(model, ho_runs, xh)
    within = (sum(r["within_1_5x"] for r in ceil_rows) / len(ceil_rows)) if ceil_rows else None
    probe_s = [probes[r["key"]]["seconds"] for r in pop]
    run_s = [r["train_s"] + r["profile_s"] for r in pop if not r["diverged"]]
    k = probe_steps(500)
    result = {
        "heldout_auroc_within_norm_min": held["auroc_within_norm_min"],
        "heldout_auroc_pooled": held["auroc_pooled"],
        "heldout_ece": held["ece"],
        "probe_cost_fraction": k / 500,
        "lr_ceiling_within_1_5x": within,
        "lr_ceiling_configs": len(ceil_rows),
        **monitor_figures(),
        "model_features": list(cols),
        "selected_by": "lowest grouped-CV log-loss on the fitting runs, groups (norm, d_model, n_layers)",
        "heldout": held, "cv": cv, "baselines_heldout": baselines, "raw_feature_auroc_heldout": raw,
        "lr_ceiling": ceil_rows, "lr_ceiling_fitting_configs": fit_ceil, "ceiling_scale": scale,
        "lr_range_test_heldout": lr_range_scores(ceil_rows),
        "kss_auto_policies": auto,
        "probe_seconds_median": float(np.median(probe_s)), "stable_run_seconds_median": float(np.median(run_s)),
        "n_fit": len(fit_runs), "n_fit_diverged": int(yf.sum()), "n_heldout": len(ho_runs),
        "n_heldout_diverged": int(yh.sum()), "runs_sha256": sha, "machine": machine(),
    }
    if write:
        feats = matrix(xf, cols)  # the fitting runs only: the held-out ones stay out of everything fitted
        valid = {"d_model": [min(r["spec"]["d_model"] for r in fit_runs), max(r["spec"]["d_model"] for r in fit_runs)],
                 "n_layers": [min(r["spec"]["n_layers"] for r in fit_runs),
                              max(r["spec"]["n_layers"] for r in fit_runs)],
                 "warmup_fraction": [0.2, 0.2],
                 **{c: [float(feats[:, i].min()), float(feats[:, i].max())] for i, c in enumerate(cols)}}
        shipped = PreflightModel(
            features=tuple(cols), fit=fit, ceiling_probability=CEILING_P, valid=valid,
            heldout={"heldout_auroc": held["auroc_pooled"], "heldout_auroc_within_norm_min":
                     held["auroc_within_norm_min"], "heldout_ece": held["ece"], "heldout_n": len(ho_runs),
                     "heldout_configurations": "d 256 L 6, and lr 3.5e-3, 8.5e-3, 0.2",
                     "lr_ceiling_within_1_5x": within},
            cv={"groups": list(GROUPS), **{k2: v for k2, v in cv[best].items() if k2 != "features"}},
            lr_response=response, ceiling_scale=scale,
            provenance={"runs_sha256": sha, "n_runs": len(fit_runs), "n_diverged": int(yf.sum()),
                        "divergence_definition": "loss > 50 or gradient norm > 500 (or non-finite) within 500 steps",
                        "sweep": "benchmarks/paper_repro.py: GPT-2-style d 128/256, L 4/6, recall and synthetic "
                                 "LM, six normalizations, AdamW, batch 16, 500 steps, 100 warm-up, wd 0.01",
                        "probe": f"{k} steps ({PROBE_FRACTION:.0%}), lr ramp to peak over {k // 2}, then peak",
                        "script": "benchmarks/preflight.py", "format": FORMAT})
        atomic.write_bytes(MODEL, (json.dumps(shipped.to_json(), indent=1) + "\n").encode())
        OUT.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(OUT / "result.json", (json.dumps(result, indent=1) + "\n").encode())
        atomic.write_bytes(DOC, doc(result).encode())
        readme = ROOT / "README.md"
        text = readme.read_text()
        a, b = "<!-- preflight:start -->\n", "<!-- preflight:end -->"
        if a in text and b in text:
            head, rest = text.split(a, 1)
            atomic.write_bytes(readme, (head + a + readme_lines(result) + rest[rest.index(b):]).encode())
    return result


def readme_lines(res: dict) -> str:
    m = res["machine"]
    return (f"Measured on configurations held out from all fitting ({res['n_heldout']} runs: d 256 L 6, and lrs "
            f"3.5e-3, 8.5e-3, 0.2): AUROC {_f(res['heldout_auroc_pooled'], '.2f')} pooled, "
            f"{_f(res['heldout_auroc_within_norm_min'], '.2f')} in the worst normalization, ECE "
            f"{_f(res['heldout_ece'], '.3f')}; lr_ceiling within 1.5x of the largest stable lr on "
            f"{_f(res['lr_ceiling_within_1_5x'], '.2f')} of {res['lr_ceiling_configs']} held-out configurations "
            f"({'so `lr_ceiling` is given' if (res['lr_ceiling_within_1_5x'] or 0) >= 0.8 else 'below 0.8: `lr_ceiling` is withheld'}); probe {res['probe_cost_fraction']:.0%} of the steps. The "
            f"normalization's identity plus the lr alone scores AUROC "
            f"{_f(res['baselines_heldout']['norm + lr']['auroc_pooled'], '.2f')} pooled (needs the normalization "
            f"named, and a grid of it), M_~1 at init {_f(res['baselines_heldout']['M_init']['auroc_pooled'], '.2f')}"
            f" ({m['processor']}, {m['torch_threads']} thread; [details and baselines](docs/results/preflight.md))."
            + monitor_readme(res.get("monitor")) + "\n")


def monitor_readme(m: dict | None) -> str:
    from benchmarks.monitor_warning import shipped_rule

    if m is None or m["chosen"] is None:
        return ""
    h = m["detectors"][m["chosen"]]["heldout"]
    shipped = shipped_rule(m)["rule"] is not None
    base = {n: m["detectors"][n] for n in ("grad-norm spike", "loss spike", "grad-norm level")}
    return (f" The monitor's early warning (`RKSPMonitorCallback`; best spectral rule `{m['monitor_rule']}` > "
            f"{m['monitor_threshold']:g}, fitted at <= 5% false alarms, "
            f"{'shipped as its default' if shipped else 'not shipped as a default: too few fitting runs flagged'}) "
            f"on {m['heldout_runs']} held-out runs: "
            f"{h['detected']}/{h['diverged_runs']} divergences flagged before the label, median lead "
            f"{_f(h['median_lead_steps'], '.1f')} steps (misses count 0), false alarms "
            f"{h['false_alarm_rate']:.2f}; at the same fitting, " + "; ".join(
                f"{n} {d['heldout']['detected']}/{d['heldout']['diverged_runs']}, lead "
                f"{_f(d['heldout']['median_lead_steps'], '.1f')}, false alarms {d['heldout']['false_alarm_rate']:.2f}"
                if d.get("threshold") is not None else f"{n} none fitted" for n, d in base.items()) + ".")


def _f(v, f=".3f"):
    return "—" if v is None else format(v, f)


def doc(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Pre-flight check: measured",
        "",
        ("Written by `python -m benchmarks.preflight --json` (do not edit by hand). Machine: "
         f"{m['processor']}, {m['cpu_count']} cores, torch {m['torch']}, {m['torch_threads']} thread(s), no GPU."),
        "",
        (f"Population: the reproduction's runs without KSS, seeds {', '.join(map(str, SEEDS))} "
         f"({res['n_fit']} fitting runs, {res['n_fit_diverged']} diverged; {res['n_heldout']} held-out runs, "
         f"{res['n_heldout_diverged']} diverged). Held out from all fitting and selection: d 256 L 6, and every run "
         "at lr 3.5e-3, 8.5e-3 or 0.2. Probe: 25 steps (5% of the 500-step run) with the lr ramped to the planned "
         f"peak over 12 steps; median probe {res['probe_seconds_median']:.1f} s at 1 thread vs "
         f"{res['stable_run_seconds_median']:.0f} s for a full stable run (with the blocks' spectra before and after)."),
        "",
        f"Shipped features: `{', '.join(res['model_features'])}` ({res['selected_by']}).",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| held-out AUROC, pooled | {_f(res['heldout_auroc_pooled'])} | ≥ 0.95 |",
        f"| held-out AUROC, worst normalization | {_f(res['heldout_auroc_within_norm_min'])} | ≥ 0.95 |",
        f"| held-out ECE | {_f(res['heldout_ece'])} | ≤ 0.05 |",
        f"| probe cost (share of the run's steps) | {_f(res['probe_cost_fraction'], '.2f')} | ≤ 0.05 |",
        (f"| lr_ceiling within 1.5x of the largest stable lr ({res['lr_ceiling_configs']} held-out configurations) | "
         f"{_f(res['lr_ceiling_within_1_5x'], '.2f')} | ≥ 0.80 |"),
        "",
        "Held-out AUROC within each normalization: " + ", ".join(
            f"{n} {_f(v)}" for n, v in res["heldout"]["auroc_within_norm"].items()) + " (— : one class only).",
        "",
        "## Baselines and ablation (each fitted on the fitting runs, scored on the held-out runs)",
        "",
        "| predictor | pooled AUROC | worst-norm AUROC | ECE |",
        "|---|---|---|---|",
    ]
    for name, s in res["baselines_heldout"].items():
        lines.append(f"| {name} | {_f(s['auroc_pooled'])} | {_f(s['auroc_within_norm_min'])} | {_f(s['ece'])} |")
    lines += ["", "Single features as raw scores on the held-out runs (AUROC): " + ", ".join(
        f"{k} {_f(v)}" for k, v in res["raw_feature_auroc_heldout"].items()) + ".", "",
        "## Grouped cross-validation on the fitting runs (leave one (norm, d, L) out)", "",
        "| feature set | AUROC | worst-norm AUROC | ECE | log-loss |", "|---|---|---|---|---|"]
    for name, s in res["cv"].items():
        lines.append(f"| {name} | {_f(s['auroc_pooled'])} | {_f(s['auroc_within_norm_min'])} | {_f(s['ece'])} | "
                     f"{_f(s['log_loss'])} |")
    lines += ["", "## lr_ceiling on the held-out configurations (P = 0.5, median over the configuration's probes)", "",
              "| configuration | largest stable lr (grid) | lr_ceiling | ratio |", "|---|---|---|---|"]
    for r in res["lr_ceiling"]:
        lines.append(f"| {r['config']} | {r['largest_stable_lr']:g} | {r['lr_ceiling']:.3g} | {r['ratio']:.2f} |")
    b = res["baselines_heldout"]
    g, sp = b["probe gradient (grad growth, max, loss rise)"], b["probe spectral (rho growth, rho end)"]
    planned = b["planned warm-up, recorded first 25 steps: grad norm, variance, loss rise"]
    lines += ["", "## Reading", "",
              (f"- What the spectral features add at equal probe cost: the shipped model (gradient + spectral "
               f"features) scores {_f(res['heldout_auroc_pooled'])} pooled on the held-out runs, the gradient "
               f"features alone {_f(g['auroc_pooled'])}, the spectral features alone {_f(sp['auroc_pooled'])}: "
               + ("on these runs the whitened spectral radius adds no held-out discrimination over the gradient "
                  "features (it names the block that runs away)."
                  if (res["heldout_auroc_pooled"] or 0) <= (g["auroc_pooled"] or 0) + 0.01 else
                  "the whitened spectral radius adds held-out discrimination over the gradient features.")),
              (f"- The accelerated warm-up matters: the same gradient features read from the runs' own first 25 "
               f"steps (planned warm-up, lr at most 25% of the peak) score {_f(planned['auroc_pooled'])} pooled, "
               f"{_f(planned['auroc_within_norm_min'])} in the worst normalization."),
              (f"- The normalization's identity plus the lr ({_f(b['norm + lr']['auroc_pooled'])} pooled, "
               f"{_f(b['norm + lr']['auroc_within_norm_min'])} worst normalization) beats the probe pooled: on this "
               "sweep the normalization decides most of it. It needs the normalization named and runs of it "
               "at several lrs; the probe needs neither. M_~1 at init (the paper's score): "
               f"{_f(b['M_init']['auroc_pooled'])}."),
              (f"- Calibration is poor (held-out ECE {_f(res['heldout_ece'])}): read the probability as a ranking "
               "more than a frequency." + ("" if (res["heldout_auroc_within_norm_min"] or 0) >= 0.95 and
                                            (res["heldout_ece"] or 1) <= 0.05 and (res["lr_ceiling_within_1_5x"] or 0)
                                            >= 0.8 else " The targets (AUROC >= 0.95, ECE <= 0.05, lr_ceiling "
                                            "within 1.5x on >= 80%) are not all reached."))]
    lines += monitor_doc(res.get("monitor")) + auto_doc(res["kss_auto_policies"])
    lrr = res.get("lr_range_test_heldout")
    if lrr:
        lines += ["", ("The lr-range test as users run it (fastai's `lr_find` / Lightning's `Tuner.lr_find`: an exponential "
                       f"ramp {RANGE_LO:g} to {RANGE_HI:g} over {RANGE_STEPS} AdamW steps on the configuration's model, "
                       f"stopped at {RANGE_STOP:g}x the smoothed loss's minimum; {RANGE_STEPS} steps, 20% of the run) "
                       "on the same held-out configurations: within 1.5x of the largest stable lr for "
                       f"{_f(lrr['lr_min_over_10']['within_1_5x'], '.2f')} (fastai's minimum/10 suggestion) and "
                       f"{_f(lrr['lr_steepest']['within_1_5x'], '.2f')} (Lightning's steepest descent) of "
                       f"{lrr['lr_min_over_10']['n']} configurations; ratios to the largest stable lr "
                       + ", ".join(f"{x:.2g}" for x in lrr["lr_min_over_10"]["ratios"]) + " and "
                       + ", ".join(f"{x:.2g}" for x in lrr["lr_steepest"]["ratios"]) + ". On the recall task the "
                       "loss sits near ln 256 until the model starts to learn, so the smoothed loss's minimum and "
                       "steepest descent fall on noise at tiny lrs: the test, run as users run it, says little "
                       "here (seed 42, one ramp per configuration).")]
    lines += ["", (f"The first-order ceiling's bias, measured on the {len(res['lr_ceiling_fitting_configs'])} fitting "
                   f"configurations whose grid brackets the edge, is divided out (ceiling_scale "
                   f"{res['ceiling_scale']:.3g}); the held-out configurations above are scored after that.")]
    lines += ["", ("The largest stable lr is read off each configuration's grid (fewer than half its runs diverged, "
                   "every larger grid lr half or more); the grids are coarse (x10 steps at d 256 L 6), so the true "
                   "edge lies anywhere up to the next grid lr."), ""]
    return "\n".join(lines)


def monitor_doc(m: dict | None) -> list[str]:
    from benchmarks.monitor_warning import FALSE_ALARM, SPIKE_PRIOR, shipped_rule

    lines = ["", "## The early-warning monitor (`RKSPMonitorCallback`)", ""]
    if m is None:
        return lines + ["The monitor group's runs (benchmarks/results/monitor/runs.jsonl) are not in this checkout."]
    every = ", ".join(str(v) for v in m["monitor_every_n_steps"])
    shipped = shipped_rule(m)
    lines += [(f"{m['runs']} runs of the reproduction's `monitor` group ({m['fitting_runs']} fitting, "
               f"{m['fitting_diverged']} diverged; {m['heldout_runs']} held out, {m['heldout_diverged']} diverged), "
               f"profiled every {every} steps by the library's callback; every detector's threshold is the smallest "
               f"of its grid with <= {FALSE_ALARM:.0%} false alarms on the fitting runs that did not diverge, then "
               "scored on the held-out runs. Lead = label step - alarm step on the label's clock; a miss counts 0 in "
               f"the median. Spikes: the value over the median of the previous {SPIKE_PRIOR} steps. "
               f"The spectral rule compared with the baselines is `{m['chosen']}` ({m['selected_by']}). "
               + (f"In the {g['runs']} runs that did not diverge, the most grown block's radius reached a median "
                  f"{g['median']:.0f}x its value at train begin (at most {g['max']:.0f}x). "
                  if (g := m.get("stable_runs_largest_growth")) else "")
               + ("It is the callback's default (`early_warning=\"fitted\"`)." if shipped["rule"]
                  else f"No rule is shipped as the callback's default: {shipped.get('reason')}.")), "",
              "| detector (held-out runs) | threshold | false alarms | detected before the label | median lead, "
              "misses 0 (steps) | median lead, detected | alarmed block = most grown block |",
              "|---|---|---|---|---|---|---|"]
    for name, d in m["detectors"].items():
        if d.get("threshold") is None:
            lines.append(f"| {name} | none fitted | — | — | — | — | — |")
            continue
        h = d["heldout"]
        lines.append(f"| {name} | {d['threshold']:g} | {h['false_alarm_rate']:.3f} ({h['stable_runs']} runs) | "
                     f"{h['detected']}/{h['diverged_runs']} | {_f(h['median_lead_steps'], '.1f')} | "
                     f"{_f(h['median_lead_detected'], '.1f')} | {_f(h['block_named_agrees'], '.2f')} |")
    return lines


def auto_doc(auto: dict) -> list[str]:
    lines = ["", "## Which rule should switch KSS on (`KSSConfig(mode=\"auto\")`)?", "",
             (f"Each run without clipping or KSS paired with its twin trained with KSS ({AUTO_METHOD}; same model, "
              "data, lr and seed): the divergences a rule gets by training the twin it picks. The paper's rule "
              "reads RKSP at init (KSS on when M_~1 > 0.5 or kappa(V) > 1e4); the pre-flight's turns KSS on when "
              "its P(divergence) >= 0.5 (out-of-fold P on the fitting runs, the shipped fit's on the held-out ones)."),
             "", "| runs | pairs | never KSS | always KSS | paper's init rule | pre-flight P >= 0.5 |",
             "|---|---|---|---|---|---|"]
    for name, a in auto.items():
        lines.append(f"| {name} | {a['pairs']} | " + " | ".join(
            f"{a[k]['diverged']} diverged (KSS on {a[k]['kss_on']})"
            for k in ("never", "always", "paper init rule", "pre-flight P >= 0.5")) + " |")
    rules = ("never", "always", "paper init rule", "pre-flight P >= 0.5")
    for name, a in auto.items():
        least = min(a[k]["diverged"] for k in rules)
        lines += ["", f"{name}: fewest divergences with " + ", ".join(f"`{k}`" for k in rules
                                                                     if a[k]["diverged"] == least) + "."]
    better = all(a["pre-flight P >= 0.5"]["diverged"] < a["paper init rule"]["diverged"] for a in auto.values())
    lines += ["", ("The pre-flight's rule beats the paper's on both sets of runs." if better else
                   "The pre-flight's rule does not beat the paper's on both sets of runs, so `mode=\"auto\"` keeps "
                   "the paper's rule.")]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(RUNS))
    ap.add_argument("--json", action="store_true", help="print one JSON line of the headline figures")
    ap.add_argument("--no-probe", action="store_true", help="use the cached probes only")
    ap.add_argument("--probe-limit-s", type=float, default=None, help="stop probing after this many seconds")
    ap.add_argument("--no-write", action="store_true", help="do not write the model, result and doc files")
    ap.add_argument("--probe-reverse", action="store_true", help="probe the missing runs from the last one")
    ap.add_argument("--probe-only", action="store_true", help="probe, then stop (no fit)")
    ap.add_argument("--lr-range", action="store_true",
                    help="also run the lr-range test baseline on the held-out configurations (cached)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    set_threads(a.threads)
    raw = Path(a.runs).read_bytes()
    runs = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    if not a.no_probe:
        probe_missing([r for r in runs if in_population(r)], a.probe_limit_s, a.probe_reverse)
    if a.lr_range:
        lr_range_missing(runs)
    if a.probe_only:
        return 0
    res = analyze(runs, hashlib.sha256(raw).hexdigest(), write=not a.no_write)
    keys = ("heldout_auroc_within_norm_min", "heldout_auroc_pooled", "heldout_ece", "probe_cost_fraction",
            "lr_ceiling_within_1_5x", "monitor_median_lead_steps", "monitor_false_alarm_rate", "model_features")
    head = {k: res[k] for k in keys}
    head["baselines_heldout_auroc_pooled"] = {k: v["auroc_pooled"] for k, v in res["baselines_heldout"].items()}
    print(json.dumps(head) if a.json else json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
