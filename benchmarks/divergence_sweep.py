"""The divergence sweep: train small transformers from scratch, label divergence, and test RKSP.

    python benchmarks/divergence_sweep.py                 # full sweep -> benchmarks/results/divergence_sweep/
    python benchmarks/divergence_sweep.py --workers 2     # parallel processes (default: CPU count)
    python benchmarks/divergence_sweep.py --smoke --out /tmp/smoke   # pipeline check in ~1 minute

Resumable: each finished run is one line of runs.jsonl; rerunning skips them.
After the runs, the analysis (hf_rksp.sweep.analysis) writes runs.csv,
summary.json, roc.png, kss_rates.png, and with --write-risk-model the risk model
the audit ships (hf_rksp/data/risk_model.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from hf_rksp.sweep import analysis, design

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "divergence_sweep"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="a few short runs: checks the pipeline, not the numbers")
    ap.add_argument("--write-risk-model", action="store_true",
                    help="also write the fitted risk model to hf_rksp/data/risk_model.json")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    args = ap.parse_args(argv)

    out = Path(args.out)
    plan = design.smoke_design() if args.smoke else design.full_design()
    t0 = time.perf_counter()
    rows = design.execute(plan, out, args.workers)
    summary = analysis.analyze(rows, out, bootstrap=args.bootstrap if not args.smoke else 50)
    summary["sweep_seconds_this_invocation"] = time.perf_counter() - t0
    summary["workers"] = args.workers
    analysis.write_json(out / "summary.json", summary)
    if args.write_risk_model:
        analysis.write_json(REPO / "hf_rksp" / "data" / "risk_model.json", summary["risk_model"])
    print(json.dumps(analysis.headline(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
