"""Which runs the divergence sweep trains, and the runner that executes them resumably in parallel."""

from __future__ import annotations

import itertools
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from .run import RunSpec

NORMS = ("pre", "post", "none")
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
#: the normalized models did not diverge at 3e-2 in 200 steps, so the grid reaches further (own sampling seed,
#: so the cells above keep their configurations and finished runs)
LRS_HIGH = (1e-1, 3e-1)
INIT_STDS = (0.02, 0.08)
DEPTHS = (2, 6)
WIDTHS = (64, 128)
WARMUPS = (0, 50)
#: KSS prevention: no normalization, a learning-rate grid from the stable edge upwards
KSS_LRS = (3e-3, 6e-3, 1e-2, 1.5e-2, 2e-2)
KSS_SEEDS = 8


def factor_design(style: str, per_cell: int, seeds: int, rng_seed: int, lrs=LRS) -> list[RunSpec]:
    """For every (norm, lr) cell, ``per_cell`` of the 16 (init, depth, width, warm-up) combinations, seeded."""
    rng = random.Random(rng_seed)
    combos = list(itertools.product(INIT_STDS, DEPTHS, WIDTHS, WARMUPS))
    specs = []
    for norm, lr in itertools.product(NORMS, lrs):
        for std, depth, width, wu in rng.sample(combos, per_cell):
            specs += [RunSpec(style=style, norm=norm, lr=lr, init_std=std, n_layers=depth, d_model=width,
                              warmup=wu, seed=s) for s in range(seeds)]
    return specs


def kss_design(seeds: int = KSS_SEEDS, lrs=KSS_LRS, steps: int = 200) -> list[RunSpec]:
    return [RunSpec(style="gpt", norm="none", lr=lr, seed=s, kss=k, steps=steps)
            for lr in lrs for k in (False, True) for s in range(seeds)]


def full_design() -> dict[str, list[RunSpec]]:
    """The published sweep: 'fit' (GPT-style, fits the risk model), 'transfer' (Llama-style), 'kss'."""
    return {
        "fit": factor_design("gpt", per_cell=6, seeds=3, rng_seed=0)
        + factor_design("gpt", per_cell=6, seeds=3, rng_seed=2, lrs=LRS_HIGH),
        "transfer": factor_design("llama", per_cell=3, seeds=3, rng_seed=1)
        + factor_design("llama", per_cell=3, seeds=3, rng_seed=3, lrs=LRS_HIGH),
        "kss": kss_design(),
    }


def smoke_design() -> dict[str, list[RunSpec]]:
    """A few short runs that exercise every stage of the pipeline (the test suite's version)."""
    fit = [RunSpec(style="gpt", norm=n, lr=lr, n_layers=2, d_model=32, seed=s, steps=12)
           for n in ("pre", "none") for lr in (1e-3, 3e-1) for s in range(2)]
    transfer = [RunSpec(style="llama", norm=n, lr=lr, n_layers=2, d_model=32, seed=0, steps=12)
                for n in ("pre", "none") for lr in (1e-3, 3e-1)]
    return {"fit": fit, "transfer": transfer, "kss": kss_design(seeds=1, lrs=(1e-3, 3e-1), steps=6)}


def _work(item: tuple[str, RunSpec]) -> dict:
    from .run import run

    part, spec = item
    try:
        return {"part": part, **run(spec)}
    except Exception as e:  # recorded, counted and excluded by the analysis; never silently dropped
        return {"part": part, "run_id": spec.run_id, "config_id": spec.config_id, "error": f"{type(e).__name__}: {e}"}


def execute(design: dict[str, list[RunSpec]], out: Path, workers: int, progress: bool = True) -> list[dict]:
    """Run every spec not already in ``out/runs.jsonl`` (one JSON line per finished run, flushed: resumable)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption is run again
                    continue
                done[(row["part"], row["run_id"])] = row
    todo = [(p, s) for p, specs in design.items() for s in specs if (p, s.run_id) not in done]
    with open(path, "a") as f, tqdm(total=len(todo), desc="sweep runs", unit="run", disable=not progress) as bar:
        def keep(row):
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[(row["part"], row["run_id"])] = row
            bar.update(1)

        if workers <= 1:
            for item in todo:
                keep(_work(item))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_work, item) for item in todo]
                for fut in as_completed(futures):
                    keep(fut.result())
    wanted = {(p, s.run_id) for p, specs in design.items() for s in specs}
    return [row for key, row in done.items() if key in wanted]
