"""What the paper's KSS does to the spectrum in training: No-Norm model, associative recall, KSS on vs off.

The model and task of PAPER.md (hf_rksp.paper_models: GPT-2-style, No-Norm, d 256, L 6, 8 heads,
N(0, 0.02^2) init, associative recall with 4 pairs, length 64, vocabulary 256), trained with
``KSSTrainer`` (AdamW, lr 0.01 after a 100-step linear warm-up, weight decay 0.01, no gradient clipping, batch 32) for each seed,
once with KSS off and once with KSS on at its defaults (alpha 0.15 every 10 steps, 50% of layers,
rank 32, gamma 0.4, beta 1).  Same seed, same data, same steps.

Reported per run, at init and after training (or at divergence: loss > 50 or gradient norm > 500,
the paper's label; training stops there):
- ``near_unit_mass`` / ``expansive_mass`` / ``spectral_radius``: the RKSP audit's layer means (full
  DMD, 32 held-out sequences = 2048 token states per block);
- ``near_unit_mass_r32`` / ``expansive_mass_r32``: the same on the rank-32 randomized operator of
  512 held-out token states per block, which is what KSS shapes;
- ``accuracy`` on 512 held-out sequences; ``diverged`` and the step.

    python benchmarks/kss_behaviour.py --json                  # 2 seeds, 300 steps, lr 0.01
    python benchmarks/kss_behaviour.py --json --lr 0.002       # the largest stable lr of Table 5
    python benchmarks/kss_behaviour.py --seeds 42 --steps 100  # quicker

Results are written to benchmarks/results/kss_behaviour_lr<LR>.json after every run (``--resume`` skips
runs already there).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import PrinterCallback, TrainerCallback, TrainingArguments  # noqa: E402

from hf_rksp.kss import KSSConfig, SnapshotSampler, layer_kss  # noqa: E402
from hf_rksp.paper_models import GPTConfig, RecallDataset, RecallModel, associative_recall  # noqa: E402
from hf_rksp.profiling import ProfileOptions, profile_model  # noqa: E402
from hf_rksp.trainer import KSSTrainer  # noqa: E402

from paper_repro import divergence_reason  # noqa: E402  (the paper's label, one definition)

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS = "gpt.blocks"


class DivergenceStop(TrainerCallback):
    """Stops training at the paper's divergence label and records the step."""

    def __init__(self):
        self.diverged_at: int | None = None

    def on_log(self, args, state, control, logs=None, **kw):
        loss, grad = (logs or {}).get("loss"), (logs or {}).get("grad_norm")
        if loss is not None and divergence_reason(float(loss), grad) is not None:
            self.diverged_at = state.global_step
            control.should_training_stop = True
        return control


@torch.no_grad()
def spectrum(model: RecallModel, seed: int) -> dict:
    """RKSP (full DMD) layer means, and what KSS sees (rank 32 on 512 token states), on held-out data."""
    was = model.training
    ids, _ = associative_recall(32, seed=seed + 10_000)
    blocks, _, _ = profile_model(model, ids, ProfileOptions(rank="full", kreiss=False, blocks=BLOCKS, batch_size=32),
                                 progress=False)
    out = {k: sum(b[k] for b in blocks) / len(blocks) for k in ("near_unit_mass", "expansive_mass")}
    out["spectral_radius"] = sum(b["spectral_radius"] for b in blocks) / len(blocks)
    cfg = KSSConfig()
    model.eval()
    with SnapshotSampler(list(model.gpt.blocks), 512, torch.Generator().manual_seed(0)) as s:
        model(ids)
    rs = [layer_kss(x, y, cfg, generator=torch.Generator().manual_seed(i)) for i, (x, y) in enumerate(s.pairs())]
    out["near_unit_mass_r32"] = sum(r.near_unit_mass for r in rs) / len(rs)
    out["expansive_mass_r32"] = sum(r.expansive_mass for r in rs) / len(rs)
    model.train(was)
    return out


