"""benchmarks/paper_repro.py end to end on tiny runs (the pipeline, not the numbers), its statistics, and risk.py.

The smoke protocol trains five d = 32, L = 2 runs of 20 steps through the same
``run_one`` as the sweep (KSSTrainer, divergence stop, RKSP at init and end,
baselines), checks that a second call trains nothing (resume), and that
``analyze`` writes summary.json with the keys issue 15 asks for, the plots, and a
risk model that ``hf_rksp.risk`` reads back.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks.paper_repro as bench
from benchmarks.paper_models import GPTConfig, LMModel, synthetic_lm
from hf_rksp.pipeline import risk

SUMMARY_KEYS = ("runs", "auroc_near_unit_mass", "auroc_near_unit_mass_ci95", "auroc_baselines", "ece_raw_score",
                "ece_risk_model", "kss", "max_stable_lr")
KSS_KEYS = ("no_control", "clip_0.5", "clip_1.0", "alpha_0.10", "alpha_0.15", "alpha_0.20", "unstable_only",
            "near_unit_only")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke protocol trained and analysed once for the module."""
    out = tmp_path_factory.mktemp("paper_repro")
    assert bench.main(["--protocol", "smoke", "--out", str(out), "run", "all", "--device", "cpu"]) == 0
    assert bench.main(["--protocol", "smoke", "--out", str(out), "analyze", "--bootstrap", "50", "--ship",
                       "--risk-model-path", str(out / "risk_model.json")]) == 0
    return out


def test_runs_are_recorded_with_every_field(smoke):
    runs = bench.read_runs(smoke / "runs.jsonl")
    assert len(runs) == len(bench.unique([s for g in bench.ALL for s in bench.SMOKE_PROTOCOL.group(g)])) == 5
    for key, r in runs.items():
        assert key == bench.RunSpec(**r["spec"]).key
        assert isinstance(r["diverged"], bool) and isinstance(r["diverged_old"], bool)
        assert set(r["baselines"]) == set(bench.BASELINES)
        for k in ("near_unit_mass", "expansive_mass", "spectral_radius", "eigvec_condition"):
            assert r["init"][k] is not None
        assert len(r["trace"]["loss"]) == len(r["trace"]["grad_norm"]) == r["steps_done"]
        if r["diverged"]:
            assert r["steps_done"] == r["diverged_step"] < r["spec"]["steps"] and r["end"] is None
        else:
            assert r["steps_done"] == r["spec"]["steps"] and 0 <= r["end"]["near_unit_mass"] <= 1
    kss = [r for r in runs.values() if r["spec"]["method"] == "alpha_0.15"]
    assert kss and all(r["kss_steps"] == 2 for r in kss)  # steps 0 and 10 of 20
    csv_lines = (smoke / "runs.csv").read_text().splitlines()
    assert len(csv_lines) == 6 and csv_lines[0].startswith("key,task,norm")


def test_resume_trains_nothing_new(smoke):
    before = (smoke / "runs.jsonl").read_text()
    assert bench.execute(bench.SMOKE_PROTOCOL.kss(), smoke, log=lambda *a: None) == 0
    assert (smoke / "runs.jsonl").read_text() == before


def test_analyze_writes_summary_plots_and_a_readable_risk_model(smoke):
    s = json.loads((smoke / "summary.json").read_text())
    for k in SUMMARY_KEYS:
        assert k in s
    assert s["runs"] == 5
    assert set(s["kss"]) == set(KSS_KEYS)
    assert set(s["max_stable_lr"]) == {"pre", "rms", "none"} and all(len(v) == 2 for v in s["max_stable_lr"].values())
    assert set(s["auroc_baselines"]) == set(bench.BASELINES)
    for png in ("roc.png", "reliability.png", "divergence_vs_alpha.png", "divergence_vs_lr.png"):
        assert (smoke / png).read_bytes()[:4] == b"\x89PNG"
    assert "Table 3" in (smoke / "tables.md").read_text()
    model = risk.RiskModel.from_json(json.loads((smoke / "risk_model.json").read_text()))
    assert model.sweep_data_sha256 == __import__("hashlib").sha256((smoke / "runs.jsonl").read_bytes()).hexdigest()
    entry = model.assess(near_unit_mass=0.5, eigvec_condition=2.0, lr=1e-3, lr_source="given", d_model=32,
                         n_layers=2)
    assert 0 <= entry.probability <= 1 and entry.band in ("low", "medium", "high")


