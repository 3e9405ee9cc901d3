"""Streamed audit of a LLaMA-2-7B-shaped model: peak memory and time against reading + running the same blocks.

    python -m benchmarks.make_llama2_7b_checkpoint            # once: ~13.5 GB under /tmp
    python -m benchmarks.stream_7b --json                     # the checkpoint, 512 tokens
    python -m benchmarks.stream_7b --init --json              # the 7B config at seeded init (no checkpoint)

The spectral work per block at 7B width against a block's forward (full DMD,
rank-32, every feature) is benchmarks/spectral_speed.py's.

Each measurement runs in its own child process, which reports its own peak
RSS (getrusage ru_maxrss), so the figures are the audit process's, not this
script's.  Plain and audit children alternate for ``--rounds`` rounds (the
first round warms the page cache for both) and the fastest of each is kept.  ``read_plus_forward_seconds`` streams the same blocks through the
same code (weights read, every block run over every token) with the spectral
work replaced by nothing; ``time_ratio`` = audit / that, from the same run.
Calibration: seeded random token ids (the checkpoint ships no tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from hf_rksp.pipeline.options import AuditOptions
from hf_rksp.pipeline.run import audit, calibration_for
from hf_rksp.models.loading import load_for_streaming, resolve_source
t0 = time.perf_counter()
if args["mode"] == "audit":
    r = audit(args["source"], init=args["init"], config=args.get("config"), out_dir=None, stream=True,
              tokens=args["tokens"], seq_len=args["seq_len"], progress=False)
    out = {"seconds": time.perf_counter() - t0, "timings": r.data["timings"], "blocks": len(r.data["blocks"]),
           "near_unit_mass": r.data["summary"]["score"], "n_params": r.data["source"]["n_params"],
           "rank": r.data["method"]["rank"]}
elif args["mode"] == "plain":  # the same streaming, no spectral work
    # the same streaming with no spectral work: the library's streamer with a per-block function that does nothing
    from hf_rksp.capture.streaming import stream_snapshots_and_profile
    from hf_rksp.models.blocks import find_blocks
    from hf_rksp.models.weights import CheckpointWeights, InitWeights
    opts = AuditOptions(tokens=args["tokens"], seq_len=args["seq_len"], stream=True)
    loaded = load_for_streaming(resolve_source(args["source"], init=args["init"], config_path=args.get("config")))
    calib = calibration_for(loaded, opts)
    path, blocks = find_blocks(loaded.model)
    from hf_rksp.record.records import BlockRecord
    dtype = loaded.dtype
    weights = (InitWeights(loaded.model, blocks, opts.seed, dtype, "cpu") if args["init"] else
               CheckpointWeights(loaded.model, loaded.checkpoint, dtype, "cpu"))
    nothing = lambda i, x, y: BlockRecord(index=i, values={"near_unit_mass": 0.0}, m=1, rank=1, flags=[],  # noqa: E731
                                          eigenvalues=[[0.0, 0.0]])
    res, timings = stream_snapshots_and_profile(loaded.model, blocks, path, weights, calib.input_ids, nothing,
                                                progress=False)
    out = {"seconds": time.perf_counter() - t0, "timings": timings, "blocks": len(res)}
out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT " + json.dumps(out))
"""


def child(args: dict) -> dict:
    return run_child(CHILD, json.dumps(args))


def run_child(code: str, *argv: str) -> dict:
    """Run ``code`` in a fresh offline Python process; its last ``RESULT {json}`` line."""
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/llama2-7b-random")
    ap.add_argument("--init", action="store_true", help="the LLaMA-2-7B config at seeded init instead of a checkpoint")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating plain/audit rounds; the fastest of each counts")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    a = ap.parse_args(argv)

    base = {"threads": a.threads, "init": a.init, "source": "meta-llama/Llama-2-7b-hf"}
    tokens = a.tokens
    if not a.init:
        ck = Path(a.checkpoint)
        if not (ck / "model.safetensors.index.json").is_file():
            raise SystemExit(f"no checkpoint at {ck}: run benchmarks/make_llama2_7b_checkpoint.py first")
        base["source"] = str(ck)
    job = {**base, "tokens": tokens, "seq_len": tokens}
    # alternate plain / audit so that both see the same page cache; the first pair warms it
    runs = {"plain": [], "audit": []}
    for _ in range(a.rounds):
        for mode in ("plain", "audit"):
            runs[mode].append(child({**job, "mode": mode}))
    audit_r, plain = min(runs["audit"], key=lambda r: r["seconds"]), min(runs["plain"], key=lambda r: r["seconds"])
    out = {"rounds": a.rounds, "audit_seconds_all": [r["seconds"] for r in runs["audit"]],
           "read_plus_forward_seconds_all": [r["seconds"] for r in runs["plain"]],
           "source": "LLaMA-2-7B config at seeded init" if a.init else base["source"], "tokens": tokens,
           "blocks": audit_r["blocks"], "peak_rss_gib": max(r["peak_rss_gib"] for r in runs["audit"]),
           "audit_seconds": audit_r["seconds"], "read_plus_forward_seconds": plain["seconds"],
           "time_ratio": audit_r["seconds"] / plain["seconds"], "plain_peak_rss_gib": plain["peak_rss_gib"],
           "plain_timings": plain["timings"],
           "near_unit_mass": audit_r["near_unit_mass"], "n_params": audit_r["n_params"], "rank": audit_r["rank"],
           "audit_timings": audit_r["timings"]}
    if not a.init:
        out["checkpoint_gib"] = sum(p.stat().st_size for p in Path(a.checkpoint).glob("*.safetensors")) / 2**30
    out["threads"] = a.threads
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
