"""Write a checkpoint with LLaMA-2-7B's exact shapes and HF's sharded-safetensors layout (random bf16 weights).

    python -m benchmarks.make_llama2_7b_checkpoint [--out /tmp/llama2-7b-random] [--seed 0] [--shard-gib 2]

About 13.5 GB on disk (6.74 B parameters in bfloat16), shards of at most
--shard-gib plus model.safetensors.index.json and config.json (the config that
ships in hf_rksp).  Weights ~ N(0, 0.02^2), norms = 1, seeded; tensors are made
and written one shard at a time, so the script itself needs about one shard of
memory.  It is the input of benchmarks/stream_7b.py; never commit it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from hf_rksp.models.loading import load_config, resolve_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/llama2-7b-random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    args = ap.parse_args(argv)

    out = Path(args.out)
    need = 13.6 * 2**30
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path("/")).free
    if free < need:
        raise SystemExit(f"need ~13.6 GiB free under {out.parent}, have {free / 2**30:.1f} GiB")
    config = load_config(resolve_source("meta-llama/Llama-2-7b-hf", init=True))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    del model
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    limit = int(args.shard_gib * 2**30)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names = list(shapes)
    weight_map, files = {}, []

    def flush():
        nonlocal size
        if not shards[-1]:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], tmp / name, metadata={"format": "pt"})
        files.append(name)
        for k in shards[-1]:
            weight_map[k] = name
        shards[-1] = {}
        size = 0
        print(f"  wrote {name} ({time.perf_counter() - t0:.0f} s)", flush=True)

    for n in names:
        shape = shapes[n]
        nbytes = 2 * int(torch.Size(shape).numel())
        if size and size + nbytes > limit:
            flush()
        if n.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        shards[-1][n] = t
        size += nbytes
    flush()
    total = len(files)
    renamed = {}
    for i, f in enumerate(files):
        new = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (tmp / f).rename(tmp / new)
        renamed[f] = new
    index = {"metadata": {"total_size": 2 * sum(torch.Size(s).numel() for s in shapes.values())},
             "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = "bfloat16"
    config.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    disk = sum(p.stat().st_size for p in out.iterdir())
    print(json.dumps({"out": str(out), "shards": total, "parameters": sum(torch.Size(s).numel() for s in shapes.values()),
                      "disk_gib": disk / 2**30, "seconds": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
