"""What grows before a No-Norm run diverges: the scale of the stream, or the whitened spectrum KSS shapes?

The reproduction's No-Norm regime (benchmarks.paper_models, d 128, L 4, 4 heads, N(0, 0.02^2) init,
associative recall, AdamW with weight decay 0.01, 100-step linear warm-up, batch 16, no clipping),
trained in a plain loop until the paper's label fires (loss > 50 or gradient norm > 500), recording
every ``--every`` steps, on a fixed held-out batch:

- ``stream_rms``: the RMS of the residual stream entering each block and leaving the last one;
- ``logit_std``: the std of the last-position logits;
- ``rho`` / ``near_unit_mass`` / ``expansive_mass``: per block, from the audit's full whitened DMD
  (``hf_rksp.capture.profile.profile_model``, 2,048 token states) -- what RKSP measures and KSS shapes;
- ``weight_rms``: the RMS of the token embedding and of each block's weights.

The whitened operator is invariant to the scale of the stream (X's own covariance whitens X and Y), so
if the stream's scale runs away while the whitened spectrum stays put, a spectral regularizer on that
operator (KSS) cannot see what diverges.

    python -m benchmarks.divergence_anatomy --json            # lr 3.5e-3, seeds 42 123
    python -m benchmarks.divergence_anatomy --lr 3e-3 --seeds 456

Results: benchmarks/results/divergence_anatomy_lr<LR>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from benchmarks.harness import machine, set_threads, write_result
from benchmarks.paper_models import GPTConfig, RecallModel, associative_recall  # noqa: E402
from benchmarks.paper_repro import divergence_reason  # noqa: E402  (the paper's label, one definition)
from hf_rksp.capture.profile import ProfileOptions, profile_model


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


@torch.no_grad()
def snapshot(model: RecallModel, ids: torch.Tensor) -> dict:
    """Scale and whitened spectrum of the model on the held-out batch ``ids``."""
    was = model.training
    model.eval()
    gpt = model.gpt
    h = gpt.wte(ids) + gpt.wpe(torch.arange(ids.shape[1]))
    stream = []
    for block in gpt.blocks:
        stream.append(_rms(h))
        h = block(h)
    stream.append(_rms(h))
    logits = model(ids)["logits"]
    blocks, _, _ = profile_model(model, ids, ProfileOptions(rank="full", kreiss=False, blocks="gpt.blocks",
                                                            batch_size=32), progress=False)
    model.train(was)
    return {"stream_rms": stream, "logit_std": float(logits.detach().double().std()),
            "rho": [b.spectral_radius for b in blocks], "near_unit_mass": [b.near_unit_mass for b in blocks],
            "expansive_mass": [b.expansive_mass for b in blocks],
            "weight_rms": {"wte": _rms(gpt.wte.weight),
                           **{f"block{i}": _rms(torch.cat([p.reshape(-1) for p in b.parameters() if p.ndim == 2]))
                              for i, b in enumerate(gpt.blocks)}}}


def run(seed: int, a) -> dict:
    torch.manual_seed(seed)
    model = RecallModel(GPTConfig(norm="none", d_model=a.d, n_layers=a.layers, n_heads=a.heads)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup))
    held_out, _ = associative_recall(32, seed=seed + 10_000)
    trace, diverged_at, reason = [], None, None
    for step in range(a.steps):
        ids, labels = associative_recall(a.batch, seed=seed * 1_000_003 + step)
        opt.zero_grad()
        loss = model(ids, labels)["loss"]
        loss.backward()
        grad = math.sqrt(sum(float(p.grad.detach().double().pow(2).sum()) for p in model.parameters()))
        if step % a.every == 0 or divergence_reason(float(loss), grad) is not None:
            trace.append({"step": step, "loss": float(loss.detach()), "grad_norm": grad, **snapshot(model, held_out)})
        reason = divergence_reason(float(loss), grad)
        if reason is not None:
            diverged_at = step
            break
        opt.step()
        sched.step()
    return {"seed": seed, "diverged_at": diverged_at, "reason": reason, "trace": trace}


def summarize(r: dict) -> dict:
    """First and last recorded values of the scale and spectrum (the last is at or just before divergence)."""
    first, last = r["trace"][0], r["trace"][-1]
    out = {"seed": r["seed"], "diverged_at": r["diverged_at"], "reason": r["reason"]}
    for name, f in (("final_stream_rms", lambda t: t["stream_rms"][-1]), ("logit_std", lambda t: t["logit_std"]),
                    ("max_rho", lambda t: max(t["rho"])),
                    ("mean_near_unit_mass", lambda t: sum(t["near_unit_mass"]) / len(t["near_unit_mass"])),
                    ("mean_expansive_mass", lambda t: sum(t["expansive_mass"]) / len(t["expansive_mass"])),
                    ("wte_rms", lambda t: t["weight_rms"]["wte"])):
        out[name] = [f(first), f(last)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object (first and last values per run)")
    p.add_argument("--lr", type=float, default=3.5e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 123])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--every", type=int, default=5, help="record every N steps (and at the diverging step)")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    a = p.parse_args(argv)
    set_threads(1)
    runs = [run(seed, a) for seed in a.seeds]
    settings = {k: getattr(a, k) for k in ("lr", "steps", "warmup", "batch", "every", "d", "layers", "heads")}
    write_result(f"divergence_anatomy_lr{a.lr:g}.json", {"settings": settings, "runs": runs, "machine": machine()})
    summary = [summarize(r) for r in runs]
    for s in summary:
        print(f"seed {s['seed']}: diverged at {s['diverged_at']} ({s['reason']}); first -> last: "
              + ", ".join(f"{k} {v[0]:.3g} -> {v[1]:.3g}" for k, v in s.items() if isinstance(v, list)),
              file=sys.stderr)
    if a.json:
        print(json.dumps({"settings": settings, "runs": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
