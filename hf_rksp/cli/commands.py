"""`hf-rksp` command line: a thin layer over the library (no logic of its own)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import fields, replace

from hf_rksp.cli.errors import RedactingFormatter, fail, say, unexpected, worded
from hf_rksp.errors import AuditInterrupted, RKSPError

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


COMPARE_HELP = """\
Compare two RKSP audits of the same method version (a base model and its
fine-tune, init vs trained, two seeds...): every feature's mean over blocks in
A and B with the number of blocks it counts (n: fewer than the blocks where a
block has no value, e.g. the means over kept modes), the difference B - A,
the per-block differences of the main features when the depths agree, and a
warning for each method parameter or calibration input that differs (the
numbers are then not comparable).

examples:
  hf-rksp compare gpt2__init ./trained/audits/my-model
  hf-rksp compare a/audit.json b/audit.json --plot both.png
  hf-rksp compare A B --json          # the same, as JSON
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


#: what `audit` and `compare` print to stdout (--format): ``table`` for people, ``json``/``csv`` for programs
FORMATS = ("table", "json", "csv")


def add_format(parser, what: str, csv: str, *aliases: str) -> None:
    """The --format option of a command that prints a result (defined here once for `audit` and `compare`);
    ``aliases``: older flags that mean ``--format json``."""
    q = parser.add_mutually_exclusive_group()
    q.add_argument("--format", choices=FORMATS, default="table",
                   help=f"what to print to stdout: table (default), json ({what}) or csv ({csv})")
    for alias in aliases:
        q.add_argument(alias, dest="format", action="store_const", const="json", help="the same as --format json")


