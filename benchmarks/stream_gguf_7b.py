"""Stream-audit a GGUF with LLaMA-2-7B's exact shapes: peak RSS, and time against de-quantize + forward.

Writes (once) a Q8_0 GGUF of LLaMA-2-7B's shapes with the gguf package's
writer: seeded random int8 weights with float16 scales of about 0.02/127 per
32-value block (so weights are ~N(0, 0.02^2)-sized), F32 norms of 1, and the
llama metadata transformers builds the config from.  Tensors are generated
and written one at a time, so writing needs about one tensor of RAM.  Then,
like benchmarks/stream_7b.py (whose child processes it reuses), it alternates
child processes that audit the file with --stream and that stream the same
blocks through the same code with the spectral work removed
(de-quantize + forward), keeping the fastest of each.

    python -m benchmarks.stream_gguf_7b --json [--gguf /tmp/llama2-7b-q8_0.gguf] [--keep]

The file (7.2 GB) is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.stream_7b import child  # noqa: E402

SHAPES = dict(vocab=32000, d=4096, ff=11008, layers=32, heads=32)


def tensors(s: dict):
    """(name, numpy shape) of LLaMA-2-7B's base model in GGUF names, in file order (no output head)."""
    yield "token_embd.weight", (s["vocab"], s["d"])
    for i in range(s["layers"]):
        for t, shape in (("attn_norm", (s["d"],)), ("attn_q", (s["d"], s["d"])), ("attn_k", (s["d"], s["d"])),
                         ("attn_v", (s["d"], s["d"])), ("attn_output", (s["d"], s["d"])), ("ffn_norm", (s["d"],)),
                         ("ffn_gate", (s["ff"], s["d"])), ("ffn_up", (s["ff"], s["d"])),
                         ("ffn_down", (s["d"], s["ff"]))):
            yield f"blk.{i}.{t}.weight", shape
    yield "output_norm.weight", (s["d"],)


def q8_0(shape, rng) -> np.ndarray:
    """Seeded Q8_0 blocks: 2 bytes of float16 scale + 32 int8 values per block."""
    rows, cols = shape
    blocks = np.empty((rows * cols // 32, 34), dtype=np.uint8)
    blocks[:, :2] = np.full((blocks.shape[0], 1), 0.02 / 40, dtype=np.float16).view(np.uint8)
    blocks[:, 2:] = rng.integers(-127, 128, size=(blocks.shape[0], 32), dtype=np.int8).view(np.uint8)
    return blocks.reshape(rows, cols // 32 * 34)


def write_gguf(path: Path, s: dict = SHAPES, seed: int = 0) -> float:
    """Write the file tensor by tensor; returns the seconds it took."""
    from gguf import GGMLQuantizationType as Q, GGUFWriter

    t0 = time.perf_counter()
    w = GGUFWriter(str(path), "llama")
    w.add_name("llama2-7b-shapes-random")
    w.add_context_length(4096), w.add_embedding_length(s["d"]), w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ff"]), w.add_head_count(s["heads"]), w.add_head_count_kv(s["heads"])
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0), w.add_vocab_size(s["vocab"])
    specs = list(tensors(s))
    for name, shape in specs:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            nbytes = shape[0] * shape[1] // 32 * 34
            w.add_tensor_info(name, (shape[0], shape[1] // 32 * 34), np.dtype(np.uint8), nbytes, raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in specs:
        w.write_tensor_data(np.ones(shape, np.float32) if len(shape) == 1 else q8_0(shape, rng))
    w.close()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default="/tmp/llama2-7b-q8_0.gguf")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=1, help="alternating plain/audit rounds; the fastest of each counts")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF file afterwards")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    a = ap.parse_args(argv)

    path = Path(a.gguf)
    write_s = None if path.is_file() else write_gguf(path)
    job = {"threads": a.threads, "init": False, "source": str(path), "tokens": a.tokens, "seq_len": a.tokens}
    runs = {"plain": [], "audit": []}
    try:
        for _ in range(a.rounds):
            for mode in ("plain", "audit"):
                runs[mode].append(child({**job, "mode": mode}))
    finally:
        size = path.stat().st_size
        if not a.keep:
            path.unlink()
    audit_r, plain = min(runs["audit"], key=lambda r: r["seconds"]), min(runs["plain"], key=lambda r: r["seconds"])
    out = {"gguf": str(path), "gguf_gib": size / 2**30, "quant": "Q8_0", "write_seconds": write_s,
           "tokens": a.tokens, "blocks": audit_r["blocks"], "n_params": audit_r["n_params"],
           "peak_rss_gib": max(r["peak_rss_gib"] for r in runs["audit"]), "target_peak_rss_gib": 3.0,
           "audit_seconds": audit_r["seconds"], "dequantize_plus_forward_seconds": plain["seconds"],
           "time_ratio": audit_r["seconds"] / plain["seconds"], "target_time_ratio": 1.25,
           "plain_peak_rss_gib": plain["peak_rss_gib"], "audit_timings": audit_r["timings"],
           "plain_timings": plain["timings"], "rank": audit_r["rank"], "rounds": a.rounds, "threads": a.threads}
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
