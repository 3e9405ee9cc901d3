"""The divergence sweep's pipeline (smoke), its statistics against hand-computable cases, and the risk model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hf_rksp.sweep import analysis
from hf_rksp.sweep.run import MARGIN, WINDOW, RunSpec, label

REPO = Path(__file__).resolve().parent.parent


def _sweep_main():
    spec = importlib.util.spec_from_file_location("divergence_sweep", REPO / "benchmarks" / "divergence_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_label_definition():
    flat = [5.5] * 50
    assert label(flat, 0) == (False, "", None)
    assert label(flat[:10] + [float("nan")], 0)[:2] == (True, "non-finite loss")
    spike = [5.5] * 20 + [5.5 + 2 * MARGIN] * WINDOW
    diverged, _, step = label(spike, 0)
    assert diverged and 20 <= step < 20 + WINDOW
    # the same spike inside the warm-up is not counted; falling losses never are
    assert not label([5.5] + [5.5 + 2 * MARGIN] * WINDOW + [3.0] * 40, warmup=2 * WINDOW + 5)[0]
    assert not label([5.5 - 0.01 * t for t in range(200)], 0)[0]


def test_auroc_and_folds():
    y = np.array([0, 0, 1, 1])
    assert analysis.auroc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert analysis.auroc(np.array([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert analysis.auroc(np.array([0.5, 0.5, 0.5, 0.5]), y) == 0.5  # ties count one half
    assert analysis.auroc(np.array([0.1, 0.3, 0.2, 0.4]), y) == 0.75
    assert math.isnan(analysis.auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    groups = [f"c{i // 3}" for i in range(60)]
    folds = analysis.grouped_folds(groups)
    for g in set(groups):  # no configuration split across folds
        assert len({f for f, h in zip(folds, groups) if h == g}) == 1
    assert set(folds.tolist()) == set(range(analysis.FOLDS))


def test_logistic_recovers_known_coefficients():
    """On 20k samples from a known logistic model the fit is within ~4 standard errors (<= 0.1 here)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 2))
    logit = 0.5 + 1.5 * x[:, 0] - 2.0 * x[:, 1]
    y = (rng.random(20_000) < 1 / (1 + np.exp(-logit))).astype(float)
    m = analysis.fit_logistic(x, y, l2=0.0)
    coef = np.array(m["coef"]) / np.array(m["std"])  # back to raw units
    intercept = m["intercept"] - float(np.sum(np.array(m["coef"]) * np.array(m["mean"]) / np.array(m["std"])))
    assert np.allclose(coef, [1.5, -2.0], atol=0.1) and abs(intercept - 0.5) < 0.1
    p = analysis.predict(m, x)
    assert np.all((p > 0) & (p < 1))