@torch.no_grad()
def accuracy(model: RecallModel, seed: int) -> float:
    was = model.training
    model.eval()
    ids, labels = associative_recall(512, seed=seed + 20_000)
    acc = float((model(ids)["logits"].argmax(-1) == labels).double().mean())
    model.train(was)
    return acc


def run(seed: int, kss: bool, a) -> dict:
    torch.manual_seed(seed)
    model = RecallModel(GPTConfig(norm="none", d_model=a.d, n_layers=a.layers, n_heads=a.heads))
    at_init = spectrum(model, seed)
    data = RecallDataset(a.batch * a.steps, seed=seed)
    stop = DivergenceStop()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, report_to=[], use_cpu=True, max_steps=a.steps,
                                 per_device_train_batch_size=a.batch, learning_rate=a.lr, warmup_steps=a.warmup,
                                 weight_decay=0.01, max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                                 disable_tqdm=True, seed=seed, data_seed=seed, dataloader_num_workers=0)
        cfg = KSSConfig(mode="on" if kss else "off", block_path=BLOCKS, seed=seed)
        tr = KSSTrainer(model=model, args=args, train_dataset=data, kss_config=cfg, callbacks=[stop])
        tr.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        tr.train()
        wall = time.perf_counter() - t0
    end = spectrum(model, seed) if stop.diverged_at is None else None
    kss_logs = [h for h in tr.state.log_history if "kss/loss" in h]
    return {
        "seed": seed, "kss": kss, "diverged": stop.diverged_at is not None, "diverged_at": stop.diverged_at,
        "init": at_init, "end": end, "accuracy": None if end is None else accuracy(model, seed),
        "final_loss": next((h["loss"] for h in reversed(tr.state.log_history) if "loss" in h), None),
        "kss_steps": tr.kss_state.kss_steps, "layers_skipped": tr.kss_state.layers_skipped,
        "kss_trace": [{k: h[k] for k in ("step", "kss/loss", "kss/near_unit_mass", "kss/soft_near_unit_mass",
                                          "kss/expansive_mass") if k in h} for h in kss_logs],
        "wall_s": wall,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 123])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/kss_behaviour_lr<LR>.json")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out with these settings")
    a = p.parse_args(argv)
    a.out = a.out or RESULTS / f"kss_behaviour_lr{a.lr:g}.json"
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("hf_rksp").setLevel(logging.ERROR)
    settings = {k: getattr(a, k) for k in ("steps", "warmup", "lr", "batch", "d", "layers", "heads")}
    done = []
    if a.resume and a.out.is_file():
        prev = json.loads(a.out.read_text())
        if prev.get("settings") == settings:
            done = prev["runs"]
    for seed in a.seeds:
        for kss in (False, True):
            if any(r["seed"] == seed and r["kss"] == kss for r in done):
                continue
            done.append(run(seed, kss, a))
            report = {"settings": settings, "kss_config": KSSConfig().to_dict(), "runs": done,
                      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                  "torch_threads": torch.get_num_threads(), "torch": torch.__version__}}
            a.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = a.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            os.replace(tmp, a.out)
            r = done[-1]
            end = r["end"] or {}
            print(f"seed {seed} KSS {'on ' if kss else 'off'}: diverged {r['diverged']} "
                  f"M {r['init']['near_unit_mass']:.3f} -> {end.get('near_unit_mass', float('nan')):.3f}  "
                  f"M>1 {r['init']['expansive_mass']:.3f} -> {end.get('expansive_mass', float('nan')):.3f}  "
                  f"M(r32) {r['init']['near_unit_mass_r32']:.3f} -> {end.get('near_unit_mass_r32', float('nan')):.3f}  "
                  f"acc {r['accuracy']}  {r['wall_s']:.0f} s", file=sys.stderr)
    if a.json:
        print(json.dumps({"settings": settings, "runs": [{k: v for k, v in r.items() if k != "kss_trace"}
                                                          for r in done]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
