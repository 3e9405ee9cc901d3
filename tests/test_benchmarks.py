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
