"""``analyze``: every table, plot, summary.json and (``--ship``) the risk model from runs.jsonl.

Analysing the committed results folder also refreshes the tables of ``docs/results/paper_repro.md``
(through ``docs/generate.py``, which owns the page's generated sections).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np

from hf_rksp.utils import atomic

from .analysis import (_clean, auroc_table, cv_table, fit_risk_model, kss_table, label, learning_table, make_summary, maxlr_table,
                       norm_table, paper_design_auroc, pilot_table, pilot_tables_md, regime_kss_table, regime_maxlr_table, regime_table,
                       shared_lr_auroc,
                       tables_md)
from .plots import write_plots
from .protocol import RESULTS, RISK_MODEL, ROOT, Protocol, unique
from .runner import read_runs, write_csv
from .stats import auroc, ece, reliability

#: the docs page that shows these results, and its sections that docs/generate.py fills from them
DOCS_GENERATOR = ROOT / "docs" / "generate.py"
DOCS_SECTIONS = ("paper-repro-targets", "paper-regime-figures", "paper-repro-tables", "paper-repro-pilots")


def refresh_docs(*, check: bool = False) -> int:
    """Rewrite (or, with ``check``, compare) the results sections of docs/results/paper_repro.md from
    RESULTS' tables.md, pilot/tables.md, summary.json and analysis.json; the generator's exit code."""
    return subprocess.run([sys.executable, str(DOCS_GENERATOR), *(["--check"] if check else []), *DOCS_SECTIONS],
                          cwd=ROOT, check=False).returncode


def analyze(protocol: Protocol, out: Path, *, ship: bool = False, risk_path: Path = RISK_MODEL,
            n_boot: int = 1000, log=print, docs: bool | None = None) -> dict:
    """Every table, plot and summary.json from ``out/runs.jsonl`` (no training).

    ``docs``: also refresh docs/results/paper_repro.md (default: when ``out`` is the committed RESULTS).
    """
    runs_path = out / "runs.jsonl"
    runs = read_runs(runs_path)
    sha = hashlib.sha256(runs_path.read_bytes()).hexdigest() if runs_path.is_file() else "0" * 64
    t1 = [runs[s.key] for s in unique(protocol.table1()) if s.key in runs]
    pooled = [runs[s.key] for s in protocol.no_control() if s.key in runs]
    lm = [runs[s.key] for s in unique(protocol.lm()) if s.key in runs]
    res = {"table1": {"by_norm": norm_table(t1), "by_size": norm_table(t1, by=("norm", "d_model", "n_layers")),
                      "auroc": auroc_table(t1, n_boot=n_boot), "auroc_shared_lr": shared_lr_auroc(t1, n_boot)},
           "pooled": {"n": len(pooled), "by_norm": norm_table(pooled), "auroc": auroc_table(pooled, n_boot=n_boot),
                      "grouped_cv": cv_table(pooled)},
           "kss": kss_table(protocol, runs), "maxlr": maxlr_table(protocol, runs),
           "regime": regime_table(protocol, runs), "regime_kss": regime_kss_table(protocol, runs),
           "table2_paper": paper_design_auroc(protocol, runs, n_boot),
           "regime_maxlr": regime_maxlr_table(protocol, runs), "learning": learning_table(protocol, runs),
           "lm": {"by_norm": norm_table(lm), "by_norm_lr": norm_table(lm, by=("norm", "lr")),
                  "auroc": auroc_table(lm, n_boot=n_boot)} if lm else None}
    y1 = [label(r) for r in t1]
    raw = [r["init"]["near_unit_mass"] for r in t1]
    res["calibration"] = {"ece_raw_score": ece(raw, y1) if t1 else None, "reliability_raw": reliability(raw, y1),
                          "ece_raw_score_pooled": ece([r["init"]["near_unit_mass"] for r in pooled],
                                                      [label(r) for r in pooled]) if pooled else None}
    model, fitinfo = fit_risk_model(pooled, sha) if pooled else (None, {"reason": "no runs"})
    if model is not None:
        yp = [label(r) for r in pooled]
        res["calibration"]["risk_model"] = {"features": list(model.features), **model.cv,
                                            "reliability": reliability(fitinfo["oof"], yp)}
    res["sensitivity_old_label"] = {
        "table1_by_norm": {k: v["rate"] for k, v in norm_table(t1, "old").items()},
        "table1_auroc_near_unit_mass": auroc(raw, [label(r, "old") for r in t1]),
        "agreement_with_paper_label": float(np.mean([label(r) == label(r, "old") for r in runs.values()]))
        if runs else None,
        "kss": {m: v["rate"] for m, v in kss_table(protocol, runs, "old").items()},
        "max_stable_lr": {n: [v[m]["max_stable_lr"] for m in ("none", protocol.maxlr_method)]
                          for n, v in maxlr_table(protocol, runs, "old").items()}}
    res["sensitivity_loss_only"] = {  # the paper's label without its gradient-norm criterion
        "kss": {m: v["rate"] for m, v in kss_table(protocol, runs, "loss").items()},
        "max_stable_lr": {n: [v[m]["max_stable_lr"] for m in ("none", protocol.maxlr_method)]
                          for n, v in maxlr_table(protocol, runs, "loss").items()}}
    summary = make_summary(protocol, runs, res, model)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "summary.json", summary)
    atomic.write_json(out / "analysis.json", _clean(res))
    atomic.write_text(out / "tables.md", tables_md(protocol, res, summary))
    write_plots(protocol, out, t1, pooled, runs, res, fitinfo)
    if runs:
        write_csv(runs, out / "runs.csv")
    pilots = read_runs(out / "pilot" / "runs.jsonl")
    if pilots:  # the pilots' own table (ad-hoc settings: none of the protocol's tables apply)
        atomic.write_text(out / "pilot" / "tables.md", pilot_tables_md(pilot_table(list(pilots.values()))))
    if ship:
        if model is None:
            raise SystemExit(f"--ship: no risk model could be fitted ({fitinfo.get('reason')})")
        atomic.write_json(risk_path, model.to_json())
        log(f"risk model written to {risk_path} (features {', '.join(model.features)})")
    log(f"{len(runs)} runs analysed; summary in {out / 'summary.json'}, tables in {out / 'tables.md'}")
    if docs is None:
        docs = out.resolve() == RESULTS.resolve()
    if docs and refresh_docs() != 0:
        raise SystemExit(f"could not refresh the docs ({DOCS_GENERATOR} failed)")
    return summary
