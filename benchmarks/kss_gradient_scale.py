"""How large the paper's KSS gradient is next to the task gradient, step by step, in the No-Norm regime.

A plain training loop (AdamW, linear warm-up over 100 steps, weight decay 0.01, no clipping, batch 16)
of the paper's No-Norm model (benchmarks.paper_models, d 128, L 4, 4 heads) on associative recall, with
KSS at its defaults (alpha 0.15 every 10 steps, 50% of the blocks, rank 32, 512 tokens) computed by
the trainer's own step (``hf_rksp.training.kss.KSSStep``: the same draws and seeds as ``KSSTrainer``).
On every KSS step the task gradient and the alpha-weighted KSS gradient are taken separately
(``measure_grad_norms``: two ``autograd.grad`` calls on one forward) and their norms recorded with the KSS loss, the hard near-unit mass KSS sees
and the largest eigenvalue condition number; then their sum is applied.  Training stops at the
paper's divergence label (loss > 50 or gradient norm > 500).  ``--no-kss`` gives the baseline's
divergence step.

    python -m benchmarks.kss_gradient_scale --json                 # lr 4e-3, seeds 42 123
    python -m benchmarks.kss_gradient_scale --lr 2e-3 --seeds 42

Results: benchmarks/results/kss_gradient_scale_lr<LR>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from benchmarks.harness import machine, write_result
from benchmarks.paper_models import GPTConfig, RecallModel, associative_recall  # noqa: E402
from benchmarks.paper_repro import divergence_reason  # noqa: E402  (the paper's label, one definition)
from hf_rksp.training.kss import KSSConfig, KSSStep


def _norm(grads) -> float:
    return math.sqrt(sum(float((g.detach() ** 2).sum()) for g in grads if g is not None))


def run(seed: int, lr: float, kss: bool, a) -> dict:
    torch.manual_seed(seed)
    model = RecallModel(GPTConfig(norm="none", d_model=a.d, n_layers=a.layers, n_heads=a.heads)).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup))
    cfg = KSSConfig(seed=seed, measure_grad_norms=True)
    blocks = list(model.gpt.blocks)
    trace, diverged_at = [], None
    for step in range(a.steps):
        ids, labels = associative_recall(a.batch, seed=seed * 1_000_003 + step)
        opt.zero_grad()
        if kss and step % cfg.every_n_steps == 0:  # the trainer's own KSS step (same draws, same seeds)
            with KSSStep(blocks, cfg, step=step) as k:
                loss = model(ids, labels)["loss"]
            out = k.result(loss, cfg.alpha, params)
            rs = out.layers
            (loss if out.term is None else loss + out.term).backward()
            trace.append({"step": step, "loss": float(loss.detach()), "task_grad_norm": out.grad_norms.get(
                              "kss/task_grad_norm", 0.0), "kss_grad_norm": out.grad_norms.get("kss/grad_norm", 0.0),
                          "kss_loss": float(out.term.detach()) / cfg.alpha if out.term is not None else None,
                          "near_unit_mass": sum(r.near_unit_mass for r in rs) / len(rs),
                          "max_condition": max(r.condition for r in rs), "skipped": sum(r.skipped for r in rs)})
        else:
            loss = model(ids, labels)["loss"]
            loss.backward()
        total = _norm([p.grad for p in params])
        loss = loss.detach()
        if divergence_reason(float(loss), total) is not None:
            diverged_at = step
            break
        opt.step()
        sched.step()
    ratios = [t["kss_grad_norm"] / t["task_grad_norm"] for t in trace if t["task_grad_norm"] > 0]
    return {"seed": seed, "lr": lr, "kss": kss, "diverged_at": diverged_at, "steps_run": step + 1,
            "median_kss_over_task_grad": sorted(ratios)[len(ratios) // 2] if ratios else None, "trace": trace}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 123])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    a = p.parse_args(argv)
    runs = [run(seed, a.lr, kss, a) for seed in a.seeds for kss in (False, True)]
    settings = {k: getattr(a, k) for k in ("lr", "steps", "warmup", "batch", "d", "layers", "heads")}
    write_result(f"kss_gradient_scale_lr{a.lr:g}.json", {"settings": settings, "runs": runs, "machine": machine()})
    for r in runs:
        print(f"seed {r['seed']} KSS {'on ' if r['kss'] else 'off'}: diverged at {r['diverged_at']}, "
              f"median |grad alpha*KSS| / |grad task| = {r['median_kss_over_task_grad']}", file=sys.stderr)
        for t in r["trace"][-3:]:
            print(f"   step {t['step']}: task {t['task_grad_norm']:.3g}, alpha*KSS {t['kss_grad_norm']:.3g}, "
                  f"L {t['kss_loss']}, M {t['near_unit_mass']:.2f}", file=sys.stderr)
    if a.json:
        print(json.dumps({"settings": settings, "runs": [{k: v for k, v in r.items() if k != "trace"}
                                                          for r in runs]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
