"""`hf-rksp` command line: a thin layer over the library (no logic of its own)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import fields

from hf_rksp.cli.errors import fail, unexpected, worded
from hf_rksp.errors import RKSPError

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
Audit a transformer with Residual Koopman Spectral Profiling (RKSP v2, the
method of arXiv 2602.22988).

For every residual block, snapshots of the residual stream entering (X) and
leaving (Y) the block are ZCA-whitened with X's covariance (+ eps I) and the
DMD operator A = Y~ X~^+ is fitted.  Its eigenvalues give the mass partition
(expansive |lambda| > 1.05, near-unit [0.90, 1.05], contractive < 0.80), the
spectral radius, kappa(V), the Kreiss constant and the ResDMD residuals; the
fit gives eta_nl.  The score is the mean near-unit mass M over blocks.

Writes audits/<slug>/audit.json, spectrum.png, profile.png and a Hub model card
model_cards/<slug>/README.md (slug = hub id with / -> __, plus __init at init).

examples:
  hf-rksp audit ./my-checkpoint
  hf-rksp audit path/to/model.gguf --tokens 1024
  hf-rksp audit gpt2 --init                 # architecture at random init, offline
  hf-rksp audit --config config.json        # any config.json at random init
  hf-rksp audit org/model --dataset wikitext --dataset-config wikitext-2-raw-v1 --split test
"""


PREFLIGHT_HELP = """\
Will this planned training run diverge, and what learning rate is safe?

Trains a copy of the model for 5% of --total-steps with AdamW at the planned
settings, ramping the lr to its peak over the first half of the probe, and
reads the loss, the gradient norm and every block's whitened spectral radius
into the shipped pre-flight model (fitted on hf-rksp's reproduction of the
paper's sweep; its held-out AUROC and validity range come with the result).
Outside that range the result says so and gives no probability.

examples:
  hf-rksp preflight gpt2 --init --lr 3e-4 --warmup-steps 100 --total-steps 2000
  hf-rksp preflight ./my-checkpoint --text train.txt --lr 1e-4 --total-steps 1000 --json
"""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block), like every other error."""

    def error(self, message: str):
        self.exit(2, f"hf-rksp: error: {message.splitlines()[0] if message else 'invalid arguments'} "
                     f"(see '{self.prog} --help')\n")


def _cli_type(parse):
    """An Option's ``parse`` as an argparse type: its ValueError becomes the usage error's message."""
    if parse in (None, int, float):  # argparse's own wording: "invalid int value: 'x'"
        return parse

    def typed(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = parse.__name__
    return typed


def _add_option(group, f, meta) -> None:
    """An AuditOptions field as its flag(s), dest = field name, unset unless given (the dataclass holds the default)."""
    from hf_rksp.utils.options import flag, help_text, switch

    kw = {"dest": f.name, "default": argparse.SUPPRESS}
    if meta.switches:  # one switch per value, at most one of them
        q = group.add_mutually_exclusive_group()
        for value, (text, help_) in meta.switches.items():
            q.add_argument(text, action="store_const", const=value, help=help_, **kw)
    elif switch(f) is not None:
        group.add_argument(switch(f), action="store_false" if f.default else "store_true", help=help_text(f), **kw)
    else:
        group.add_argument(flag(f.name), type=_cli_type(meta.parse), metavar=meta.metavar,
                           choices=list(meta.choices) if meta.choices else None, help=help_text(f), **kw)


def build_parser() -> argparse.ArgumentParser:
    from hf_rksp.pipeline.options import GROUPS, audit_option_fields

    p = Parser(
        prog="hf-rksp",
        description="RKSP spectral audits for Hugging Face transformers.",
        epilog=(
            "examples:\n"
            "  hf-rksp audit ./my-checkpoint            # pretrained weights (dir, .gguf, or cached hub id)\n"
            "  hf-rksp audit gpt2 --init                # architecture at random init, offline\n"
            "  hf-rksp audit --config config.json       # any config at random init\n"
            "  hf-rksp audit MODEL --tokens 2048 --rank 32      # rank-32 randomized DMD\n"
            "  hf-rksp audit MODEL --eps 1e-5 --band-upper 1.05 --band-lower 0.90 --contractive 0.80 --resdmd-tau 0.1\n"
            "run 'hf-rksp audit --help' for every option"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")
    a = sub.add_parser("audit", help="audit a model (pretrained or at random init)", description=AUDIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("model", nargs="?", help="hub id (local HF cache when offline), checkpoint directory, or .gguf file")
    groups = {key: a.add_argument_group(title) for key, title in GROUPS.items()}
    g, r = groups["source"], groups["runtime"]
    g.add_argument("--init", action="store_true",
                   help="build the architecture at random init (no weights); configs of famous checkpoints ship offline")
    g.add_argument("--config", metavar="PATH", help="a config.json to build at random init (implies --init)")
    for key, group in groups.items():  # every AuditOptions field, defined (help, default) in pipeline/options.py
        for f, meta in audit_option_fields():
            if meta.group == key:
                _add_option(group, f, meta)
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

    f = sub.add_parser("preflight", help="will a planned training run diverge? a 5%% probe on a copy",
                       description=PREFLIGHT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("model", nargs="?", help="hub id (local HF cache), checkpoint directory; with --init its "
                                            "architecture at random init")
    from hf_rksp.pipeline.preflight import PLAN_GROUPS, PreflightOptions
    from hf_rksp.utils.options import option_fields

    fgroups = {key: f.add_argument_group(title) for key, title in PLAN_GROUPS.items()}
    fgroups["source"].add_argument("--init", action="store_true", help="the architecture at random init")
    fgroups["source"].add_argument("--config", metavar="PATH", help="a config.json to build at random init")
    for fl, meta in option_fields(PreflightOptions):  # defined once, in pipeline/preflight.py
        _add_option(fgroups[meta.group], fl, meta)
    f.add_argument("--json", action="store_true", help="print the result as JSON")

    c = sub.add_parser("compare", help="compare two audits block by block")
    c.add_argument("a", help="audit A: path to audit.json, audit directory, or slug")
    c.add_argument("b", help="audit B")
    c.add_argument("--out-dir", default=".", help="where slugs are looked up (default .)")
    c.add_argument("--plot", metavar="PNG", help="write both profiles to this PNG")
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return p


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_summary(result) -> None:
    from hf_rksp.report.card import risk_line
    from hf_rksp.spectral import FEATURES

    r = result.record
    src, s = r.source, r.summary
    lines = [
        "",
        f"RKSP audit of {src.id}" + (" (random init)" if src.init else ""),
        f"  blocks {src.n_blocks}, d_model {src.d_model}, {r.inputs.n_tokens} tokens ({r.inputs.origin}), "
        f"DMD rank {r.method.rank}",
        f"  {'feature':<36}{'mean':>10}{'min':>10}{'max':>10}",
        *[f"  {f.label[:35]:<36}" + "".join(f"{_fmt(getattr(s.features[f.name], k), f.fmt):>10}"
                                            for k in ("mean", "min", "max"))
          for f in FEATURES],
        f"  score M (mean near-unit mass)       {s.score:.4f}",
        "  risk                  " + risk_line(r),
        f"  time                  {_fmt(r.timings.get('total_s'), '.1f')} s",
    ]
    for name, path in result.paths.items():
        lines.append(f"  wrote {name:<9} {path}")
    print("\n".join(lines))


def quiet_libraries() -> None:
    """-q: no progress bars (library chatter never reaches the terminal: see ``routed_logs``)."""
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


#: loggers whose messages are library chatter: the debug log only (HF_RKSP_LOG=FILE), never the terminal
LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "datasets", "accelerate", "torch", "py.warnings")


class Notices(logging.Handler):
    """hf-rksp's own warnings, held until the command ends: printed after a success, dropped on an error."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().replace("\n", " "))


