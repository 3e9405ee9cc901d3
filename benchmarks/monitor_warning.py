"""The monitor's early warning, measured: does a block's whitened spectrum alarm before a run diverges?

Population: the reproduction's ``monitor`` group (``python -m benchmarks.paper_repro --out
benchmarks/results/monitor run monitor``): the paper's models and protocol (recall task, 500 steps, 100-step
warm-up, batch 16, AdamW, weight decay 0.01, no clipping), the paper's label (loss > 50 or gradient norm > 500),
each normalization at lrs where it stays stable and where it diverges, seeds 42 and 123.  During training the
library's ``RKSPMonitorCallback`` profiled every block (full whitened DMD on 2,048 held-out token states) at
train begin and every 5 optimizer steps; the runs also record the loss and gradient norm of every step.

HELD-OUT configurations: the ones ``benchmarks/preflight.py`` holds out (every run at d 256, L 6, and every run
at lr 3.5e-3, 8.5e-3 or 0.2), declared there before any fit.  Nothing below sees them until the thresholds are
fixed.

Detectors, each with the smallest threshold of its grid that alarms on at most 5% of the fitting runs that did
not diverge (the false-alarm rate), then scored on the held-out runs:

- spectral, ``hf_rksp.training.monitor.EarlyWarning``: ``ratio`` (one block's radius over its own value at train
  begin), ``jump`` (over its value at the previous profile) and ``absolute`` (one block's radius); the rule
  shipped is the one with the longest median lead on the fitting runs that diverged;
- gradient-norm spike and loss spike: the value over the median of the previous 20 steps (every step);
- gradient-norm level: the gradient norm itself (every step; the label fires at 500).

Lead = label step - alarm step, on the label's clock (a profile after optimizer step s counts at s + 1, the step
whose loss and gradient come from those weights); an alarm at or after the label is a miss.  ``median_lead_steps`` is the median
over every diverged run, a miss counting 0; ``median_lead_detected`` over the detected ones.

    python -m benchmarks.monitor_warning --json      # fit, score, write hf_rksp/data/monitor_warning.json

Writes hf_rksp/data/monitor_warning.json and benchmarks/results/monitor/result.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from benchmarks.harness import machine
from benchmarks.preflight import heldout  # one definition of the held-out set
from benchmarks.repro.protocol import ROOT
from hf_rksp.training.monitor import EarlyWarning
from hf_rksp.utils import atomic

RUNS = ROOT / "benchmarks" / "results" / "monitor" / "runs.jsonl"
OUT = ROOT / "benchmarks" / "results" / "monitor" / "result.json"
SHIPPED = ROOT / "hf_rksp" / "data" / "monitor_warning.json"
FALSE_ALARM = 0.05
SPIKE_PRIOR = 20  # a spike: the value over the median of the previous 20 steps
GRIDS = {  # the thresholds tried, smallest first
    "ratio": tuple(float(f"{v:.3g}") for v in np.geomspace(1.05, 1e4, 80)),
    "absolute": tuple(float(f"{v:.3g}") for v in np.geomspace(1.0, 1e4, 80)),
    "jump": tuple(float(f"{v:.3g}") for v in np.geomspace(1.05, 1e4, 80)),
    "spike": (1.1, 1.2, 1.3, 1.5, 2, 3, 5, 10, 20, 50, 100, 1000),
    "level": tuple(float(f"{v:.3g}") for v in np.geomspace(1.0, 500, 40)),
}


def label_step(r: dict) -> int | None:
    return r["diverged_step"] if r["diverged"] else None


# --- the detectors: each returns the first alarm step (and, for the spectral ones, the block) or None ----------

def spectral_alarm(rule: EarlyWarning, r: dict):
    """The monitor profiles at the end of optimizer step s, on the weights the forward of step s + 1 sees: on
    the label's clock (the loss and gradient norm of step t come from the weights after step t - 1) its alarm
    is at s + 1."""
    a = rule.first_alarm([(t["step"], t["rho"]) for t in r["rho_trace"]])
    return (a.step + 1, a.block) if a is not None else None


def spike_alarm(trace: list[float | None], thr: float):
    """The first step (1-based, as the label's) whose value exceeds ``thr`` x the median of the SPIKE_PRIOR steps
    before it (a non-finite value counts)."""
    vals = [math.inf if v is None else v for v in trace]
    for t in range(SPIKE_PRIOR, len(vals)):
        prev = [x for x in vals[t - SPIKE_PRIOR:t] if math.isfinite(x)]
        if not math.isfinite(vals[t]) or (prev and vals[t] > thr * float(np.median(prev))):
            return (t + 1, None)
    return None


def level_alarm(trace: list[float | None], thr: float):
    for t, v in enumerate(trace):
        if v is None or not math.isfinite(v) or v > thr:
            return (t + 1, None)
    return None


DETECTORS = {  # name -> (grid, detector(threshold) -> (run -> alarm))
    "spectral ratio": ("ratio", lambda thr: lambda r: spectral_alarm(EarlyWarning("ratio", thr), r)),
    "spectral jump": ("jump", lambda thr: lambda r: spectral_alarm(EarlyWarning("jump", thr), r)),
    "spectral absolute": ("absolute", lambda thr: lambda r: spectral_alarm(EarlyWarning("absolute", thr), r)),
    "grad-norm spike": ("spike", lambda thr: lambda r: spike_alarm(r["trace"]["grad_norm"], thr)),
    "loss spike": ("spike", lambda thr: lambda r: spike_alarm(r["trace"]["loss"], thr)),
    "grad-norm level": ("level", lambda thr: lambda r: level_alarm(r["trace"]["grad_norm"], thr)),
}


def false_alarm(alarm, r: dict) -> bool:
    """An alarm on a run that did not diverge."""
    return not r["diverged"] and alarm(r) is not None


MIN_STABLE = 20  # below this many stable fitting runs, 5% false alarms cannot be told from 0


def fit_threshold(grid: str, make, stable: list[dict]) -> float | None:
    """The smallest threshold of ``grid`` alarming on at most FALSE_ALARM of ``stable`` (None: fewer than
    MIN_STABLE runs to fit on, or no threshold of the grid)."""
    if len(stable) < MIN_STABLE:
        return None
    for thr in GRIDS[grid]:
        alarm = make(thr)
        if sum(false_alarm(alarm, r) for r in stable) <= FALSE_ALARM * len(stable):
            return thr
    return None


def first_unstable_block(r: dict) -> int | None:
    """The block with the largest radius relative to its own at train begin at the last profile before the
    label (what 'the block that goes unstable first' is scored against)."""
    label = label_step(r)
    tr = [t for t in r["rho_trace"] if label is None or t["step"] < label]
    if len(tr) < 2:
        return None
    base, last = tr[0]["rho"], tr[-1]["rho"]
    ratio = [math.inf if v is None else v / b for v, b in zip(last, base)]
    return max(range(len(ratio)), key=ratio.__getitem__)


def score(alarm, runs: list[dict]) -> dict:
    stable = [r for r in runs if not r["diverged"]]
    div = [r for r in runs if r["diverged"]]
    leads, named, n_named = [], 0, 0
    for r in div:
        a = alarm(r)
        lead = label_step(r) - a[0] if a is not None else 0
        leads.append(max(0, lead))
        if a is not None and lead > 0 and a[1] is not None and "rho_trace" in r:
            n_named += 1
            named += a[1] == first_unstable_block(r)
    det = [x for x in leads if x > 0]
    return {"false_alarm_rate": sum(alarm(r) is not None for r in stable) / max(1, len(stable)),
            "stable_runs": len(stable), "diverged_runs": len(div), "detected": len(det),
            "median_lead_steps": float(np.median(leads)) if leads else None,
            "median_lead_detected": float(np.median(det)) if det else None,
            "leads": leads, "block_named_agrees": (named / n_named) if n_named else None}


def analyze(runs: list[dict], sha: str | None = None) -> dict:
    runs = [r for r in runs if r.get("rho_trace")]
    fit = [r for r in runs if not heldout(r)]
    held = [r for r in runs if heldout(r)]
    stable_fit = [r for r in fit if not r["diverged"]]
    out = {}
    for name, (grid, make) in DETECTORS.items():
        thr = fit_threshold(grid, make, stable_fit)
        if thr is None:
            out[name] = {"threshold": None}
            continue
        out[name] = {"threshold": thr, "fitting": score(make(thr), fit), "heldout": score(make(thr), held)}
    spectral = [n for n in ("spectral ratio", "spectral jump", "spectral absolute")
                if out[n].get("threshold") is not None]
    chosen = max(spectral, key=lambda n: (out[n]["fitting"]["median_lead_steps"],
                                          out[n]["fitting"]["detected"])) if spectral else None
    every = sorted({r["spec"].get("monitor_every") for r in runs})
    grown_by_run = [max(max(EarlyWarning("ratio", 1.0).statistics(t["rho"], r["rho_trace"][0]["rho"]))
                        for t in r["rho_trace"][1:]) for r in runs if not r["diverged"] and len(r["rho_trace"]) > 1]
    res = {
        "monitor_rule": None if chosen is None else DETECTORS[chosen][0],
        "monitor_threshold": None if chosen is None else out[chosen]["threshold"],
        "monitor_median_lead_steps": None if chosen is None else out[chosen]["heldout"]["median_lead_steps"],
        "monitor_false_alarm_rate": None if chosen is None else out[chosen]["heldout"]["false_alarm_rate"],
        "monitor_every_n_steps": every,
        "runs": len(runs), "fitting_runs": len(fit), "heldout_runs": len(held),
        "fitting_diverged": sum(r["diverged"] for r in fit), "heldout_diverged": sum(r["diverged"] for r in held),
        "detectors": out, "chosen": chosen, "runs_sha256": sha,
        "stable_runs_largest_growth": ({"median": float(np.median(grown_by_run)), "max": float(max(grown_by_run)),
                                        "runs": len(grown_by_run)} if grown_by_run else None),
        "selected_by": "the spectral rule with the longest median lead on the fitting runs that diverged, each at "
                       "the smallest threshold with <= 5% false alarms on the fitting runs that did not",
    }
    return res


def shipped_rule(res: dict) -> dict:
    """What hf_rksp/data/monitor_warning.json holds: the chosen rule, shipped as the callback's default only when
    it flags at least half of the fitting runs that diverged before their label (judged on the fitting runs,
    never the held-out ones); otherwise ``rule`` is null, with the reason and the figures."""
    c = res["chosen"]
    base = {"format": 1, "false_alarm_target": FALSE_ALARM, "runs_sha256": res["runs_sha256"], "runs": res["runs"],
            "source": "benchmarks/monitor_warning.py on the reproduction's monitor group (toy models of the "
                      "paper's protocol: d 128-256, 4-6 blocks, recall task)"}
    if c is None:
        return {**base, "rule": None, "threshold": None,
                "reason": "no spectral rule reaches <= 5% false alarms on the fitting runs"}
    d = res["detectors"][c]
    works = (d["fitting"]["median_lead_steps"] or 0) > 0
    return {**base, "rule": res["monitor_rule"] if works else None,
            "threshold": res["monitor_threshold"] if works else None,
            **({} if works else {"reason": f"the best spectral rule ({c} > {res['monitor_threshold']:g}) flags "
                                           f"{d['fitting']['detected']} of {d['fitting']['diverged_runs']} fitting "
                                           "runs that diverged before their label: not shipped as a default",
                                 "best_rule": [res["monitor_rule"], res["monitor_threshold"]]}),
            "every_n_steps": res["monitor_every_n_steps"],
            "fitting": {k: d["fitting"][k] for k in ("false_alarm_rate", "detected", "diverged_runs",
                                                     "median_lead_steps")},
            "heldout": {k: d["heldout"][k] for k in ("false_alarm_rate", "detected", "diverged_runs",
                                                     "median_lead_steps", "block_named_agrees")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(RUNS))
    ap.add_argument("--json", action="store_true", help="print one JSON line of the headline figures")
    ap.add_argument("--no-write", action="store_true", help="do not write the shipped rule and the result file")
    a = ap.parse_args(argv)
    raw = Path(a.runs).read_bytes()
    runs = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    res = analyze(runs, hashlib.sha256(raw).hexdigest())
    res["machine"] = machine()
    if not a.no_write:
        atomic.write_text(OUT, json.dumps(res, indent=1) + "\n")
        atomic.write_text(SHIPPED, json.dumps(shipped_rule(res), indent=1) + "\n")
    keys = ("monitor_rule", "monitor_threshold", "monitor_median_lead_steps", "monitor_false_alarm_rate",
            "runs", "heldout_runs", "heldout_diverged")
    head = {k: res[k] for k in keys}
    head["baselines_heldout"] = {n: (None if d.get("threshold") is None else
                                     {"threshold": d["threshold"], **{k: d["heldout"][k] for k in
                                      ("false_alarm_rate", "detected", "median_lead_steps")}})
                                 for n, d in res["detectors"].items()}
    print(json.dumps(head) if a.json else json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
