"""The pre-flight check: its fit and lr ceiling against float64 references, the benchmark's fitting code on
synthetic runs, and the API and CLI end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_rksp.pipeline import preflight as pf
from hf_rksp.pipeline.risk import LogisticFit
from hf_rksp.record.records import PreflightResult


def _model(auroc: float = 0.9, valid: dict | None = None, ceiling_share: float = 0.9) -> pf.PreflightModel:
    feats = ("log10_lr", "clipped", "rho_end")
    return pf.PreflightModel(
        features=feats, fit=LogisticFit((-2.0, 0.5, 0.3), (0.8, 0.5, 0.4), -0.4, (2.5, -0.7, 1.2), 0.01),
        ceiling_probability=0.5, valid=valid if valid is not None else {f: [-1e9, 1e9] for f in feats},
        heldout={"heldout_auroc": auroc, "lr_ceiling_within_1_5x": ceiling_share}, cv={}, provenance={"runs_sha256": "0" * 64})


def test_probability_and_lr_ceiling_match_a_float64_reference():
    m = _model()
    feats = {"log10_lr": -2.5, "clipped": 1.0, "rho_end": 0.7}

    def p_ref(log_lr, r=0.0):  # written out: sigmoid(b0 + sum coef_i (x_i - mean_i) / std_i), float64, with
        x = [log_lr, 1.0, 0.7 + r * (log_lr + 2.5)]  # rho_end moving by r per unit log10 lr from the probe's
        z = -0.4 + sum(c * (v - mu) / sd for c, v, mu, sd in zip((2.5, -0.7, 1.2), x, (-2.0, 0.5, 0.3),
                                                                  (0.8, 0.5, 0.4)))
        return 1 / (1 + math.exp(-z))

    def bisect(r):  # log10 lr where p_ref = 0.5 (p_ref grows with lr for the r used)
        lo, hi = -10.0, 10.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if p_ref(mid, r) < 0.5 else (lo, mid)
        return lo

    assert m.probability(feats) == pytest.approx(p_ref(-2.5), rel=1e-12)  # same formula, float64 both
    # the logit is linear in log10 lr along the line, so the first-order ceiling is exact: to the bisection's 1e-9
    assert math.log10(m.lr_ceiling(feats)) == pytest.approx(bisect(0.0), abs=1e-9)
    moving = pf.PreflightModel(**{**m.__dict__, "lr_response": {"rho_end": 0.8}})
    assert math.log10(moving.lr_ceiling(feats)) == pytest.approx(bisect(0.8), abs=1e-9)
    flat = pf.PreflightModel(**{**m.__dict__, "fit": LogisticFit((-2.0, 0.5, 0.3), (0.8, 0.5, 0.4), -0.4,
                                                                  (-1.0, -0.7, 1.2), 0.01)})
    assert flat.lr_ceiling(feats) is None  # P falls with lr: no ceiling


def test_model_file_round_trips_and_refuses_junk():
    m = _model()
    assert pf.PreflightModel.from_json(json.loads(json.dumps(m.to_json()))) == m
    bad = m.to_json() | {"features": ["log10_lr", "nonsense", "rho_end"]}
    with pytest.raises(pf.PreflightModelError):
        pf.PreflightModel.from_json(bad)
    with pytest.raises(pf.PreflightModelError):
        pf.PreflightModel.from_json(m.to_json() | {"format": 99})


def test_shipped_model_loads_with_its_provenance():
    m = pf.load_preflight_model()
    assert m is not None and len(m.provenance["runs_sha256"]) == 64 and 0 <= m.heldout["heldout_auroc"] <= 1
    assert "log10_lr" in m.features and m.valid["d_model"][0] <= m.valid["d_model"][1]


def test_features_of_a_runaway_probe_are_capped_and_a_calm_one_is_not():
    calm = pf.ProbeTrace(loss=[5.0] * 10, grad_norm=[1.0] * 5 + [2.0] * 5, rho_before=[1.0, 2.0],
                         rho_after=[1.1, 8.0], steps=10, seconds=0.1, diverged=False)
    f = pf.probe_features(calm, lr=1e-3, max_grad_norm=0.0)
    assert f["log10_lr"] == pytest.approx(-3) and f["clipped"] == 0.0
    assert f["grad_growth"] == pytest.approx(math.log10(2.0)) and f["grad_max"] == pytest.approx(math.log10(2.0))
    assert f["rho_growth"] == pytest.approx(math.log10(4.0)) and f["rho_end"] == pytest.approx(math.log10(8.0))
    assert pf.driving_blocks(calm) == [1]
    wild = pf.ProbeTrace(loss=[5.0, math.inf], grad_norm=[1.0, math.inf], rho_before=[1.0], rho_after=[],
                         steps=2, seconds=0.1, diverged=True)
    g = pf.probe_features(wild, lr=1.0, max_grad_norm=1.0)
    assert g["grad_growth"] == g["loss_rise"] == g["rho_end"] == pf.FEATURE_CAP and g["clipped"] == 1.0


def test_probe_schedule_reaches_the_peak_at_half_the_probe():
    k, lr = 25, 3e-3
    sched = [pf.probe_lr(t, k, lr) for t in range(k)]
    assert sched[0] == pytest.approx(lr / 12) and sched[11] == pytest.approx(lr) and max(sched) == lr
    assert pf.probe_steps(500) == 25 and pf.probe_steps(20) == 4


def test_benchmark_fitting_code_on_synthetic_runs():
    """Leave-one-group-out predictions never see their group's labels; the grid reading of the largest stable
    lr follows its definition; a feature that carries the label is found, one that does not is not."""
    from benchmarks import preflight as bp

    rng = np.random.default_rng(0)
    rows, y = [], []
    for g in range(6):
        for _ in range(30):
            x = rng.normal()
            rows.append({"norm": f"n{g % 3}", "d_model": 64 * (1 + g // 3), "n_layers": 4, "signal": x,
                         "noise": rng.normal()})
            y.append(float(rng.random() < 1 / (1 + math.exp(-3 * x))))
    y = np.array(y)
    p = bp.grouped_oof(rows, y, ("signal",), ())
    flipped = y.copy()
    first = np.array([r["norm"] == "n0" and r["d_model"] == 64 for r in rows])
    flipped[first] = 1 - flipped[first]
    assert np.allclose(bp.grouped_oof(rows, flipped, ("signal",), ())[first], p[first])  # no leak
    s = bp.scores(p, y, [r["norm"] for r in rows])
    assert s["auroc_pooled"] > 0.8
    assert bp.scores(bp.grouped_oof(rows, y, ("noise",), ()), y, [r["norm"] for r in rows])["auroc_pooled"] < 0.65

    def run(lr, d):
        return {"spec": {"lr": lr}, "diverged": d}
    grid = [run(1e-3, 0), run(1e-3, 0), run(2e-3, 0), run(2e-3, 1), run(3e-3, 1), run(3e-3, 1)]
    assert bp.largest_stable(grid) == 1e-3  # 2e-3 diverged in half: not stable
    assert bp.largest_stable([run(1e-3, 0), run(2e-3, 0)]) is None  # no unstable lr above: edge unknown
    assert bp.largest_stable([run(1e-3, 1)]) is None


@pytest.fixture(scope="module")
def tiny_lm():
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(0, 512, (4, 32), generator=g)), "labels": ids} for _ in range(3)]
    return model, batches


def test_preflight_end_to_end_on_a_tiny_model(tiny_lm):
    model, batches = tiny_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = pf.preflight(model, batches, lr=1e-3, warmup_steps=10, total_steps=80, max_grad_norm=1.0,
                       weight_decay=0.01, batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was trained
    assert isinstance(res, PreflightResult) and res.probe_steps == 4 and res.probe_fraction == pytest.approx(0.05)
    assert len(res.rho_before) == len(res.rho_after) == 3 and res.driving_blocks[0] in range(3)
    assert set(res.features) == set(pf.FEATURES) and res.features["clipped"] == 1.0
    # the blocks' spectra come from the audit's core: the same spectral radius the audit measures at init
    from hf_rksp.capture.profile import ProfileOptions, profile_model
    recs, _, _ = profile_model(model, batches[0]["input_ids"], ProfileOptions(rank="full", kreiss=False,
                                                                              batch_size=32), progress=False)
    assert res.rho_before == pytest.approx([b.spectral_radius for b in recs], rel=1e-6)  # same input, same code
    # the shipped model covers the reproduction's GPT-2-style models only: a tiny llama gets no probability
    assert res.probability is None and res.band is None and res.unavailable_reason and res.warnings
    assert PreflightResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res
    # a model that covers these settings gives a probability with its held-out AUROC; a weak one does not
    good = pf.preflight(model, batches, lr=1e-3, warmup_steps=10, total_steps=80, batch_size=4, model_file=_model())
    assert 0 < good.probability < 1 and good.model["heldout_auroc"] == 0.9 and good.lr_ceiling > 0
    # a ceiling that failed its held-out check is withheld, and the result says so
    no_ceiling = pf.preflight(model, batches, lr=1e-3, warmup_steps=10, total_steps=80, batch_size=4,
                              model_file=_model(ceiling_share=0.1))
    assert no_ceiling.probability is not None and no_ceiling.lr_ceiling is None
    assert any("lr_ceiling withheld" in w and "10%" in w for w in no_ceiling.warnings)
    weak = pf.preflight(model, batches, lr=1e-3, warmup_steps=10, total_steps=80, batch_size=4,
                        model_file=_model(auroc=0.6))
    assert weak.probability is None and "held-out AUROC is 0.60" in weak.unavailable_reason
    with pytest.raises(pf.ConfigError, match="`warmup_steps`"):
        pf.preflight(model, batches, lr=1e-3, warmup_steps=100, total_steps=80)


def test_cli_preflight(tmp_path, capsys):
    from conftest import save_tiny, tiny_tokenizer

    from hf_rksp.cli.commands import main

    path = save_tiny("gpt2", tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(path)
    text = tmp_path / "train.txt"
    text.write_text("The residual stream of a transformer carries the signal from block to block. " * 40)
    assert main(["preflight", str(path), "--text", str(text), "--lr", "1e-3", "--total-steps", "80",
                 "--seq-len", "16", "--batch-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["probe_steps"] == 4 and out["settings"]["lr"] == 1e-3 and len(out["rho_before"]) == 3
    assert main(["preflight", str(path), "--total-steps", "80"]) == 2
    assert "--lr" in capsys.readouterr().err


def test_api_reproduces_the_benchmark_probe_and_gives_a_probability_in_range():
    """On a run of the reproduction (in the shipped model's range): the API's probe gives the features the
    benchmark cached for that run (same code, same init, data and seed), and a probability with provenance."""
    from benchmarks import preflight as bp
    from benchmarks.repro.protocol import HELDOUT_PROFILE, PROFILE_TOKENS, RunSpec
    from benchmarks.repro.training import build_model, task_batch, train_data

    # lr 0.01: a run whose 25 probe steps are not chaotic, so torch's thread count (which changes float
    # reduction order) moves the features by float32 noise only (at lr 0.1 two threads moved rho_end 14%)
    spec = RunSpec(norm="pre", d_model=128, n_layers=4, lr=0.01, seed=42)
    cached = bp.load_probes()[spec.key]
    ds = train_data(spec)
    batches = [{k: torch.stack([ds[i][k] for i in range(j * 16, (j + 1) * 16)]) for k in ("input_ids", "labels")}
               for j in range(25)]
    ids, _ = task_batch(spec, PROFILE_TOKENS // spec.seq_len, spec.seed + HELDOUT_PROFILE)
    res = pf.preflight(build_model(spec), batches, lr=spec.lr, warmup_steps=100, total_steps=500, max_grad_norm=0.0,
                       weight_decay=0.01, batch_size=16, blocks="gpt.blocks", profile_ids=ids, seed=42)
    # float32 training on another machine's BLAS drifts a little over 25 steps: 1e-3 relative on the log features
    assert res.rho_before == pytest.approx(cached["rho_before"], rel=1e-4)
    assert res.features["rho_end"] == pytest.approx(max(math.log10(v) for v in cached["rho_after"]), rel=1e-3)
    assert res.probability is not None and res.band in ("low", "medium", "high")
    assert res.model["heldout_auroc"] >= pf.MIN_AUROC and len(res.model["runs_sha256"]) == 64
    assert res.driving_blocks and res.probe_steps == 25


def test_benchmark_prints_its_json_line_from_the_cached_probes(capsys):
    from benchmarks import preflight as bp

    assert bp.main(["--json", "--no-probe", "--no-write"]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1
    head = json.loads(line[0])
    for k in ("heldout_auroc_within_norm_min", "heldout_auroc_pooled", "heldout_ece", "probe_cost_fraction",
              "lr_ceiling_within_1_5x", "monitor_median_lead_steps", "monitor_false_alarm_rate"):
        assert k in head
    assert head["probe_cost_fraction"] <= 0.05
    # the shipped model is the one this fit writes
    shipped = pf.load_preflight_model()
    assert list(shipped.features) == head["model_features"]
    assert shipped.heldout["heldout_auroc"] == pytest.approx(head["heldout_auroc_pooled"])


def _stop_after_one():
    """A TrainerCallback stopping after the first optimizer step (the auto decision is taken before it)."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = True

    return Stop()


def _auto_trainer(tmp_path, model, data, rule, **kw):
    from transformers import TrainingArguments

    from hf_rksp import KSSConfig, KSSTrainer

    args = TrainingArguments(output_dir=str(tmp_path / rule), report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, per_device_train_batch_size=16, seed=42, **kw)
    return KSSTrainer(model=model, args=args, train_dataset=data, callbacks=[_stop_after_one()],
                      kss_config=KSSConfig(mode="auto", auto_rule=rule, block_path="gpt.blocks", seed=42))


def test_kss_auto_decides_from_the_preflight_in_its_range_and_falls_back_outside(tmp_path):
    """auto_rule="preflight": on a model and plan inside the shipped pre-flight model's range the decision is
    P >= 0.5 with P the pre-flight's for the planned run (lr, warm-up, steps and clipping from the
    TrainingArguments); on a model outside it, the paper's rule decides, and the reason says why."""
    import copy

    from benchmarks.repro.protocol import RunSpec
    from benchmarks.repro.training import build_model, train_data

    tmp = tmp_path
    spec = RunSpec(norm="none", d_model=128, n_layers=4, lr=5e-3, seed=42)
    plan = dict(learning_rate=spec.lr, max_steps=500, warmup_steps=100, max_grad_norm=0.0, weight_decay=0.01)
    model = build_model(spec)
    tr = _auto_trainer(tmp, copy.deepcopy(model), train_data(spec), "preflight", **plan)
    tr.train()
    d = tr.kss_state.auto
    assert d["rule"] == "preflight" and 0 <= d["preflight_probability"] <= 1
    assert d["enabled"] == (d["preflight_probability"] >= 0.5) and d["reason"].startswith("pre-flight P")
    # the probability is the pre-flight's for that plan: the same check run by hand on the trainer's batches
    again = _auto_trainer(tmp, copy.deepcopy(model), train_data(spec), "preflight", **plan).kss_auto_preflight()
    assert again.probability == pytest.approx(d["preflight_probability"], rel=1e-6)
    # a model the pre-flight model does not cover (d 32, L 2): the paper's rule, with the reason
    small = RunSpec(norm="none", d_model=32, n_layers=2, lr=5e-3, seed=42)
    decided = {}
    for rule in ("preflight", "paper"):
        t = _auto_trainer(tmp, build_model(small), train_data(small), rule, **plan)
        t.train()
        decided[rule] = t.kss_state.auto
    assert decided["preflight"]["preflight_probability"] is None
    assert "pre-flight gave no probability" in decided["preflight"]["reason"] and "d_model" in \
        decided["preflight"]["reason"]
    assert decided["preflight"]["enabled"] == decided["paper"]["enabled"]
    assert decided["preflight"]["reason"].endswith(decided["paper"]["reason"])