def test_lm_group_is_trained_and_tabled(smoke, tmp_path):
    """The optional synthetic-LM group (D.2) trains through the same run_one and gets its own table."""
    import shutil

    out = tmp_path / "with_lm"
    shutil.copytree(smoke, out)
    assert bench.main(["--protocol", "smoke", "--out", str(out), "run", "lm", "--device", "cpu"]) == 0
    lm = [r for r in bench.read_runs(out / "runs.jsonl").values() if r["spec"]["task"] == "lm"]
    assert len(lm) == 1 and lm[0]["spec"]["vocab"] == 1000 and 0 <= lm[0]["accuracy"] <= 1
    assert bench.main(["--protocol", "smoke", "--out", str(out), "analyze", "--bootstrap", "50"]) == 0
    text = (out / "tables.md").read_text()
    assert "## Synthetic LM" in text and "| none | 1 |" in text


def test_analyze_refreshes_the_docs_page_only_for_the_committed_results(smoke, tmp_path, monkeypatch):
    """The results sections of docs/results/paper_repro.md come from analyze's files: analyze of the committed
    folder refreshes them through docs/generate.py, a scratch folder leaves docs/ alone, and today's page is
    what the generator makes of the committed files."""
    import shutil

    import benchmarks.repro.report as report
    calls = []
    monkeypatch.setattr(report, "refresh_docs", lambda **kw: calls.append(kw) or 0)
    out = tmp_path / "scratch"
    shutil.copytree(smoke, out)
    bench.analyze(bench.SMOKE_PROTOCOL, out, n_boot=10, log=lambda *a: None)
    assert calls == []
    bench.analyze(bench.SMOKE_PROTOCOL, out, n_boot=10, log=lambda *a: None, docs=True)
    assert calls == [{}]
    monkeypatch.undo()
    assert report.refresh_docs(check=True) == 0


# --- statistics -------------------------------------------------------------------------------------------------

def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    pairs = [(a, b) for a, b in itertools.product(s[y], s[~y])]
    want = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert bench.auroc(s, y) == pytest.approx(want)
    assert bench.auroc(s, np.zeros(40, bool)) is None
    lo, hi = bench.bootstrap_ci(s, y, n=200)
    assert lo <= bench.auroc(s, y) <= hi


def test_fisher_exact_and_ece():
    assert bench.fisher_exact(3, 1, 1, 3) == pytest.approx(0.4857142857, rel=1e-6)  # R: fisher.test
    assert bench.fisher_exact(16, 8, 3, 21) == pytest.approx(2.7506701e-4, rel=1e-6)  # scipy.stats.fisher_exact
    assert bench.ece([0.05, 0.05, 0.95, 0.95], [0, 0, 1, 1]) == pytest.approx(0.05)
    assert bench.ece([0.5] * 4, [0, 0, 1, 1]) == pytest.approx(0.0)


def test_shared_lr_auroc_scores_only_lrs_two_norms_share():
    """The paper's design (one lr for every norm): per lr that two or more norms' grids share, the AUROC of
    M_~1 over those runs; an lr only one norm has is left out."""
    def run(norm, lr, m, diverged):
        return {"spec": {"norm": norm, "lr": lr}, "init": {"near_unit_mass": m}, "diverged": diverged}

    runs = [run("none", 0.01, 0.9, True), run("none", 0.01, 0.8, True), run("pre", 0.01, 0.2, False),
            run("post", 0.01, 0.85, False), run("none", 0.003, 0.9, True), run("pre", 1.0, 0.2, True)]
    out = bench.shared_lr_auroc(runs, n_boot=50)
    assert set(out) == {"0.01"}
    v = out["0.01"]
    assert v["n"] == 4 and v["diverged"] == 2 and v["norms"] == ["none", "post", "pre"]
    assert v["auroc"] == pytest.approx(3 / 4)  # pairs (0.9, 0.2), (0.9, 0.85), (0.8, 0.2) ordered; (0.8, 0.85) not
    assert v["rate_by_norm"] == {"none": 1.0, "post": 0.0, "pre": 0.0}


def test_gradient_baselines_and_labels():
    loss = [5.0] * 30 + [9.0] + [5.0] * 169
    grad = [1.0] * 99 + [3.0] + [1.0] * 100
    b = bench.gradient_baselines(loss, grad)
    assert b["grad_norm_step1"] == 1.0 and b["grad_norm_step100"] == 3.0
    assert b["grad_var_1_100"] == pytest.approx(np.var([1.0] * 99 + [3.0], ddof=1))
    assert b["loss_spikes_1_500"] == 1
    short = bench.gradient_baselines(loss[:50], [1.0] * 49 + [math.inf])
    assert short["grad_norm_step100"] == bench.BIG and short["grad_var_1_100"] == bench.BIG
    alive = bench.gradient_baselines(loss[:50], grad[:50], carried=False)
    assert alive["grad_norm_step100"] is None and alive["loss_spikes_1_500"] is None
    assert bench.divergence_reason(51.0, 1.0) and bench.divergence_reason(1.0, 501.0)
    assert bench.divergence_reason(math.nan, 1.0) == "non-finite" and bench.divergence_reason(5.0, 499.0) is None
    assert not bench.old_label([5.0] * 200, warmup=100)
    assert bench.old_label([5.0] * 150 + [5.6] * 10, warmup=100)
    assert bench.old_label([5.0, math.nan], warmup=0)