@contextmanager
def routed_logs():
    """Library logs and Python warnings go to the debug log; hf-rksp's warnings to :class:`Notices`.

    The error line is then the only thing on stderr besides progress bars.
    Everything is restored on exit, so main() can run in-process (tests, notebooks).
    """
    try:
        debug = logging.FileHandler(os.environ["HF_RKSP_LOG"]) if os.environ.get("HF_RKSP_LOG") else \
            logging.NullHandler()
    except OSError:  # an unwritable debug log must not cost the command
        debug = logging.NullHandler()
    debug.setLevel(logging.DEBUG)
    debug.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    notices = Notices()
    saved = [(lg, lg.handlers[:], lg.propagate, lg.level)
             for lg in map(logging.getLogger, (*LIBRARY_LOGGERS, "hf_rksp"))]
    for lg, _, _, _ in saved:
        lg.handlers, lg.propagate = [debug], False
    logging.getLogger("hf_rksp").addHandler(notices)
    logging.getLogger("hf_rksp").setLevel(logging.DEBUG)  # its debug records (tracebacks) reach the debug log
    logging.captureWarnings(True)
    try:
        yield notices
    finally:
        logging.captureWarnings(False)
        for lg, handlers, propagate, level in saved:
            lg.handlers, lg.propagate, lg.level = handlers, propagate, level
        debug.close()


def audit_options(args):
    """The AuditOptions of parsed `hf-rksp audit` arguments: the options given, the dataclass's defaults else."""
    from hf_rksp.pipeline.options import AuditOptions

    return AuditOptions(**{f.name: getattr(args, f.name) for f in fields(AuditOptions) if hasattr(args, f.name)})


def cmd_audit(args) -> int:
    from hf_rksp.pipeline.run import audit, rerender

    if args.quiet:
        quiet_libraries()
    if args.from_audit:
        result = rerender(args.from_audit, out_dir=args.out_dir)
    else:
        opts = audit_options(args)
        if args.push_to and args.no_write:
            raise RKSPError("--push-to needs the files: drop --no-write")
        result = audit(args.model, init=args.init, config=args.config, options=opts,
                       out_dir=None if args.no_write else args.out_dir, progress=not args.quiet)
    print_summary(result)
    if args.push_to:
        from hf_rksp.publish import hub

        plan = hub.plan_push(result.record.slug, args.push_to, out_dir=args.out_dir)
        print_push(hub.push(plan))
    return 0


