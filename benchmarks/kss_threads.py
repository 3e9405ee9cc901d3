"""Torch threads for KSS training on CPU: step time with 1, 2 and torch's default threads, quiet and loaded.

A GPT-2-shaped model (random init; ``--layers``/``--width``) trained by ``KSSTrainer`` with KSS every step
(the KSS step is the heaviest: extra eigen-decompositions, which LAPACK threads).  For each thread count,
in alternating rounds, one process trains ``--steps`` timed steps after ``--warmup``; "loaded" runs them
while a competing process (a 2-thread matmul loop, started here and stopped after) keeps the cores busy.
Reported: the median step time per (condition, threads), and the ratio to 1 thread.

    python -m benchmarks.kss_threads --json

Other jobs on the machine are not controlled: the load average at start and end is recorded with the
machine; "quiet" means no competitor of ours.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.kss_overhead import StepTimer, Tokens

COMPETITOR = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
              "while True:\n    a = torch.tanh(a @ a / 32)\n")


def run(threads: int | None, a, out: str) -> list[float]:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        PrinterCallback,
        TrainingArguments,
    )

    from hf_rksp import KSSConfig, KSSTrainer
    from hf_rksp.utils.threads import torch_threads

    with torch_threads(threads):
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=a.layers, n_embd=a.width, n_head=a.heads, n_positions=max(1024, a.seq_len),
                         vocab_size=4096)
        model = GPT2LMHeadModel(cfg)
        n = a.warmup + a.steps
        args = TrainingArguments(output_dir=out, report_to=[], use_cpu=True, max_steps=n,
                                 per_device_train_batch_size=a.batch, learning_rate=1e-4, logging_steps=10_000,
                                 save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
        timer = StepTimer()
        tr = KSSTrainer(model=model, args=args, train_dataset=Tokens(a.batch * n, a.seq_len, cfg.vocab_size),
                        callbacks=[timer], kss_config=KSSConfig(every_n_steps=1))
        tr.remove_callback(PrinterCallback)
        tr.train()
    return timer.times[a.warmup:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("hf_rksp").setLevel(logging.ERROR)
    default = torch.get_num_threads()
    counts = {"1": 1, "2": 2, f"default ({default})": None}
    times: dict[str, dict[str, list[float]]] = {c: {k: [] for k in counts} for c in ("quiet", "loaded")}
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            for cond in ("quiet", "loaded"):
                comp = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if cond == "loaded" else None
                try:
                    for name, n in counts.items():
                        times[cond][name] += run(n, a, os.path.join(tmp, f"{cond}{name}"))
                finally:
                    if comp is not None:
                        comp.kill()
                        comp.wait()
    med = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in times.items()}
    res = {
        "median_step_s": med,
        "vs_1_thread": {c: {k: v / d["1"] for k, v in d.items()} for c, d in med.items()},
        "settings": {"layers": a.layers, "width": a.width, "batch": a.batch, "seq_len": a.seq_len,
                     "timed_steps": a.steps, "rounds": a.rounds, "warmup": a.warmup, "kss": "every step"},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_default_threads": default,
                    "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0], "torch": torch.__version__},
        "wall_s": time.perf_counter() - t_start,
    }
    if a.json:
        print(json.dumps(res))
    else:
        for c, d in med.items():
            print(c, " ".join(f"{k}: {v:.3f} s ({v / d['1']:.2f}x)" for k, v in d.items()))
        print("machine:", res["machine"], "wall", round(res["wall_s"], 1), "s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