def test_run_keys_and_protocol_grids():
    p = bench.PAPER_PROTOCOL
    assert bench.RunSpec(lr=1e-3).key != bench.RunSpec(lr=2e-3).key
    assert len(p.kss()) == 8 * 24 and {len(p.kss(m)) for m in bench.METHODS} == {24}
    assert all(len(p.maxlr(n, m)) % 8 == 0 for n in ("pre", "rms", "none") for m in ("none", "alpha_0.15"))
    t1 = p.table1()
    assert {s.norm for s in t1} == set(bench.NORMS) and {(s.d_model, s.n_layers) for s in t1} == {
        (128, 4), (128, 6), (256, 4), (256, 6)} and {s.seed for s in t1} == {42, 123, 456}
    assert all(s.steps >= 500 for s in t1)


# --- the synthetic LM task and risk.py --------------------------------------------------------------------------

def test_synthetic_lm_is_seeded_and_in_range():
    a = synthetic_lm(4, seed=3, length=200, vocab_size=500)
    assert a.shape == (4, 200) and int(a.min()) >= 10 and int(a.max()) <= 499
    assert torch.equal(a, synthetic_lm(4, seed=3, length=200, vocab_size=500))
    assert torch.equal(a[2], synthetic_lm(1, seed=3, length=200, vocab_size=500, start=2)[0])
    assert not torch.equal(a, synthetic_lm(4, seed=4, length=200, vocab_size=500))
    torch.manual_seed(0)
    m = LMModel(GPTConfig(vocab_size=500, d_model=32, n_layers=1, n_heads=1, seq_len=200))
    with torch.no_grad():
        assert float(m(a, a)["loss"]) == pytest.approx(math.log(500), abs=0.1)


def test_logistic_fit_recovers_coefficients():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 2))
    y = rng.random(4000) < 1 / (1 + np.exp(-(0.5 + 2 * x[:, 0] - x[:, 1])))
    f = risk.fit_logistic(x, y, l2=0.0)
    slopes = np.array(f.coef) / np.array(f.std)
    assert slopes == pytest.approx([2.0, -1.0], abs=0.2)
    with pytest.raises(ValueError):
        risk.fit_logistic(x, np.zeros(4000))


def test_risk_is_null_with_a_reason_until_a_model_ships(monkeypatch):
    monkeypatch.setattr(risk, "load_risk_model", lambda: None)
    summary = {"score": 0.5, "features": {"eigvec_condition": {"mean": 2.0}}}
    assert risk.assess_summary(summary, lr=None, family="gpt2") == (None, risk.UNAVAILABLE)


def test_invalid_risk_model_is_refused():
    with pytest.raises(risk.RiskModelError):
        risk.RiskModel.from_json({"format": 2, "features": [{"name": "near_unit_mass", "transform": "log10"}]})
    with pytest.raises(risk.RiskModelError):
        risk.RiskModel.from_json({"format": 1})


def test_audit_fills_risk_from_a_shipped_model(smoke, tmp_path, monkeypatch):
    """With a risk model in the build (here the smoke sweep's), an audit's ``risk`` is its assessment at the
    given learning rate, the JSON still validates, and the card and CLI say the probability."""
    from conftest import save_tiny

    from hf_rksp import audit
    from hf_rksp.report.card import render_card

    model = risk.RiskModel.from_json(json.loads((smoke / "risk_model.json").read_text()))
    # the smoke sweep's fit predicts nothing (5 runs): as if it had been measured informative on a sweep that
    # covers this tiny model, so that the audit gives its probability
    wide = {name: [-1e300, 1e300] for name in ("lr", "d_model", "n_layers", *model.features)}
    model = dataclasses.replace(model, cv={**model.cv, "auroc": 0.9}, valid=wide, rksp={})
    monkeypatch.setattr(risk, "load_risk_model", lambda: model)
    res = audit(str(save_tiny("gpt2", tmp_path / "gpt2")), init=True, out_dir=None, tokens=256, seq_len=128,
                lr=2e-3, progress=False)
    r = res.record.risk
    assert r is not None and res.record.risk_unavailable_reason is None
    assert 0 <= r.probability <= 1 and r.lr == 2e-3 and r.lr_source == "given"
    assert r.model["sweep_data_sha256"] == model.sweep_data_sha256 and r.model["heldout_auroc"] == 0.9
    res.record.validate()
    card = render_card(res.record)
    assert "Probability of divergence: " in card and "not available" not in card