def print_push(res) -> None:
    print(f"pushed {len(res.plan.files)} files to {res.plan.repo_id} in one commit: {res.commit_url}")
    if res.pr_url:
        print(f"pull request: {res.pr_url}")


def cmd_push(args) -> int:
    from hf_rksp.publish import hub

    plan = hub.plan_push(args.audit, args.repo_id, mode="model-pr" if args.to_model else "own",
                         revision=args.revision, create_pr=args.create_pr, private=args.private, out_dir=args.out_dir)
    if args.dry_run:
        print("dry run: nothing uploaded\n" + plan.describe())
        return 0
    print_push(hub.push(plan))
    return 0


def cmd_compare(args) -> int:
    import json

    from hf_rksp.report.compare import compare, compare_png, load_audit
    from hf_rksp.utils import atomic

    a, b = load_audit(args.a, args.out_dir), load_audit(args.b, args.out_dir)
    res = compare(a, b)
    if args.plot:
        atomic.write_bytes(args.plot, compare_png(a, b))
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, allow_nan=False))
        return 0
    print(f"A: {res.a.slug}\nB: {res.b.slug}")
    print(f"{'':<30}{'A':>10}{'B':>10}{'B-A':>10}")
    for k, v in res.summary.items():
        print(f"{k[:29]:<30}{_fmt(v.a, '.4f'):>10}{_fmt(v.b, '.4f'):>10}{_fmt(v.delta, '+.4f'):>10}")
    if res.blocks:
        cols = ("near_unit_mass", "expansive_mass", "spectral_radius", "nonlinearity_ratio")
        print(f"\n{'block':>5}" + "".join(f"{'d ' + c[:12]:>16}" for c in cols))
        for r in res.blocks:
            print(f"{r.index:>5}" + "".join(f"{_fmt(r.delta(c), '+.4f'):>16}" for c in cols))
    for w in res.warnings:
        print(f"warning: {w}")
    print("\n" + res.verdict)
    if args.plot:
        print(f"wrote plot {args.plot}")
    return 0


def preflight_options(args):
    from hf_rksp.pipeline.preflight import PreflightOptions

    return PreflightOptions(**{f.name: getattr(args, f.name) for f in fields(PreflightOptions)
                               if hasattr(args, f.name)})


def cmd_preflight(args) -> int:
    import json
    from dataclasses import asdict

    from hf_rksp.errors import ConfigError
    from hf_rksp.pipeline.preflight import load_for_preflight, preflight

    opts = preflight_options(args)
    for name in ("lr", "total_steps"):
        if getattr(opts, name) is None:
            raise ConfigError("is required", param=name)
    model, batches = load_for_preflight(args.model, init=args.init, config=args.config, options=opts)
    kw = {k: v for k, v in asdict(opts).items() if k not in ("seq_len", "text")}
    res = preflight(model, batches, **kw)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    print(preflight_lines(res))
    return 0


def preflight_lines(res) -> str:
    p = ("no informative estimate: " + (res.unavailable_reason or "")) if res.probability is None else \
        f"{res.probability:.3f} ({res.band}); the model's held-out AUROC {res.model['heldout_auroc']:.2f}"
    ceiling = "-" if res.lr_ceiling is None else f"{res.lr_ceiling:.3g} (P = {res.lr_ceiling_probability:g})"
    blocks = ", ".join(f"{i} (rho {res.rho_before[i]:.3g} -> {res.rho_after[i]:.3g})" for i in res.driving_blocks) \
        or "-"
    return "\n".join([
        f"P(divergence)    {p}",
        f"lr               {res.lr:.3g}; lr_ceiling {ceiling}",
        f"driving block(s) {blocks}",
        f"probe            {res.probe_steps} steps ({100 * res.probe_fraction:.1f}% of the run), "
        f"{res.probe_seconds:.1f} s" + ("; it ran away (non-finite loss or gradient)" if res.probe_diverged else ""),
        *[f"warning: {w}" for w in res.warnings]])


COMMANDS = {"audit": cmd_audit, "push": cmd_push, "compare": cmd_compare, "preflight": cmd_preflight}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from hf_rksp.version import __version__

        print(f"hf-rksp {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    with routed_logs() as notices:
        try:
            from hf_rksp.publish.local import recover

            if args.command == "push" or (args.command == "audit" and not args.no_write):
                recover(args.out_dir)  # completes a publish a killed run left half done; compare only reads
            rc = COMMANDS[args.command](args)
        except RKSPError as e:
            logging.getLogger("hf_rksp").debug("error", exc_info=e)  # with its cause: the traceback behind it
            return fail(worded(e, parser))
        except KeyboardInterrupt as e:
            print(f"hf-rksp: {str(e) or 'interrupted; nothing was written'}", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001  the last guard: still one line, the traceback to the debug log
            return fail(unexpected(e))
        if not getattr(args, "quiet", False):
            for message in notices.messages:
                print(f"hf-rksp: warning: {message}", file=sys.stderr)
        return rc


if __name__ == "__main__":
    sys.exit(main())