LIST_HELP = """\
What hf-rksp can audit, read from the installed package (no network):

  supported families  each transformers model_type whose residual blocks are
                      found automatically, with where its block list is on the
                      base model (any other: --blocks PATH)
  shipped configs     the famous checkpoints whose config ships with hf-rksp, so
                      `hf-rksp audit NAME --init` works offline, with the names
                      each answers to

examples:
  hf-rksp list
  hf-rksp audit gpt2-medium --init
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
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars (hf-rksp's own warnings still print)")
    r.add_argument("--from-audit", metavar="AUDIT_JSON",
                   help="re-render plots and card from an existing audit.json (no model needed)")
    r.add_argument("--push-to", metavar="USER/NAME", help="after writing, push the audit to this Hub repo")
    add_format(r, "the audit.json text, byte for byte", "AuditRecord.to_csv(): one row per block")

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

    c = sub.add_parser("compare", help="compare two audits block by block", description=COMPARE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("a", help="audit A: path to audit.json, audit directory, or slug")
    c.add_argument("b", help="audit B")
    c.add_argument("--out-dir", default=".", help="where slugs are looked up (default .)")
    c.add_argument("--plot", metavar="PNG", help="write both profiles to this PNG")
    add_format(c, "Comparison.to_dict()", "Comparison.to_csv(): a row per summary entry, then per block", "--json")
    sub.add_parser("list", help="supported families and the shipped --init configs", description=LIST_HELP,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _num(v, sign: str = "") -> str:
    """A number for a table: 4 decimals, or 4 significant digits where it is large or tiny."""
    if v is None:
        return "-"
    return format(v, sign + (".4f" if v == 0 or 1e-3 <= abs(v) < 1e5 else ".4g"))


def columns(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A plain-text table: each column as wide as its widest cell, two spaces between columns (so numbers
    never run together), the columns in ``right`` right-aligned (default: all but the first), others left."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = set(range(1, len(header))) if right is None else right

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(header), *map(fmt, rows)])


def print_result(result, fmt: str = "table") -> None:
    """An audit's result on stdout as ``fmt`` (FORMATS); for json and csv, the files written go to stderr so
    stdout holds the data only."""
    if fmt == "table":
        return print_summary(result)
    say(result.record.to_json() if fmt == "json" else result.record.to_csv(), end="")
    for name, path in result.paths.items():
        say(f"hf-rksp: wrote {name} {path}", file=sys.stderr)


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
        *[f"  risk warning          {w}" for w in (r.risk.warnings if r.risk is not None else [])],
        f"  time                  {_fmt(r.timings.get('total_s'), '.1f')} s",
    ]
    for name, path in result.paths.items():
        lines.append(f"  wrote {name:<9} {path}")
    if result.replaced:
        lines.append("  (replaced the earlier audit of the same source, method and inputs in this folder)")
    say("\n".join(lines))


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


def _configure_library_loggers() -> None:
    """Let transformers and huggingface_hub set up their loggers now (their public verbosity API does it
    on first use), so the stderr handlers they add are among those :func:`routed_logs` sets aside, not
    added behind its back during a load."""
    import huggingface_hub.utils.logging as hub_logging
    import transformers.utils.logging as tf_logging

    tf_logging.get_verbosity()
    hub_logging.get_verbosity()


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
    debug.setFormatter(RedactingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    notices = Notices()
    _configure_library_loggers()
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
    from hf_rksp.pipeline.validation import check_inputs, check_push_to

    check_push_to(args.push_to)  # before the audit: a bad repo id fails in a second, not after it
    check_inputs(out_dir=args.out_dir, from_audit=args.from_audit)
    if args.quiet:
        quiet_libraries()
    opts = audit_options(args)
    if opts.threads is None:  # ours on the command line: torch's every-core default collapses on a loaded machine
        from hf_rksp.utils.threads import default_threads

        opts = replace(opts, threads=default_threads())
    if args.from_audit:
        result = rerender(args.from_audit, out_dir=args.out_dir, overwrite=opts.overwrite)
    elif args.push_to:
        if args.no_write:
            raise RKSPError("--push-to needs the files: drop --no-write")
        result, pushed = audit_and_push(args, opts)
        try:
            print_result(result, args.format)
            print_push(pushed, file=sys.stderr if args.format != "table" else None)
        except KeyboardInterrupt:  # after the push and the local files: say so
            raise AuditInterrupted(_written(result) + f"; pushed to {args.push_to}") from None
        return 0
    else:
        result = audit(args.model, init=args.init, config=args.config, options=opts,
                       out_dir=None if args.no_write else args.out_dir, progress=not args.quiet)
    try:
        print_result(result, args.format)
    except KeyboardInterrupt:  # after the files were written: say so, not "nothing was written"
        raise AuditInterrupted(_written(result)) from None
    return 0


def _written(result) -> str:
    """What an audit that completed wrote, for a Ctrl-C after it."""
    if not result.paths:
        return "interrupted; nothing was written"
    return f"interrupted after the audit was written: {result.paths['audit']} and {result.paths['card']}"


def _push_unknown(repo_id: str) -> str:
    return f"; whether the push to {repo_id} went through is not known (a push is one commit: check the repo)"


def audit_and_push(args, opts):
    """--push-to: audit, push from a staging folder, and only then write the local files, so a failed push
    leaves the earlier local audit as it was."""
    import tempfile

    from hf_rksp.pipeline import slugs
    from hf_rksp.pipeline.run import audit, write_outputs
    from hf_rksp.publish import hub
    from hf_rksp.publish.local import check_out_dir

    check_out_dir(args.out_dir)
    result = audit(args.model, init=args.init, config=args.config, options=opts, out_dir=None,
                   progress=not args.quiet)
    slugs.guard(args.out_dir, result.record, opts.overwrite)  # refused here, before anything is uploaded
    with tempfile.TemporaryDirectory(prefix="hf-rksp-push-") as staging:
        write_outputs(result.record, staging)
        try:
            pushed = hub.push(hub.plan_push(result.record.slug, args.push_to, out_dir=staging))
        except KeyboardInterrupt:
            raise AuditInterrupted("interrupted; nothing was written locally" + _push_unknown(args.push_to)) from None
    try:
        result.paths, result.replaced = write_outputs(result.record, args.out_dir, overwrite=opts.overwrite,
                                                      report_replaced=True)
    except AuditInterrupted as e:  # the local state is in the message; the push is done
        raise AuditInterrupted(f"{e}; the push to {args.push_to} went through: {pushed.commit_url}") from None
    return result, pushed


def print_push(res, file=None) -> None:
    say(f"pushed {len(res.plan.files)} files to {res.plan.repo_id} in one commit: {res.commit_url}", file=file)
    if res.pr_url:
        say(f"pull request: {res.pr_url}", file=file)


def cmd_push(args) -> int:
    from hf_rksp.publish import hub

    plan = hub.plan_push(args.audit, args.repo_id, mode="model-pr" if args.to_model else "own",
                         revision=args.revision, create_pr=args.create_pr, private=args.private, out_dir=args.out_dir)
    if args.dry_run:
        say("dry run: nothing uploaded\n" + plan.describe() + "\n" + hub.unchecked(plan))
        return 0
    try:
        res = hub.push(plan)
    except KeyboardInterrupt:
        raise AuditInterrupted("interrupted; nothing was written locally" + _push_unknown(plan.repo_id)) from None
    print_push(res)
    return 0


def cmd_compare(args) -> int:
    import json

    from hf_rksp.report.compare import compare, compare_png, load_audit
    from hf_rksp.utils import atomic

    a, b = load_audit(args.a, args.out_dir), load_audit(args.b, args.out_dir)
    res = compare(a, b)
    if args.plot:
        atomic.write_bytes(args.plot, compare_png(a, b))
    if args.format != "table":
        say(json.dumps(res.to_dict(), indent=2, allow_nan=False) if args.format == "json" else res.to_csv(),
            end="" if args.format == "csv" else "\n")
        if args.plot:
            say(f"hf-rksp: wrote plot {args.plot}", file=sys.stderr)
        return 0
    say(f"A: {res.a.slug} ({res.a.id})\nB: {res.b.slug} ({res.b.id})\n")
    say(columns(["", "A", "n A", "B", "n B", "B - A"],
                  [[k, _num(v.a), str(v.n_a), _num(v.b), str(v.n_b), _num(v.delta, "+")]
                   for k, v in res.summary.items()]))
    if res.blocks:
        cols = ("near_unit_mass", "expansive_mass", "spectral_radius", "nonlinearity_ratio")
        say("\nper block, B - A:")
        say(columns(["block", *cols], [[str(r.index), *(_num(r.delta(c), "+") for c in cols)]
                                          for r in res.blocks]))
    for w in res.warnings:
        say(f"warning: {w}")
    say("\n" + res.verdict)
    if args.plot:
        say(f"wrote plot {args.plot}")
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


def cmd_list(args) -> int:
    from hf_rksp.models.blocks import BLOCK_PATHS, supported_families
    from hf_rksp.models.loading import shipped_config, shipped_config_names

    say("supported families (model_type: its block list on the base model; others: --blocks PATH)")
    say(columns(["  model_type", "blocks"], [[f"  {f}", BLOCK_PATHS[f]] for f in supported_families()],
                right=set()))
    by_file: dict[str, list[str]] = {}
    for name, fname in shipped_config_names().items():
        by_file.setdefault(fname, []).append(name)
    rows = []
    for fname, names in sorted(by_file.items()):
        cfg, hub_id = shipped_config(names[0]), fname.removesuffix(".json").replace("__", "/")
        size = [cfg.get(k) for k in ("num_hidden_layers", "n_layer") if cfg.get(k)][:1] + \
            [cfg.get(k) for k in ("hidden_size", "n_embd", "d_model") if cfg.get(k)][:1]
        rows.append([f"  {hub_id}", cfg.get("model_type", "-"), *(str(v) for v in size + ["-"] * (2 - len(size))),
                     ", ".join(n for n in names if n != hub_id) or "-"])
    say("\nshipped configs (hf-rksp audit NAME --init runs offline)")
    say(columns(["  name", "model_type", "blocks", "d_model", "also answers to"], rows, right={2, 3}))
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # in-process (a captured stdout has no file descriptor)
        pass


COMMANDS = {"list": cmd_list, "audit": cmd_audit, "push": cmd_push, "compare": cmd_compare, "preflight": cmd_preflight}


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
                try:
                    recover(args.out_dir)  # completes a publish a killed run left half done; compare only reads
                except KeyboardInterrupt:
                    from pathlib import Path

                    pending = list(Path(args.out_dir, "audits").glob(".publish-*.json"))
                    raise AuditInterrupted((f"interrupted while completing an earlier publish in {args.out_dir}: "
                                            "this command wrote nothing; the next hf-rksp command on that folder "
                                            "completes it") if pending else "interrupted; nothing was written") from None
            rc = COMMANDS[args.command](args)
        except RKSPError as e:
            logging.getLogger("hf_rksp").debug("error", exc_info=e)  # with its cause: the traceback behind it
            return fail(worded(e, parser))
        except KeyboardInterrupt as e:
            say(f"hf-rksp: {str(e) or 'interrupted; nothing was written'}", file=sys.stderr)
            return 130
        except BrokenPipeError:  # stdout piped into `head` & co., which stopped reading: not an error of ours
            _silence_stdout()
            return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe stopped
        except Exception as e:  # noqa: BLE001  the last guard: still one line, the traceback to the debug log
            return fail(unexpected(e))
        for message in notices.messages:  # -q hides progress bars, not these (a resume started over, random ids)
            say(f"hf-rksp: warning: {message}", file=sys.stderr)
        return rc


if __name__ == "__main__":
    sys.exit(main())
