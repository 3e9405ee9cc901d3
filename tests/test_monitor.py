"""The monitor's early warning: the rule (EarlyWarning), the callback's alarm, and the benchmark's fitting."""

from __future__ import annotations

import logging
import math
import types

import pytest
import torch
from test_kss import VOCAB, Tokens, targs, tiny_lm

from hf_rksp.errors import ConfigError
from hf_rksp.training.monitor import EarlyWarning, RKSPMonitorCallback


def reference_first_alarm(trace, rule, thr):
    """Independent reference: walk the trace, per block the ratio to step 0, to the previous entry, or the value;
    the first entry with one > thr."""
    for k, (step, rho) in enumerate(trace[1:], start=1):
        base = trace[k - 1][1] if rule == "jump" else trace[0][1]
        best, which = -1.0, None
        for i, (r, r0) in enumerate(zip(rho, base)):
            if r is None:
                s = 0.0
            elif r != r or r in (math.inf, -math.inf):
                s = math.inf
            else:
                s = r if rule == "absolute" else r / r0
            if s > best:
                best, which = s, i
        if best > thr:
            return step, which, best
    return None


def test_rule_matches_a_reference_on_random_traces():
    """Exact equality: the rule is a division and a comparison, the reference does the same operations."""
    g = torch.Generator().manual_seed(3)
    for trial in range(200):
        n_blocks, n_steps = 1 + trial % 5, 2 + trial % 7
        base = (0.5 + torch.rand(n_blocks, generator=g, dtype=torch.float64)).tolist()
        trace = [(0, base)]
        for k in range(1, n_steps):
            rho = (torch.rand(n_blocks, generator=g, dtype=torch.float64) * 4).tolist()
            if trial % 11 == 0 and k == n_steps - 1:
                rho[0] = math.inf
            trace.append((5 * k, rho))
        for rule, thr in (("ratio", 3.0), ("jump", 2.5), ("absolute", 3.5)):
            a = EarlyWarning(rule, thr).first_alarm(trace)
            ref = reference_first_alarm(trace, rule, thr)
            if ref is None:
                assert a is None
            else:
                assert (a.step, a.block, a.statistic) == ref and a.rule == rule and a.threshold == thr


def test_rule_edge_cases_and_validation():
    w = EarlyWarning("ratio", 2.0)
    assert w.check(5, [1.9, 2.1], [1.0, 1.0]).block == 1
    assert w.check(5, [2.0, 2.0], [1.0, 1.0]) is None  # strictly above the threshold
    a = w.check(5, [None, math.inf], [1.0, 1.0])  # profile stopped at block 1: unknown 0, non-finite 1
    assert a.block == 1 and a.statistic == math.inf
    assert w.check(5, [None, None], [1.0, 1.0]) is None
    with pytest.raises(ValueError, match="baseline"):
        w.check(5, [1.0], [1.0, 1.0])
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ConfigError) as e:
            EarlyWarning("ratio", bad)
        assert e.value.param == "threshold"
    with pytest.raises(ConfigError) as e:
        EarlyWarning("slope", 2.0)
    assert e.value.param == "rule"
    with pytest.raises(ConfigError) as e:
        RKSPMonitorCallback(torch.zeros(1, 8, dtype=torch.long), early_warning="guessed")
    assert e.value.param == "early_warning"


def test_shipped_rule_is_read_with_its_provenance(caplog):
    """The shipped fitting record: a rule with its figures, or no rule and the reason (then the default is off,
    and the callback says so)."""
    d = EarlyWarning.shipped()
    assert d is not None and {"runs_sha256", "false_alarm_target", "rule"} <= set(d)
    w = EarlyWarning.fitted()
    with caplog.at_level(logging.INFO, logger="hf_rksp"):
        assert RKSPMonitorCallback(torch.zeros(1, 8, dtype=torch.long)).early_warning == w
    if d["rule"] is None:
        assert w is None and d["reason"]
        assert any(d["reason"] in r.getMessage() for r in caplog.records)
    else:
        assert (w.rule, w.threshold) == (d["rule"], d["threshold"]) and {"fitting", "heldout"} <= set(w.provenance)


def test_callback_alarms_once_names_the_block_and_logs_it(tmp_path, caplog):
    """A threshold every profile passes: the alarm comes at the first profile after train begin, once."""
    from transformers import Trainer

    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(9))
    mon = RKSPMonitorCallback(ids, every_n_steps=2, early_warning=EarlyWarning("absolute", 1e-6))
    tr = Trainer(model=tiny_lm("llama"), args=targs(tmp_path, max_steps=4, logging_steps=100),
                 train_dataset=Tokens(), callbacks=[mon])
    with caplog.at_level(logging.WARNING, logger="hf_rksp"):
        tr.train()
    rho = mon.history[1]["block_spectral_radius"]
    assert mon.alarm.step == 2 and mon.alarm.block == max(range(len(rho)), key=rho.__getitem__)
    assert mon.alarm.spectral_radius == rho[mon.alarm.block]
    assert mon.alarm.baseline == mon.history[0]["block_spectral_radius"][mon.alarm.block]
    logged = [h for h in tr.state.log_history if "rksp/alarm_block" in h]
    assert [(h["step"], h["rksp/alarm_block"]) for h in logged] == [(2, mon.alarm.block)]
    warned = [r.getMessage() for r in caplog.records if "early warning" in r.getMessage()]
    assert len(warned) == 1 and f"block {mon.alarm.block}'s" in warned[0]

    quiet = RKSPMonitorCallback(ids, every_n_steps=2, early_warning=None)
    Trainer(model=tiny_lm("llama"), args=targs(tmp_path / "q", max_steps=2, logging_steps=100),
            train_dataset=Tokens(), callbacks=[quiet]).train()
    assert quiet.alarm is None and len(quiet.history) == 2