def test_smoke_sweep_pipeline_and_resume(tmp_path):
    """Every stage runs and writes its files; a second invocation trains nothing new (resumable)."""
    main = _sweep_main()
    out = tmp_path / "sweep"
    assert main(["--smoke", "--out", str(out), "--workers", "1"]) == 0
    for f in ("runs.jsonl", "runs.csv", "summary.json", "roc.png", "kss_rates.png"):
        assert (out / f).stat().st_size > 0, f
    lines = (out / "runs.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) == 16 and not any("error" in r for r in rows)
    for r in rows:
        assert set(analysis.PREDICTORS[analysis.RKSP][0][0:1]) <= set(r)
        assert 0.0 <= r["rksp_near_unit_mass"] <= 1.0 and r["grad_norm_global"] > 0
        assert r["steps_run"] >= 1 and isinstance(r["diverged"], bool)
    s = json.loads((out / "summary.json").read_text())
    assert s["runs"] == 16 and set(analysis.PREDICTORS) <= set(s["predictors"])
    rm = s["risk_model"]
    assert rm["n_runs"] == 8 and len(rm["coef"]) == len(rm["features"]) == 4
    assert rm["sweep_data_sha256"] == analysis.data_hash([r for r in rows if r["part"] == "fit"])
    # resume: nothing is trained again, the same rows give the same risk model
    assert main(["--smoke", "--out", str(out), "--workers", "1"]) == 0
    assert (out / "runs.jsonl").read_text().splitlines() == lines
    assert json.loads((out / "summary.json").read_text())["risk_model"] == rm


def test_failed_run_is_recorded_not_dropped(tmp_path):
    from hf_rksp.sweep import design

    bad = RunSpec(style="unknown", n_layers=1, steps=2)  # the model cannot be built: the run fails
    rows = design.execute({"fit": [bad]}, tmp_path, workers=1, progress=False)
    assert len(rows) == 1 and "style" in rows[0]["error"]


def _toy_risk_model() -> dict:
    """A hand-made risk model: logit = 2 * (M - 0.5) / 0.25 + 3 * (log10 lr + 2.5) / 0.5."""
    return {
        "features": [{"name": "rksp_near_unit_mass", "transform": "id"},
                     {"name": "rksp_spectral_radius_max", "transform": "log"},
                     {"name": "rksp_outside_mass_mean", "transform": "id"},
                     {"name": "lr", "transform": "log"}],
        "mean": [0.5, 0.0, 0.0, -2.5], "std": [0.25, 1.0, 1.0, 0.5], "coef": [2.0, 0.0, 0.0, 3.0], "intercept": 0.0,
        "valid": {"lr": [1e-3, 3e-2], "d_model": [64, 128], "n_blocks": [2, 6], "rksp_near_unit_mass": [0.0, 1.0],
                  "rksp_spectral_radius_max": [0.5, 100.0], "rksp_outside_mass_mean": [0.0, 1.0],
                  "architecture": "toy"},
        "sweep_data_sha256": "0" * 64, "n_runs": 1, "divergence_definition": "toy",
        "rksp": {"delta": 0.05, "tokens": 2048},
    }


def test_risk_probability_ceiling_and_warnings():
    from hf_rksp import risk

    toy = _toy_risk_model()
    summary = {"near_unit_mass": 0.75, "spectral_radius_max": 1.2, "outside_mass_mean": 0.1}
    kw = dict(family="gpt2", init=True, n_blocks=4, d_model=64, model=toy)
    r = risk.assess(summary, lr=10 ** -2.5, **kw)
    assert r["probability"] == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-12)  # logit = 2 * 0.25 / 0.25
    assert r["band"] == "high" and r["in_range"] and r["warnings"] == [] and r["lr_source"] == "given"
    # the ceiling is where P = 0.1 exactly, and P grows with lr
    at_ceiling = risk.assess(summary, lr=r["lr_ceiling"], **kw)["probability"]
    assert at_ceiling == pytest.approx(0.1, rel=1e-9)
    assert risk.assess(summary, lr=1e-3, **kw)["probability"] < r["probability"]
    # no lr: the family's documented default; trained weights, other families and ranges are flagged
    d = risk.assess(summary, lr=None, **{**kw, "init": False, "family": "llama", "d_model": 4096})
    assert d["lr"] == risk.DEFAULT_LR["llama"] and "default" in d["lr_source"]
    assert not d["in_range"] and len(d["warnings"]) == 4  # weights, family, lr, d_model
    assert any("trained weights" in w for w in d["warnings"]) and any("d_model" in w for w in d["warnings"])
    # a model whose risk does not grow with lr has no ceiling
    flat = {**toy, "coef": [2.0, 0.0, 0.0, -1.0]}
    assert risk.assess(summary, lr=1e-2, **{**kw, "model": flat})["lr_ceiling"] is None
    assert [risk.band(p) for p in (0.05, 0.3, 0.9)] == ["low", "medium", "high"]


def test_audit_risk_at_given_lr_and_bad_lr(tmp_path, capsys):
    """--lr sets the rate the shipped risk model is read at; P grows with it; a bad --lr is one error line."""
    from hf_rksp import audit
    from hf_rksp.cli import main

    kw = dict(init=True, tokens=256, seq_len=128, out_dir=None, progress=False)
    lo = audit("gpt2", lr=1e-4, **kw).data
    hi = audit("gpt2", lr=1e-1, **kw).data
    assert lo["risk"]["lr"] == 1e-4 and lo["risk"]["lr_source"] == "given" and "--lr 0.0001" in lo["command"]
    assert hi["risk"]["probability"] > lo["risk"]["probability"]
    assert lo["risk"]["model"]["sweep_data_sha256"] == json.loads(
        (REPO / "hf_rksp" / "data" / "risk_model.json").read_text())["sweep_data_sha256"]
    assert "P(divergence)" in lo["summary"]["verdict"]
    rc = main(["audit", "gpt2", "--init", "--lr", "-1", "--tokens", "256", "--seq-len", "128",
               "--out-dir", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert rc != 0 and err.strip().startswith("hf-rksp: error:") and "--lr" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_shipped_risk_model_matches_the_published_sweep():
    """The JSON the audit reads is the fit of the published runs (same data hash, same coefficients)."""
    runs = REPO / "benchmarks" / "results" / "divergence_sweep" / "runs.jsonl"
    rows = [json.loads(x) for x in runs.read_text().splitlines() if x.strip()]
    shipped = json.loads((REPO / "hf_rksp" / "data" / "risk_model.json").read_text())
    refit = analysis.risk_model([r for r in rows if r["part"] == "fit" and "error" not in r])
    assert refit["sweep_data_sha256"] == shipped["sweep_data_sha256"]
    assert np.allclose(refit["coef"], shipped["coef"], rtol=1e-9) and refit["valid"] == shipped["valid"]
