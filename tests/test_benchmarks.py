"""Smoke versions of benchmarks that have none elsewhere, and the shared harness (benchmarks/harness.py)."""

from __future__ import annotations

import json
import types

import benchmarks.harness as harness
import benchmarks.kss_gradient_scale as kss_gradient_scale


def test_harness_records_the_machine_and_writes_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    m = harness.machine()
    assert m["cpu_count"] >= 1 and m["torch_threads"] >= 1 and m["processor"]
    path = harness.write_result("x/y.json", {"machine": m})
    assert json.loads(path.read_text()) == {"machine": m}


def test_kss_gradient_scale_measures_the_trainers_kss_step():
    """Two KSS steps of a tiny No-Norm model: both gradient norms are measured and finite."""
    a = types.SimpleNamespace(steps=12, warmup=5, batch=4, d=32, layers=2, heads=2)
    r = kss_gradient_scale.run(0, 4e-3, True, a)
    assert r["steps_run"] == 12 and len(r["trace"]) == 2  # steps 0 and 10 (every_n_steps 10)
    assert all(t["task_grad_norm"] > 0 and t["kss_grad_norm"] > 0 for t in r["trace"])
    assert r["median_kss_over_task_grad"] > 0


def test_kss_threads_times_every_thread_count_quiet_and_loaded(capsys):
    """benchmarks/kss_threads.py at smoke size: a median step time for 1, 2 and the default threads, with
    and without its competing process, and the ratios to 1 thread."""
    from benchmarks import kss_threads

    assert kss_threads.main(["--json", "--layers", "1", "--width", "32", "--heads", "2", "--batch", "2",
                             "--seq-len", "64", "--steps", "1", "--warmup", "0", "--rounds", "1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for cond in ("quiet", "loaded"):
        assert len(r["median_step_s"][cond]) == 3 and all(v > 0 for v in r["median_step_s"][cond].values())
        assert r["vs_1_thread"][cond]["1"] == 1.0


def test_finetune_real_label_and_report(tmp_path, monkeypatch):
    """The fine-tuning divergence label (non-finite, or the last 5 steps' mean > first step + margin) and the
    report's counts, on recorded runs written here (the real runs take a CPU-hour: benchmarks/)."""
    import math

    import benchmarks.finetune_real as fr

    assert not fr.label([4.0, 3.0, 3.5, 4.9, 5.0, 5.0, 5.0], 1.0)  # mean of the last 5: 4.68 <= 5.0
    assert fr.label([4.0, 3.0, 5.2, 5.2, 5.2, 5.2, 5.2], 1.0)  # 5.2 > 5.0
    assert fr.label([4.0, math.nan, 3.0], 1.0) and fr.label([], 1.0)

    def rec(lr, losses, p, jump_at):
        rho = [{"step": s, "rho": [1.0, 1.0, 1.0, 100.0 if s == jump_at else 1.0]} for s in range(0, 8, 5)]
        rise = losses[-1] - losses[0]  # a probe feature that ranks the label perfectly here
        return {"key": fr.key(lr, 0.0, 0, 7), "lr": lr, "clip": 0.0, "seed": 0, "steps": 7, "loss": losses,
                "preflight": {"probability": p, "unavailable_reason": None if p is not None else "out of range",
                              "warnings": [] if p is not None else ["out of range"], "probe_steps": 4,
                              "features": {"loss_rise": rise, "grad_growth": -rise, "rho_growth": 0.0,
                                           "rho_end": 0.0}},
                "rho_trace": rho, "machine": {"processor": "cpu", "torch_threads": 1}}

    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(json.dumps(r) for r in (rec(1e-4, [4.0] * 7, None, None),
                                                       rec(1e-1, [4.0] + [9.0] * 6, None, 5),
                                                       rec(1e-2, [4.0] * 7, 0.3, 5))) + "\n{torn")
    result = tmp_path / "result.json"  # the monitor study's fitted detectors
    result.write_text(json.dumps({"monitor_rule": "jump", "monitor_threshold": 50.0,
                                  "detectors": {"loss spike": {"threshold": 2}}}))
    monkeypatch.setattr(fr, "RUNS", runs)
    monkeypatch.setattr(fr, "DOC", tmp_path / "doc.md")
    import benchmarks.monitor_warning as mw

    monkeypatch.setattr(mw, "OUT", result)
    fr.report(1.0)
    text = (tmp_path / "doc.md").read_text()
    assert "1 of 3 runs diverged" in text and "a probability for 1 of 3 runs (without one: out of range (2 runs))" in text
    assert "Its probe ran 4 of 7 steps" in text
    assert "AUROC loss_rise 1.00, grad_growth 0.00, rho_growth 0.50, rho_end 0.50" in text
    # the jump at step 5 counts at step 6 on the label's clock; seven steps are too few for a loss spike
    assert "`spectral jump > 50` alarmed on 1 of 1 diverged runs and on 1 of 2 stable ones" in text
    assert "`loss spike > 2x` alarmed on 0 of 1 diverged runs" in text
    assert "| 0.1 | 0 | 0 | 4.00 -> 9.00 | yes | none | 5 | 0 | step 6, block 3 | none |" in text