def test_a_non_finite_stream_is_an_alarm_not_a_crash():
    model = tiny_lm("llama")
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    mon = RKSPMonitorCallback(ids, every_n_steps=1, early_warning=EarlyWarning("ratio", 1e6))
    state = types.SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[])
    control = types.SimpleNamespace(should_log=False)
    mon.on_train_begin(None, state, control, model=model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(math.nan)
    state.global_step = 1
    mon.on_step_end(None, state, control, model=model)
    assert mon.alarm.block == 1 and mon.alarm.statistic == math.inf
    assert mon.history[-1]["block_spectral_radius"] == [None, math.inf]
    assert mon.pop_pending()["rksp/non_finite_block"] == 1


# --- benchmarks/monitor_warning.py: the fitting, on synthetic runs -----------------------------------------------

def _run(norm, lr, diverged_step, rho_path, grad=None, d=128, L=4):
    steps = diverged_step or 500
    return {"spec": {"norm": norm, "lr": lr, "d_model": d, "n_layers": L, "monitor_every": 5, "seed": 42},
            "diverged": diverged_step is not None, "diverged_step": diverged_step,
            "rho_trace": [{"step": s, "rho": [1.0, rho_path(s)]} for s in range(0, steps + 1, 5)],
            "trace": {"grad_norm": grad or [1.0] * steps, "loss": [5.0] * steps}}


def test_benchmark_fits_on_fitting_runs_only_and_scores_leads():
    import benchmarks.monitor_warning as mw

    # fitting: 20 stable runs whose block 1 peaks at 1.2-1.4x, 5 diverging at step 100 with a ramp from step 50
    stable = [_run("pre", 0.1, None, lambda s, k=k: 1.0 + (0.2 + 0.01 * k) * (s > 200)) for k in range(20)]
    div = [_run("none", 4e-3, 100, lambda s: 1.0 if s < 50 else 1.0 + (s - 50) / 10) for _ in range(5)]
    # held out (lr 3.5e-3 is in preflight's held-out set): wildly different values must not move the threshold
    held = [_run("none", 3.5e-3, 100, lambda s: 1.0 if s < 80 else 50.0) for _ in range(3)]
    held_stable = [_run("none", 3.5e-3, None, lambda s: 1.0 + 9.0 * (s > 300))]
    res = mw.analyze(stable + div + held + held_stable)
    res_no_held = mw.analyze(stable + div)
    r = res["detectors"]["spectral ratio"]
    assert r["threshold"] == res_no_held["detectors"]["spectral ratio"]["threshold"]
    # smallest grid value above the stable runs' largest ratio, 1.39 (one false alarm of 20 is allowed: 1.38)
    grid = mw.GRIDS["ratio"]
    assert r["threshold"] == min(t for t in grid if t >= 1.38)
    assert r["fitting"]["false_alarm_rate"] <= 0.05
    # the ramp passes the threshold at the first multiple of 5 where 1 + (s - 50)/10 > thr; a profile after
    # optimizer step s counts at s + 1 on the label's clock
    first = next(s for s in range(0, 101, 5) if 1 + max(0, s - 50) / 10 > r["threshold"])
    assert r["fitting"]["leads"] == [100 - (first + 1)] * 5
    assert r["heldout"]["leads"] == [19] * 3 and r["heldout"]["false_alarm_rate"] == 1.0
    assert r["heldout"]["block_named_agrees"] == 1.0
    assert res["heldout_runs"] == 4 and res["fitting_runs"] == 25
    # the chosen rule flags every fitting divergence in time: shipped; a rule that flags none is not
    assert res["chosen"] == "spectral ratio" or res["detectors"][res["chosen"]]["fitting"]["median_lead_steps"] >= \
        r["fitting"]["median_lead_steps"]
    assert mw.shipped_rule(res)["rule"] is not None and mw.shipped_rule(res)["threshold"] > 0
    late = [_run("none", 4e-3, 100, lambda s: 1.0 if s < 100 else 90.0) for _ in range(5)]  # jumps at the label
    weak = mw.analyze(stable + late)
    assert mw.shipped_rule(weak)["rule"] is None and "not shipped" in mw.shipped_rule(weak)["reason"]
    # the stable runs' growth: 1.2 + 0.01 k over k = 0..19 (held-out stable run included: 10x)
    g = res["stable_runs_largest_growth"]
    assert g["runs"] == 21 and g["max"] == pytest.approx(10.0) and g["median"] == pytest.approx(1.3)
    # too few stable fitting runs: no threshold is fitted
    assert mw.analyze(stable[:10] + div)["detectors"]["spectral ratio"]["threshold"] is None
