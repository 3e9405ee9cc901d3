"""The paper's experiments with its own protocol (issue 15): Tables 1, 2, 3/6 and 5, and the shipped risk model.

What is trained (docs/method.md; [ours] marks our choices, that page says why):

- Models: ``benchmarks.paper_models`` GPT-2-style decoder (learned positions, GELU MLP of width 4d, head width
  32), every weight and embedding from N(0, 0.02^2), **no residual scaling** (the setting that reproduces
  Table 1 at init), one of six normalizations; DeepNorm with alpha = (2L)^(1/4) and beta = (8L)^(-1/4) on
  W_v, W_o, W_1, W_2 (DeepNet's decoder formulas), SubLN = Magneto's sub-LN with gain 1.
- Task: associative recall (D.1: 4 pairs, length 64, vocabulary 256, last-position cross-entropy); the
  synthetic LM (D.2) at vocabulary 1,000 and length 128 [ours] for the optional ``lm`` group.
- Training: ``KSSTrainer`` (a transformers.Trainer), AdamW (betas 0.9/0.999, weight decay 0.01), batch 16,
  500 steps, 100-step linear warm-up then linear decay to 0 (the Trainer's default schedule) [ours].
- Divergence (the paper's label): loss > 50 or gradient norm > 500 (or non-finite) at any step; training
  stops there.  Also recorded: our old label (non-finite loss, or after warm-up a 10-step mean loss above
  the step-1 loss + 0.5 nats), for the sensitivity.
- At init: RKSP v2 with full DMD on 32 held-out sequences (2048 token states per block), layer means of
  M_~1, M_>1, rho, kappa(V).  Gradient baselines from the same run (``gradient_baselines``).  At the end:
  M_~1 (if not diverged) and held-out accuracy.

Groups (``Protocol``): ``table1`` (six norms x d {128, 256} x L {4, 6} x seeds 42/123/456 x an lr grid per
norm), ``kss`` (No-Norm at d 128, L 4, 24 trials per method: no control, clip 0.5 / 1.0, KSS alpha
0.10 / 0.15 / 0.20, unstable only, near-unit only), ``maxlr`` (Pre-LN, RMSNorm, No-Norm, 8 seeds per lr,
without and with KSS alpha 0.15), ``lm`` (optional); issue 24's runs in the paper's regime (No-Norm blocks
under a final LayerNorm): ``regime`` (the lr calibration, no control and clip 1.0), ``regime_kss`` (Tables 3/6
there), ``regime_maxlr`` (Table 5 there), ``table2_paper`` (pre-placed DeepNorm for Table 2's design),
``learning`` and ``learning_variants`` (the synthetic LM, where models learn before they diverge, KSS off/on).  A run is keyed by its full settings, so a run two
groups ask for is trained once, and finished runs are skipped.

    python -m benchmarks.paper_repro plan all                        # runs per group, done, time estimate
    OMP_NUM_THREADS=1 python -m benchmarks.paper_repro run all --workers 2
    python -m benchmarks.paper_repro analyze [--ship]               # tables, plots, summary.json
    python -m benchmarks.paper_repro pilot --norm none --lrs 1e-3 2e-3 --seeds 42 123

The code is the package ``benchmarks/repro/`` (protocol -> training -> runner -> stats -> analysis ->
plots -> report); this file is its command line.

Results: ``benchmarks/results/paper_repro/`` (runs.jsonl, runs.csv, summary.json, tables.md, *.png).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


# the reproduction's names, importable from this script (tests, kss_gradient_scale, divergence_anatomy)
from benchmarks.repro.analysis import BASELINES  # noqa: E402,F401
from benchmarks.repro.protocol import (ALL, ALL_METHODS, BIG, GROUPS, LM, METHODS, NORMS, PAPER_PROTOCOL,  # noqa: E402,F401
                            PILOT_METHODS, PROTOCOLS, RESULTS, RISK_MODEL, SMOKE_PROTOCOL, RunSpec, unique)
from benchmarks.repro.report import analyze  # noqa: E402
from benchmarks.repro.runner import STEP_S_D128_L4, estimate_s, execute, plan, read_runs, resolve_device  # noqa: E402,F401
from benchmarks.repro.stats import auroc, bootstrap_ci, ece, fisher_exact  # noqa: E402,F401
from benchmarks.repro.training import divergence_reason, gradient_baselines, old_label  # noqa: E402,F401
from benchmarks.repro.analysis import pilot_table, shared_lr_auroc  # noqa: E402,F401

__all__ = ["ALL", "BASELINES", "BIG", "METHODS", "NORMS", "PAPER_PROTOCOL", "SMOKE_PROTOCOL", "RunSpec", "analyze",
           "auroc", "bootstrap_ci", "divergence_reason", "ece", "execute", "fisher_exact", "gradient_baselines",
           "main", "old_label", "pilot_table", "read_runs", "shared_lr_auroc", "unique"]


# --- command line -----------------------------------------------------------------------------------------------

def _groups(names: list[str]) -> list[str]:
    out = []
    for n in names:
        for g in (ALL if n == "all" else (n,)):
            if g not in GROUPS:
                raise SystemExit(f"unknown group {g!r}: choose from {', '.join(GROUPS)} or all")
            if g not in out:
                out.append(g)
    return out


def _where(specs: list[RunSpec], clauses: list[str]) -> list[RunSpec]:
    """``key=value[,value...]`` filters on RunSpec fields (values parsed as the field's type)."""
    types = {f.name: f.type for f in dataclasses.fields(RunSpec)}
    for c in clauses:
        k, _, v = c.partition("=")
        if k not in types:
            raise SystemExit(f"--where {c}: {k!r} is not a run setting ({', '.join(types)})")
        cast = {"int": int, "float": float}.get(types[k], str)
        allowed = {cast(x) for x in v.split(",")}
        specs = [s for s in specs if getattr(s, k) in allowed]
    return specs


def _order(specs: list[RunSpec]) -> list[RunSpec]:
    """Smallest models first, then seed by seed (a sweep cut short still covers every norm, lr and method
    with the same seeds), longest first within a seed."""
    seeds = {s: i for i, s in enumerate(dict.fromkeys(x.seed for x in specs))}
    return sorted(specs, key=lambda s: (s.d_model, s.n_layers, seeds[s.seed], -estimate_s(s)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: %(default)s)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the groups' runs not yet in runs.jsonl")
    r.add_argument("groups", nargs="+", help=f"{', '.join(GROUPS)} or all (= {' '.join(ALL)})")
    r.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    r.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    r.add_argument("--where", action="append", default=[], metavar="KEY=V[,V]", help="only runs with these settings")
    r.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    pl = sub.add_parser("plan", help="runs per group, how many are done, and the time estimate")
    pl.add_argument("groups", nargs="+")
    pl.add_argument("--workers", type=int, default=2)
    pl.add_argument("--step-s", type=float, default=STEP_S_D128_L4,
                    help="seconds per step at d 128, L 4, batch 16 (default %(default)s, this machine under load)")
    pi = sub.add_parser("pilot", help="ad-hoc runs outside the grids, into OUT/pilot (same code path)")
    pi.add_argument("--norm", nargs="+", default=["none"])
    pi.add_argument("--lrs", type=float, nargs="+", required=True)
    pi.add_argument("--seeds", type=int, nargs="+", default=[42])
    pi.add_argument("--methods", nargs="+", default=["none"], choices=list(ALL_METHODS),
                    help="the paper's methods, or the pilot variants %s" % ", ".join(PILOT_METHODS))
    pi.add_argument("--d", type=int, default=128)
    pi.add_argument("--layers", type=int, default=4)
    pi.add_argument("--steps", type=int, default=None)
    pi.add_argument("--warmup", type=int, default=None)
    pi.add_argument("--batch", type=int, default=None)
    pi.add_argument("--task", choices=("recall", "lm"), default="recall")
    pi.add_argument("--workers", type=int, default=1)
    pi.add_argument("--device", default="auto")
    pi.add_argument("--deepnorm-pre", action="store_true",
                    help="DeepNorm pre-placed with beta on W_o, W_2 (RunSpec.deepnorm='pre'; the variant matching Table 1)")
    pi.add_argument("--final-norm", action="store_true",
                    help="a LayerNorm before the LM head after No-Norm blocks too (RunSpec.final_norm)")
    pi.add_argument("--no-stop", action="store_true",
                    help="train on past the divergence label (still recorded): does a stopped run recover?")
    a = sub.add_parser("analyze", help="tables, plots and summary.json from runs.jsonl (no training)")
    a.add_argument("--ship", action="store_true", help=f"also write the risk model to {RISK_MODEL}")
    a.add_argument("--risk-model-path", type=Path, default=RISK_MODEL, help=argparse.SUPPRESS)
    a.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    args = p.parse_args(argv)
    protocol = PROTOCOLS[args.protocol]
    if args.cmd == "run":
        specs = _where(unique([s for g in _groups(args.groups) for s in protocol.group(g)]), args.where)
        if args.dry_run:
            for s in specs:
                print(s.key, s.label)
            return 0
        ordered = [s for g in _groups(args.groups) for s in _order(protocol.group(g)) if s in set(specs)]
        execute(unique(ordered), args.out, workers=args.workers, device=resolve_device(args.device),
                threads=args.threads)
        return 0
    if args.cmd == "plan":
        plan(protocol, _groups(args.groups), args.out, args.workers, args.step_s)
        return 0
    if args.cmd == "pilot":
        base = dict(stop_at_label=not args.no_stop, final_norm=True if args.final_norm else None,
                    steps=args.steps or protocol.steps,
                    warmup=protocol.warmup if args.warmup is None else args.warmup, batch=args.batch or protocol.batch)
        extra = LM if args.task == "lm" else {}
        specs = [RunSpec(task=args.task, norm=n, d_model=args.d, n_layers=args.layers, lr=lr, seed=s, method=m,
                         deepnorm="pre" if args.deepnorm_pre and n == "deepnorm" else None, **base, **extra)
                 for n in args.norm for m in args.methods for lr in args.lrs for s in args.seeds]
        execute(specs, args.out / "pilot", workers=args.workers, device=resolve_device(args.device))
        return 0
    analyze(protocol, args.out, ship=args.ship, risk_path=args.risk_model_path, n_boot=args.bootstrap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
