"""`hf-rksp` command line: a thin layer over the library (no logic of its own)."""

from __future__ import annotations

import argparse
import sys

from .errors import RKSPError
from .spectral import DEFAULT_POWER_ITERS

PUSH_HELP = """\
Publish an audit to the Hugging Face Hub in a single commit (or none).

own mode (default): audit.json, spectrum.png, profile.png and the card as
README.md go to --repo-id, created when missing.
--to-model: a pull request on the audited model's repo (or --repo-id) with the
same files under rksp/; the model's README is not touched.

The token comes from HF_TOKEN or `hf auth login` and never appears in output.

examples:
  hf-rksp push gpt2__init --repo-id alice/gpt2-rksp --dry-run
  hf-rksp push meta-llama__Llama-2-7b-hf --to-model
"""

AUDIT_HELP = """\
Audit a transformer with Residual Koopman Spectral Profiling (RKSP v1).

For every residual block, snapshots of the residual stream entering (X) and
leaving (Y) the block are whitened and a DMD operator K is fitted (Y ~ X K);
its eigenvalues give the near-unit spectral mass (fraction of modes with
|lambda| within --delta of 1), the spectral radius and the outside mass.

Writes audits/<slug>/audit.json, spectrum.png, profile.png and a Hub model card
model_cards/<slug>/README.md (slug = hub id with / -> __, plus __init at init).

examples:
  hf-rksp audit ./my-checkpoint
  hf-rksp audit path/to/model.gguf --tokens 1024
  hf-rksp audit gpt2 --init                 # architecture at random init, offline
  hf-rksp audit --config config.json        # any config.json at random init
  hf-rksp audit org/model --dataset wikitext --dataset-config wikitext-2-raw-v1 --split test
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-rksp",
        description="RKSP spectral audits for Hugging Face transformers.",
        epilog=(
            "examples:\n"
            "  hf-rksp audit ./my-checkpoint            # pretrained weights (dir, .gguf, or cached hub id)\n"
            "  hf-rksp audit gpt2 --init                # architecture at random init, offline\n"
            "  hf-rksp audit --config config.json       # any config at random init\n"
            "  hf-rksp audit MODEL --tokens 2048 --rank 256 --delta 0.05\n"
            "run 'hf-rksp audit --help' for every option"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")
    a = sub.add_parser("audit", help="audit a model (pretrained or at random init)", description=AUDIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("model", nargs="?", help="hub id (local HF cache when offline), checkpoint directory, or .gguf file")
    g = a.add_argument_group("what to audit")
    g.add_argument("--init", action="store_true",
                   help="build the architecture at random init (no weights); configs of famous checkpoints ship offline")
    g.add_argument("--config", metavar="PATH", help="a config.json to build at random init (implies --init)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit)")
    g.add_argument("--name", metavar="HUB_ID",
                   help="the hub id a local directory or .gguf stands for: names the slug and the card's base_model")
    g.add_argument("--blocks", metavar="PATH",
                   help="attribute path of the residual block list for an unknown family (e.g. model.layers)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code from the repo (off by default)")
    m = a.add_argument_group("method (RKSP v1)")
    m.add_argument("--tokens", type=int, default=2048, help="calibration tokens N (default 2048)")
    m.add_argument("--seq-len", type=int, default=512, help="sequence length T; N/T sequences, no padding (default 512)")
    m.add_argument("--rank", type=int, default=None,
                   help="max whitening rank r (default 256, capped at N-1 and d; an explicit r > N-1 is an error)")
    m.add_argument("--delta", type=float, default=0.05, help="near-unit band half-width: | |lambda| - 1 | <= delta (default 0.05)")
    m.add_argument("--whitening", choices=["auto", "gram", "exact", "randomized"], default="auto",
                   help="subspace finder: auto (default: randomized when min(N-1, d) >= 4 x rank, e.g. 7B widths, "
                        "else gram), gram (exact eigen-decomposition of the d x d or N x N moments), exact (full SVD, "
                        "the reference), randomized (float32 subspace iteration on the moments, on the GPU when there "
                        "is one; float64 Rayleigh-Ritz)")
    m.add_argument("--exact", action="store_true", help="shorthand for --whitening exact (full-SVD reference path)")
    m.add_argument("--power-iters", type=int, default=DEFAULT_POWER_ITERS,
                   help="minimum power iterations of the randomized range finder, when randomized whitening is used; "
                        "it iterates further until converged, or falls back to gram on a flat spectrum "
                        f"(default {DEFAULT_POWER_ITERS})")
    m.add_argument("--seed", type=int, default=0, help="seed for random init, random token ids and the range finder (default 0)")
    k = a.add_argument_group("risk (the model fitted on hf-rksp's divergence sweep)")
    k.add_argument("--lr", type=float, metavar="LR",
                   help="peak learning rate the probability of divergence is given for (default: the family's "
                        "typical pretraining value, e.g. gpt2 6e-4, llama 3e-4, bert 1e-4; see README)")
    c = a.add_argument_group("calibration input (default: the English text embedded in the package)")
    c.add_argument("--text", metavar="FILE", help="UTF-8 text file to calibrate on")
    c.add_argument("--dataset", metavar="NAME_OR_PATH", help="a `datasets` dataset to calibrate on")
    c.add_argument("--dataset-config", help="dataset configuration name")
    c.add_argument("--split", default="train", help="dataset split (default train)")
    c.add_argument("--column", default="text", help="dataset text column (default text)")
    r = a.add_argument_group("runtime")
    r.add_argument("--dtype", default="float32", help="forward dtype: float32 (default), bfloat16, float16")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    r.add_argument("--batch-size", type=int, default=1, help="sequences per forward batch (default 1)")
    r.add_argument("--stream", action="store_true",
                   help="layer-major: read (or, with --init, create) and run one block at a time "
                        "(peak memory ~ one block + activations); automatic when the model would take more "
                        "than half the available RAM; resumes after an interruption")
    r.add_argument("--device-map", choices=["auto", "cpu", "cuda", "disk"],
                   help="whole-model loading through accelerate's device map (disk: offload what does not fit)")
    r.add_argument("--max-memory", metavar="DEV=SIZE,...",
                   help="accelerate max_memory for --device-map, e.g. 'cuda:0=20GiB,cpu=30GiB'")
    q = r.add_mutually_exclusive_group()
    q.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit weights (needs CUDA)")
    q.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit NF4 weights (needs CUDA)")
    r.add_argument("--out-dir", default=".", help="directory holding audits/ and model_cards/ (default: current directory)")
    r.add_argument("--no-write", action="store_true", help="print the summary only, write nothing")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.add_argument("--from-audit", metavar="AUDIT_JSON",
                   help="re-render plots and card from an existing audit.json (no model needed)")
    r.add_argument("--push-to", metavar="USER/NAME", help="after writing, push the audit to this Hub repo")

    u = sub.add_parser("push", help="publish an audit (JSON, plots, card) to the Hub in one commit",
                       description=PUSH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("audit", metavar="SLUG_OR_DIR", help="audit slug under OUT_DIR/audits, or an audit directory")
    u.add_argument("--repo-id", metavar="USER/NAME", help="target repo (own mode: created when missing)")
    u.add_argument("--to-model", action="store_true",
                   help="open a PR on the audited model's repo (or --repo-id) with files under rksp/")
    u.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    u.add_argument("--revision", help="branch to commit to (default main)")
    u.add_argument("--private", action="store_true", help="create the audit repo as private")
    u.add_argument("--dry-run", action="store_true", help="print exactly what would be uploaded, upload nothing")
    u.add_argument("--out-dir", default=".", help="directory holding audits/ and model_cards/ (default .)")

    c = sub.add_parser("compare", help="compare two audits block by block")
    c.add_argument("a", help="audit A: path to audit.json, audit directory, or slug")
    c.add_argument("b", help="audit B")
    c.add_argument("--out-dir", default=".", help="where slugs are looked up (default .)")
    c.add_argument("--plot", metavar="PNG", help="write both profiles to this PNG")
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return p


def print_summary(result) -> None:
    from .report import risk_line

    d = result.data
    s = d["summary"]
    lines = [
        "",
        f"RKSP audit of {d['source']['id']}" + (" (random init)" if d["source"]["init"] else ""),
        f"  blocks {d['source']['n_blocks']}, d_model {d['source']['d_model']}, "
        f"{d['inputs']['n_tokens']} tokens ({d['inputs']['origin']}), rank <= {d['method']['rank']}",
        f"  near-unit mass M      {s['near_unit_mass']:.4f}",
        f"  spectral radius max   {s['spectral_radius_max']:.4f} (block {s['spectral_radius_max_block']})",
        f"  outside mass (mean)   {s['outside_mass_mean']:.4f}",
        f"  DMD fit R^2 (mean)    {s['fit_r2_mean']:.4f}",
        "  risk                  " + risk_line(d),
        f"  time                  {d['timings']['total_s']:.1f} s",
    ]
    for name, path in result.paths.items():
        lines.append(f"  wrote {name:<9} {path}")
    print("\n".join(lines))


def quiet_libraries() -> None:
    """-q: no progress bars or warnings from transformers/hf_rksp; errors still print."""
    import logging

    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("hf_rksp").setLevel(logging.ERROR)


def cmd_audit(args) -> int:
    from .audit import AuditOptions, audit, rerender

    if args.quiet:
        quiet_libraries()
    if args.from_audit:
        result = rerender(args.from_audit, out_dir=args.out_dir)
    else:
        opts = AuditOptions(
            tokens=args.tokens, seq_len=args.seq_len, rank=args.rank, delta=args.delta, seed=args.seed,
            dtype=args.dtype, device=args.device, batch_size=args.batch_size,
            whitening="exact" if args.exact else args.whitening, power_iters=args.power_iters,
            text=args.text, dataset=args.dataset, dataset_config=args.dataset_config, split=args.split,
            column=args.column, trust_remote_code=args.trust_remote_code, revision=args.revision, name=args.name,
            blocks=args.blocks, stream=args.stream, lr=args.lr, device_map=args.device_map,
            max_memory=args.max_memory, quantize="8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None,
        )
        if args.push_to and args.no_write:
            raise RKSPError("--push-to needs the files: drop --no-write")
        result = audit(args.model, init=args.init, config=args.config, options=opts,
                       out_dir=None if args.no_write else args.out_dir, progress=not args.quiet)
    print_summary(result)
    if args.push_to:
        from . import hub

        plan = hub.plan_push(result.data["slug"], args.push_to, out_dir=args.out_dir)
        print_push(hub.push(plan))
    return 0


def print_push(res) -> None:
    print(f"pushed {len(res.plan.files)} files to {res.plan.repo_id} in one commit: {res.commit_url}")
    if res.pr_url:
        print(f"pull request: {res.pr_url}")


def cmd_push(args) -> int:
    from . import hub

    plan = hub.plan_push(args.audit, args.repo_id, mode="model-pr" if args.to_model else "own",
                         revision=args.revision, create_pr=args.create_pr, private=args.private, out_dir=args.out_dir)
    if args.dry_run:
        print("dry run: nothing uploaded\n" + plan.describe())
        return 0
    print_push(hub.push(plan))
    return 0


def cmd_compare(args) -> int:
    import json

    from . import atomic
    from .compare import compare, compare_png, load_audit

    a, b = load_audit(args.a, args.out_dir), load_audit(args.b, args.out_dir)
    res = compare(a, b)
    if args.plot:
        atomic.write_bytes(args.plot, compare_png(a, b))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"A: {res['a']['slug']}\nB: {res['b']['slug']}")
    print(f"{'':<22}{'A':>10}{'B':>10}{'B-A':>10}")
    for k, v in res["summary"].items():
        print(f"{k:<22}{v['a']:>10.4f}{v['b']:>10.4f}{v['delta']:>+10.4f}")
    if res["blocks"]:
        print(f"\n{'block':>5}{'d near-unit':>13}{'d radius':>11}{'d outside':>11}{'d R2':>9}")
        for r in res["blocks"]:
            print(f"{r['index']:>5}{r['near_unit_mass_delta']:>+13.4f}{r['spectral_radius_delta']:>+11.4f}"
                  f"{r['outside_mass_delta']:>+11.4f}{r['fit_r2_delta']:>+9.4f}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    print("\n" + res["verdict"])
    if args.plot:
        print(f"wrote plot {args.plot}")
    return 0


COMMANDS = {"audit": cmd_audit, "push": cmd_push, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"hf-rksp {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except RKSPError as e:
        print(f"hf-rksp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-rksp: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
