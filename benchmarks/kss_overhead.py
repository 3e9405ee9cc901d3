"""KSS step-time overhead: KSSTrainer step / plain Trainer step, same model and batch, one run.

GPT-2-small-shaped model (12 layers, width 768, 12 heads, GPT-2 vocabulary) at
random init, random token batches.  Plain ``Trainer``, ``KSSTrainer`` with
KSS every step and ``KSSTrainer`` with ``every_n_steps=10`` are run in
alternating rounds in one process; each optimizer step is timed by a callback
(on_step_begin -> on_step_end: forward, backward, optimizer).  Reported:

- ``step_time_ratio``: KSS at its defaults (every 10 steps, alpha 0.15, 50% of layers, rank 32, 512
  tokens): mean step over whole 10-step windows / median plain step (the paper's "overhead").
- ``step_time_ratio_every_step``: median KSS-every-step step / median plain step.

Usage: ``python -m benchmarks.kss_overhead --json`` (absolute times only with
the machine named; ratios are what to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from benchmarks.harness import quiet_loggers
from hf_rksp import KSSConfig, KSSTrainer


class Tokens(Dataset):
    def __init__(self, n: int, t: int, vocab: int, seed: int = 0):
        self.x = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t0)


def run(kind: str, steps: int, a, out: str) -> list[float]:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=a.layers, n_embd=a.width, n_head=a.heads, n_positions=max(1024, a.seq_len))
    model = GPT2LMHeadModel(cfg)
    args = TrainingArguments(output_dir=out, report_to=[], use_cpu=True, max_steps=steps,
                             per_device_train_batch_size=a.batch, learning_rate=1e-4, logging_steps=10_000,
                             save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    timer = StepTimer()
    data = Tokens(a.batch * steps, a.seq_len, cfg.vocab_size)
    if kind == "plain":
        tr = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    else:
        every = 1 if kind == "kss" else 10
        kc = KSSConfig(every_n_steps=every, subsample=a.subsample, rank=a.rank)
        tr = KSSTrainer(model=model, args=args, train_dataset=data, callbacks=[timer], kss_config=kc)
    tr.remove_callback(PrinterCallback)  # keep stdout to the one JSON line
    tr.train()
    return timer.times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--subsample", type=int, default=KSSConfig.subsample)
    p.add_argument("--rank", type=int, default=KSSConfig.rank)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (plain and every-step KSS)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    with quiet_loggers("transformers"):
        return _measure(a)


def _measure(a) -> int:
    times: dict[str, list[float]] = {"plain": [], "kss": [], "kss10": []}
    windows10: list[float] = []
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            for kind in ("plain", "kss", "kss10"):
                n = a.warmup + (a.steps if kind != "kss10" else 10)
                ts = run(kind, n, a, os.path.join(tmp, kind))[a.warmup:]
                times[kind] += ts
                if kind == "kss10":  # steps warmup..warmup+9: exactly one KSS step (global_step % 10 == 0)
                    windows10.append(statistics.fmean(ts))
    plain = statistics.median(times["plain"])
    res = {
        "step_time_ratio": statistics.median(windows10) / plain,
        "step_time_ratio_every_step": statistics.median(times["kss"]) / plain,
        "plain_step_s": plain,
        "kss_step_s": statistics.median(times["kss"]),
        "ratio_spread_per_step": [min(times["kss"]) / plain, max(times["kss"]) / plain],
        "settings": {"layers": a.layers, "width": a.width, "batch": a.batch, "seq_len": a.seq_len,
                     "subsample": a.subsample, "rank": a.rank, "timed_steps": a.steps,
                     "rounds": a.rounds, "warmup": a.warmup},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0], "torch": torch.__version__},
        "wall_s": time.perf_counter() - t_start,
    }
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