def test_committed_runs_keep_their_keys():
    """Fields added to RunSpec since (``stop_at_label``) leave the key of every committed run unchanged, so a
    resumed sweep skips them instead of training them again."""
    path = Path(bench.RESULTS) / "runs.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) > 100
    for line in lines:
        r = json.loads(line)
        assert bench.RunSpec(**r["spec"]).key == r["key"]


def test_pilot_no_stop_trains_past_the_label(tmp_path):
    """``pilot --no-stop`` records the paper's label and trains on to the end; the run has its own key."""
    args = ["--protocol", "smoke", "--out", str(tmp_path), "pilot", "--norm", "none", "--lrs", "3", "--d", "32",
            "--layers", "2", "--steps", "20", "--warmup", "2", "--batch", "4", "--device", "cpu"]
    assert bench.main(args + ["--no-stop"]) == 0
    (r,) = bench.read_runs(tmp_path / "pilot" / "runs.jsonl").values()
    assert r["diverged"] and r["diverged_step"] < 20
    assert r["steps_done"] == 20 and len(r["trace"]["loss"]) == 20
    assert r["key"] != bench.RunSpec(**{**r["spec"], "stop_at_label": True}).key
    assert bench.main(args) == 0  # the same run under the protocol's stop: a second record, stopped at the label
    stopped = [v for v in bench.read_runs(tmp_path / "pilot" / "runs.jsonl").values() if v["spec"]["stop_at_label"]]
    assert len(stopped) == 1 and stopped[0]["steps_done"] == r["diverged_step"]
    # the pilots' table tells the two apart: only the run trained past the label says how it ended
    table = bench.pilot_table([r, stopped[0]])
    past, = [v for k, v in table.items() if k.endswith("False")]
    at, = [v for k, v in table.items() if k.endswith("True")]
    assert past["diverged"] == at["diverged"] == 1 and past["diverged_step_median"] == at["diverged_step_median"]
    assert 0 <= past["ended_non_finite"] <= 1 and "ended_non_finite" not in at


def test_final_norm_is_a_recorded_protocol_choice():
    """RunSpec.final_norm (issue 24): None keeps every committed key; True puts a LayerNorm before the head
    of a No-Norm model and changes the key; the regime group trains No-Norm blocks under it."""
    from torch import nn

    from benchmarks.paper_models import GPT, GPTConfig
    from benchmarks.repro.protocol import RunSpec

    base = RunSpec(norm="none")
    assert base.key == RunSpec(norm="none", final_norm=None).key != RunSpec(norm="none", final_norm=True).key
    assert "+final_norm" in RunSpec(norm="none", final_norm=True).label
    assert isinstance(GPT(GPTConfig(norm="none", d_model=32, n_heads=1, n_layers=1)).norm_f, nn.Identity)
    assert isinstance(GPT(GPTConfig(norm="none", final_norm=True, d_model=32, n_heads=1, n_layers=1)).norm_f,
                      nn.LayerNorm)
    assert isinstance(GPT(GPTConfig(norm="pre", final_norm=False, d_model=32, n_heads=1, n_layers=1)).norm_f,
                      nn.Identity)
    specs = bench.SMOKE_PROTOCOL.regime()
    assert specs and all(s.final_norm and s.norm == "none" for s in specs)
    assert {s.method for s in specs} == {"none", "clip_1.0"}


def test_regime_group_trains_and_is_tabled(smoke, tmp_path):
    """The regime group (issue 24's calibration) runs through the same runner and gets its own table."""
    import json
    import shutil

    out = tmp_path / "regime"
    shutil.copytree(smoke, out)
    assert bench.main(["--protocol", "smoke", "--out", str(out), "run", "regime", "regime_kss", "--device",
                       "cpu"]) == 0
    assert bench.main(["--protocol", "smoke", "--out", str(out), "analyze", "--bootstrap", "20"]) == 0
    res = json.loads((out / "analysis.json").read_text())
    table = res["regime"]["0.01"]
    assert table["none"]["n"] == table["clip_1.0"]["n"] == 1 and isinstance(table["signature"], bool)
    assert res["regime_kss"]["alpha_0.15_pod"]["n"] == res["regime_kss"]["none"]["n"] == 1  # none: reused
    text = (out / "tables.md").read_text()
    assert "## Regime calibration" in text and "| 0.01 | clip_1.0 | 1 |" in text
    assert "## Tables 3/6 in the calibrated regime" in text and "| alpha_0.15_pod | 1 |" in text


