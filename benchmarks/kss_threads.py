"""Torch threads for KSS training on CPU: step time with 1, 2 and torch's default threads, quiet and loaded.

A GPT-2-shaped model (random init; ``--layers``/``--width``) trained by ``KSSTrainer`` with KSS every step
(the KSS step is the heaviest: extra eigen-decompositions, which LAPACK threads).  For each thread count,
in alternating rounds, one process trains ``--steps`` timed steps after ``--warmup``; "loaded" runs them
while a competing process (a 2-thread matmul loop, started here and stopped after) keeps the cores busy.
Reported: the median step time per (condition, threads), and the ratio to 1 thread.

    python -m benchmarks.kss_threads [--json] [--write]

``--write`` saves benchmarks/results/kss_threads.json and rewrites the "kss-threads" block of
docs/results/benchmarks.md and the "threads" block of README.md (with the audit figures of
``benchmarks.audit_threads --write``).  Other jobs on the machine are not controlled: the load average at
start and end is recorded with the machine; "quiet" means no competitor of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, competitor, cpu_name, quiet_loggers, write_result
from benchmarks.kss_overhead import StepTimer, Tokens
from hf_rksp.utils import atomic
from hf_rksp.utils.threads import default_threads

ROOT = Path(__file__).resolve().parent.parent

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
    p.add_argument("--write", action="store_true", help="save the result and rewrite the docs' blocks")
    a = p.parse_args(argv)
    with quiet_loggers("transformers", "hf_rksp"):
        return _measure(a)


def _measure(a) -> int:
    default = torch.get_num_threads()
    counts = {"1": 1, "2": 2, f"torch default ({default})": None}
    times: dict[str, dict[str, list[float]]] = {c: {k: [] for k in counts} for c in ("quiet", "loaded")}
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            for cond in ("quiet", "loaded"):
                with competitor(cond == "loaded"):
                    for name, n in counts.items():
                        times[cond][name] += run(n, a, os.path.join(tmp, f"{cond}{name}"))
    med = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in times.items()}
    res = {
        "median_step_s": med,
        "vs_1_thread": {c: {k: v / d["1"] for k, v in d.items()} for c, d in med.items()},
        "settings": {"layers": a.layers, "width": a.width, "batch": a.batch, "seq_len": a.seq_len,
                     "timed_steps": a.steps, "rounds": a.rounds, "warmup": a.warmup, "kss": "every step"},
        "our_default_threads": default_threads(),
        "machine": {"platform": platform.platform(), "processor": cpu_name(),
                    "cpu_count": os.cpu_count(), "torch_default_threads": default,
                    "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0], "torch": torch.__version__},
        "wall_s": time.perf_counter() - t_start,
    }
    if a.write:
        write_result("kss_threads.json", res)
        write_section("kss-threads", doc_section(res))
        write_readme_threads()
    if a.json:
        print(json.dumps(res))
    else:
        for c, d in med.items():
            print(c, " ".join(f"{k}: {v:.3f} s ({v / d['1']:.2f}x)" for k, v in d.items()))
        print("machine:", res["machine"], "wall", round(res["wall_s"], 1), "s")
    return 0


def doc_section(res: dict) -> str:
    m, st, med, rel = res["machine"], res["settings"], res["median_step_s"], res["vs_1_thread"]
    rows = ["| torch threads | median step, no competitor | × 1 thread | median step, with competitor | × 1 thread |",
            "|---|---:|---:|---:|---:|"]
    for k in med["quiet"]:
        label = k + (" (our default here)" if k == str(res.get("our_default_threads")) else "")
        rows.append(f"| {label} | {med['quiet'][k]:.2f} s | {rel['quiet'][k]:.2f} | {med['loaded'][k]:.2f} s | "
                    f"{rel['loaded'][k]:.2f} |")
    return (f"`python -m benchmarks.kss_threads --write` (run without `OMP_NUM_THREADS`, so torch's default is "
            f"{m['torch_default_threads']} threads here): a GPT-2-shaped model ({st['layers']} layers, width "
            f"{st['width']}, batch {st['batch']} × {st['seq_len']} tokens) trained by `KSSTrainer` with KSS every "
            f"step, {st['timed_steps']} timed steps after {st['warmup']} warm-up per run, {st['rounds']} "
            f"alternating rounds; \"with competitor\" beside a 2-thread matmul loop the benchmark starts. "
            f"{m['processor']}, {m['cpu_count']} cores, torch {m['torch']}; load average "
            f"{m['load_avg_start']:.2f} at the start and {m['load_avg_end']:.2f} at the end (other jobs on the "
            f"machine; \"no competitor\" means none of ours):\n\n" + "\n".join(rows) + "\n")


def replace_block(path: Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``path`` (atomically)."""
    a, b = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    s = path.read_text()
    if a not in s or b not in s:
        raise SystemExit(f"{path} has no {name} block")
    head, rest = s.split(a, 1)
    atomic.write_bytes(path, (head + a + text + rest[rest.index(b):]).encode())


def write_section(name: str, text: str) -> None:
    replace_block(ROOT / "docs" / "results" / "benchmarks.md", name, text)


def write_readme_threads() -> None:
    """The README's threads paragraph from the saved results of both thread benchmarks (those present)."""
    parts = []
    for file, what, key in (("audit_threads.json", "a SmolLM2-135M audit", "median_audit_s"),
                            ("kss_threads.json", "a KSS training step", "median_step_s")):
        path = RESULTS / file
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        med, m = r[key], r["machine"]
        d = next(k for k in med["quiet"] if k.startswith(("torch default", "default")))
        parts.append(f"{what} took {med['quiet']['1']:.1f} s on 1 thread, {med['quiet']['2']:.1f} s on 2 "
                     f"and {med['quiet'][d]:.1f} s on torch's default; beside a competing 2-thread process "
                     f"{med['loaded']['1']:.1f} s, {med['loaded']['2']:.1f} s and {med['loaded'][d]:.1f} s "
                     f"(load average {m['load_avg_start']:.1f} at the start)")
    text = ("Measured on the 2-core machine (" + "; ".join(parts) + "; "
            "[tables](docs/results/benchmarks.md#threads)).\n") if parts else ""
    replace_block(ROOT / "README.md", "threads", text)


if __name__ == "__main__":
    raise SystemExit(main())
