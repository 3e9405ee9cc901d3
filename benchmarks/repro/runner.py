"""The sweep runner: resumable (records keyed by settings, appended under a lock), parallel workers, and
the time estimate of ``plan``."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.harness import read_by_key
from hf_rksp.utils import atomic

from .protocol import ALL_METHODS, Protocol, RunSpec, unique
from .training import run_one

# --- the runner: resumable, parallel ----------------------------------------------------------------------------

@contextlib.contextmanager
def quiet(threads: int):
    """``threads`` torch threads, transformers/hf_rksp logs at ERROR and no warnings; all restored after."""
    names = ("transformers", "hf_rksp")
    levels = [logging.getLogger(n).level for n in names]
    before = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n in names:
                logging.getLogger(n).setLevel(logging.ERROR)
            torch.set_num_threads(threads)
            yield
    finally:
        torch.set_num_threads(before)
        for n, lv in zip(names, levels):
            logging.getLogger(n).setLevel(lv)


def _worker_init(threads: int):
    """A worker process for its whole life: ``threads`` threads, quiet."""
    torch.set_num_threads(threads)
    for n in ("transformers", "hf_rksp"):
        logging.getLogger(n).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def _work(spec_dict: dict, device: str) -> dict:
    return run_one(RunSpec(**spec_dict), device)


read_runs = read_by_key  # finished runs by key (the first record of a key wins; a torn last line is ignored)


def append_run(path: Path, record: dict) -> None:
    """One JSON line, under an exclusive lock (several runners may share a results directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


CSV_COLUMNS = ("key", "task", "norm", "d_model", "n_layers", "lr", "seed", "method", "steps", "warmup", "batch",
               "diverged", "diverged_step", "diverged_reason", "diverged_old", "steps_done", "initial_loss",
               "final_loss", "init_near_unit_mass", "init_expansive_mass", "init_spectral_radius",
               "init_eigvec_condition", "grad_norm_step1", "grad_norm_step100", "grad_var_1_100",
               "loss_spikes_1_500", "end_near_unit_mass", "accuracy", "kss_steps", "step_s", "wall_s")


def csv_row(r: dict) -> dict:
    s, init, end = r["spec"], r["init"], r["end"] or {}
    row = {**{k: s[k] for k in ("task", "norm", "d_model", "n_layers", "lr", "seed", "method", "steps", "warmup",
                                "batch")}, **r["baselines"]}
    row.update({k: r[k] for k in ("key", "diverged", "diverged_step", "diverged_reason", "diverged_old",
                                  "steps_done", "initial_loss", "final_loss", "accuracy", "kss_steps", "step_s",
                                  "wall_s")})
    row.update({f"init_{k}": init[k] for k in ("near_unit_mass", "expansive_mass", "spectral_radius",
                                               "eigvec_condition")})
    row["end_near_unit_mass"] = end.get("near_unit_mass")
    return row


def write_csv(runs: dict[str, dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in sorted(runs.values(), key=lambda r: (r["spec"]["task"], r["spec"]["norm"], r["spec"]["d_model"],
                                                  r["spec"]["n_layers"], r["spec"]["method"], r["spec"]["lr"],
                                                  r["spec"]["seed"])):
        w.writerow(csv_row(r))
    atomic.write_text(path, buf.getvalue())


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def execute(specs: list[RunSpec], out: Path, *, workers: int = 1, device: str = "cpu", threads: int = 1,
            log=print) -> int:
    """Train every spec not already in ``out/runs.jsonl`` (appending each record as it finishes); returns the
    number of runs trained.  A run that raises is logged to ``errors.jsonl`` and retried by the next call."""
    runs_path = out / "runs.jsonl"
    done = read_runs(runs_path)
    todo = [s for s in unique(specs) if s.key not in done]
    log(f"{len(unique(specs))} runs, {len(unique(specs)) - len(todo)} already done, {len(todo)} to train "
        f"({workers} worker(s), {threads} thread(s) each, {device})")
    if not todo:
        return 0
    t0, n = time.perf_counter(), 0

    def finished(spec: RunSpec, record: dict | None, error: str | None):
        nonlocal n
        if record is None:
            append_run(out / "errors.jsonl", {"key": spec.key, "spec": asdict(spec), "error": error,
                                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            log(f"  FAILED {spec.label}: {error}")
            return
        append_run(runs_path, record)
        done[spec.key] = record
        n += 1
        tag = f"DIVERGED at {record['diverged_step']} ({record['diverged_reason']})" if record["diverged"] else \
            f"ok, acc {record['accuracy']:.3f}"
        log(f"  [{n}/{len(todo)}, {time.perf_counter() - t0:.0f} s] {spec.label}: "
            f"M {record['init']['near_unit_mass']:.3f}, {tag}, {record['step_s']:.3f} s/step, {record['wall_s']:.0f} s")

    if workers <= 1:
        for spec in todo:
            try:
                with quiet(threads):
                    rec, err = run_one(spec, device), None
            except Exception as e:  # noqa: BLE001 - a failed run must not stop the sweep
                rec, err = None, f"{type(e).__name__}: {e}"
            finished(spec, rec, err)
    else:
        import multiprocessing as mp

        os.environ["OMP_NUM_THREADS"] = str(threads)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(_work, asdict(s), device): s for s in todo}
            for fut in as_completed(futures):
                try:
                    rec, err = fut.result(), None
                except Exception as e:  # noqa: BLE001
                    rec, err = None, f"{type(e).__name__}: {e}"
                finished(futures[fut], rec, err)
    write_csv(done, out / "runs.csv")
    return n


# --- time estimate ----------------------------------------------------------------------------------------------

#: seconds per optimizer step at d 128, L 4, batch 16, one thread, this 2-core machine (pilots: 0.08-0.09
#: with a moderate load, 0.11-0.13 under a heavy one; docs/results/paper_repro.md); scaled as
#: (d / 128)^1.7 x L / 4 x batch / 16 x seq_len / 64 (measured: d 256, L 6 costs 4.9x d 128, L 4)
STEP_S_D128_L4 = 0.10
KSS_OVERHEAD = 0.15
RUN_FIXED_S = 4.0  # model build, RKSP at init and end, accuracy, Trainer set-up


def expected_fraction(spec: RunSpec) -> float:
    """The share of the step budget a run is expected to use (diverged runs stop early), from the pilots at
    d 128, L 4: No-Norm stops near step 60-160 from lr 3e-3 up; normed models from lr 0.3 (Pre-LN) or 1.0."""
    lr = spec.lr
    if spec.norm == "none":
        table = ((2.5e-3, 1.0), (3.2e-3, 0.8), (3.7e-3, 0.55), (4.5e-3, 0.3), (8e-3, 0.2))
        return next((f for hi, f in table if lr < hi), 0.12)
    if spec.norm in ("pre", "rms"):
        table = ((0.15, 1.0), (0.25, 0.7), (0.4, 0.35), (0.7, 0.2))
        return next((f for hi, f in table if lr < hi), 0.12)
    return 1.0 if lr < 0.5 else 0.15


def estimate_s(spec: RunSpec, step_s: float = STEP_S_D128_L4, fraction: float | None = None) -> float:
    """Expected seconds of one run: ``fraction`` of the step budget (default ``expected_fraction``)."""
    t = step_s * (spec.d_model / 128) ** 1.7 * spec.n_layers / 4 * spec.batch / 16 * spec.seq_len / 64
    if ALL_METHODS[spec.method].kss:
        t *= 1 + KSS_OVERHEAD
    return RUN_FIXED_S + t * spec.steps * (expected_fraction(spec) if fraction is None else fraction)


def plan(protocol: Protocol, groups: list[str], out: Path, workers: int, step_s: float, log=print) -> dict:
    """Runs per group, how many are done, and the wall time left with ``workers`` workers."""
    done = read_runs(out / "runs.jsonl")
    specs = unique([s for g in groups for s in protocol.group(g)])
    todo = [s for s in specs if s.key not in done]
    counted = set()
    for g in groups:
        gs = unique(protocol.group(g))
        new = [s for s in gs if s.key not in counted]
        counted |= {s.key for s in gs}
        left = [s for s in new if s.key not in done]
        log(f"  {g:7s} {len(gs):4d} runs, {len(new)} not in an earlier group, {len(left)} of those to train: "
            f"{sum(estimate_s(s, step_s) for s in left) / 3600:.1f} worker-h expected, "
            f"{sum(estimate_s(s, step_s, 1.0) for s in left) / 3600:.1f} if no run stopped early")
    expected = sum(estimate_s(s, step_s) for s in todo)
    full = sum(estimate_s(s, step_s, 1.0) for s in todo)
    log(f"  total   {len(specs):4d} distinct runs, {len(todo)} to train: {expected / workers / 3600:.1f} h expected "
        f"with {workers} workers at {step_s:.3f} s/step (d 128, L 4, batch 16); at most {full / workers / 3600:.1f} h")
    return {"runs": len(specs), "todo": len(todo), "worker_s_expected": expected, "worker_s_full": full}