def test_regime_maxlr_and_learning_groups_train_and_are_tabled(smoke, tmp_path):
    """Issue 24's Table 5 in the regime and the learning regime (synthetic LM, No-Norm + final norm) run through
    the same runner; their tables count each run once and compare KSS with the same setting without it."""
    import json
    import shutil

    specs = bench.SMOKE_PROTOCOL.learning()
    assert specs and all(s.task == "lm" and s.final_norm for s in specs)
    assert {s.method for s in specs} == {"none", "alpha_0.15"}
    out = tmp_path / "learning"
    shutil.copytree(smoke, out)
    assert bench.main(["--protocol", "smoke", "--out", str(out), "run", "regime_maxlr", "learning",
                       "learning_variants", "--device", "cpu"]) == 0
    assert bench.main(["--protocol", "smoke", "--out", str(out), "analyze", "--bootstrap", "20"]) == 0
    res = json.loads((out / "analysis.json").read_text())
    for m in ("none", "alpha_0.15"):
        per = res["regime_maxlr"][m]["by_lr"]["0.01"]
        assert per["n"] == 1
        # one lr in the grid: stable there -> the (censored) largest lr, diverged -> none below the grid
        assert res["regime_maxlr"][m]["max_stable_lr"] == (None if per["diverged"] else 0.01)
    row = res["learning"]["none +final_norm lr 0.01"]
    assert row["none"]["n"] == row["alpha_0.15"]["n"] == row["alpha_0.15_2048"]["n"] == 1
    assert row["none"]["fisher_p_vs_none"] is None
    assert 0.0 <= row["alpha_0.15"]["fisher_p_vs_none"] <= 1.0
    text = (out / "tables.md").read_text()
    assert "## Table 5 in the calibrated regime" in text and "## A learning regime" in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["learning"]["none +final_norm lr 0.01"]) == {"none", "alpha_0.15", "alpha_0.15_2048"}


def test_deepnorm_pre_placed_is_a_recorded_protocol_choice():
    """RunSpec.deepnorm="pre" (issue 24): a new key, DeepNorm only; its model is the Table 1-matching variant."""
    from benchmarks.repro.protocol import RunSpec
    from benchmarks.repro.training import build_model

    assert RunSpec(norm="deepnorm").key != RunSpec(norm="deepnorm", deepnorm="pre").key
    assert RunSpec(norm="deepnorm").key == RunSpec(norm="deepnorm", deepnorm=None).key
    with pytest.raises(ValueError):
        RunSpec(norm="pre", deepnorm="pre")
    m = build_model(RunSpec(norm="deepnorm", deepnorm="pre", d_model=32, n_layers=2))
    cfg = m.gpt.cfg
    assert cfg.deepnorm_placement == "pre" and cfg.scaled_weights == ("o", "proj")


def test_table2_under_the_papers_design():
    """The paper's design picks each normalization's stable lr, No-Norm's divergent one and the pre-placed
    DeepNorm; its AUROC is computed over exactly those runs (here: hand-made runs with known M and labels)."""
    from benchmarks.repro.analysis import paper_design_auroc
    from benchmarks.repro.protocol import PAPER_PROTOCOL as P

    assert P.paper_design_lr("pre", 128) == 1e-2 and P.paper_design_lr("none", 128) == 1e-2
    assert P.paper_design_lr("pre", 256) == 1e-1 and P.paper_design_lr("none", 256) == 1e-2
    assert {s.deepnorm for s in P.table2_paper()} == {"pre"} and len(P.table2_paper()) == 12
    runs = {}
    for d, L in P.sizes:
        for n in ("pre", "none", "deepnorm"):
            for s in P.table1_seeds:
                spec = P.spec(norm=n, d_model=d, n_layers=L, lr=P.paper_design_lr(n, d), seed=s,
                              deepnorm="pre" if n == "deepnorm" else None)
                runs[spec.key] = {"spec": {"norm": n}, "diverged": n == "none",
                                  "init": {"near_unit_mass": {"pre": 0.2, "none": 0.9, "deepnorm": 0.0}[n]}}
    res = paper_design_auroc(P, runs, n_boot=20)
    assert res["deepnorm_pre"]["n"] == 36 and res["deepnorm_pre"]["auroc"] == 1.0
    assert res["deepnorm_post"]["n"] == 24  # the post-placed DeepNorm runs are not in this hand-made set
