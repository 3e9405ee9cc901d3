"""Our default audit of the SmolLM2 GGUF against WeightWatcher 0.7.7's analyze() of the same file.

Both sides run as whole commands in fresh child processes, alternating, `--rounds` times (medians):
ours is `hf-rksp audit SmolLM2.gguf --no-write -q` (load included, default options: 2048 tokens, full DMD,
every feature); WeightWatcher's is transformers' `AutoModelForCausalLM.from_pretrained(gguf_file=...)`
followed by `WeightWatcher(model=...).analyze()` (its defaults).  Peak RSS is each child's own
(`getrusage`).  WeightWatcher is a benchmark-only dependency: `pip install weightwatcher==0.7.7`.

    python -m benchmarks.vs_weightwatcher --json [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchmarks.gguf_load import run, smollm2_gguf  # noqa: E402

OURS = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from hf_rksp.cli.commands import main
rc = main(["audit", sys.argv[1], "--no-write", "-q"])
assert rc == 0
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0,
                              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

WW = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
import torch, weightwatcher
from transformers import AutoModelForCausalLM
d, f = os.path.split(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
details = weightwatcher.WeightWatcher(model=model).analyze()
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "layers": len(details),
                              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        import weightwatcher  # noqa: F401
    except ImportError:
        raise SystemExit("pip install weightwatcher==0.7.7 (benchmark-only)") from None
    path = smollm2_gguf()
    runs = {"ours": [], "weightwatcher": []}
    for _ in range(a.rounds):
        runs["ours"].append(run(OURS, path))
        runs["weightwatcher"].append(run(WW, path))
    wall = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    rss = {m: statistics.median(r["peak_rss_gib"] for r in rs) for m, rs in runs.items()}
    out = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "rounds": a.rounds,
           "ours_seconds": wall["ours"], "weightwatcher_seconds": wall["weightwatcher"],
           "wall_ratio": wall["ours"] / wall["weightwatcher"], "target_wall_ratio": 0.5,
           "ours_peak_rss_gib": rss["ours"], "weightwatcher_peak_rss_gib": rss["weightwatcher"],
           "peak_rss_ratio": rss["ours"] / rss["weightwatcher"], "target_peak_rss_ratio": 1.0,
           "ours_all": [r["seconds"] for r in runs["ours"]],
           "weightwatcher_all": [r["seconds"] for r in runs["weightwatcher"]],
           "weightwatcher_layers": runs["weightwatcher"][0]["layers"]}
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
