"""The one rule for an audit's folder name (its slug), and the guard that keeps one audit from replacing another.

An audit is written to ``audits/<slug>/`` and ``model_cards/<slug>/``.  The slug is

    <source>[__init][__prompts][__hidden-states][__<choices>]

- ``<source>``: the hub id the user named (``--name``, or the hub id audited) with ``/`` -> ``__``, plus
  ``__rev-<revision>`` when a revision was asked for (and ``__<file>`` for one GGUF file of a hub repo);
  a local directory, .gguf or config file: its last two path parts joined by ``__``, then ``-`` and 6 hex
  digits of the SHA-256 of its resolved absolute path, so ``runs/a/checkpoint-500`` and
  ``runs/b/checkpoint-500`` never share a folder while ``./x`` and ``/abs/x`` do.
- ``__init``, ``__prompts``, ``__hidden-states``: readable suffixes for random init, the prompts protocol
  and hidden-state snapshots.
- ``__<choices>``: 8 hex digits of the SHA-256 of every other option the reproducing command records
  (:data:`hf_rksp.pipeline.options.COMMAND_OPTIONS`) that differs from its default -- ``tokens``, ``rank``,
  ``sketch``, ``seed``, ``text`` (by the file's content), ``lr``... -- so an audit with other inputs or
  another method never lands in the folder of the default one.  Absent when every such option is at its
  default.  Options that name the source (``name``, ``revision``, ``gguf_file``) are in ``<source>``.
  ``stream`` is in the hash too: a streamed audit records another method (``method.streamed``), and an
  audit streamed because the model would not fit records ``--stream`` in its command as well.

Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``-``, and each part is cut to 60
characters, so a slug is always a valid folder name.

The rule only gives a folder; :func:`differences` decides whether an existing audit there may be replaced:
the same source (kind, id, init, revision, files), the same method record and the same calibration tokens
(``inputs.sha256``) may be refreshed in place; anything else is refused unless ``overwrite`` is given.
A slug is never taken from a file's content unchecked: :func:`check_slug` holds a re-rendered audit's slug
against its own source and method.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from hf_rksp.errors import AuditExistsError, AuditFileError
from hf_rksp.pipeline.options import AuditOptions, audit_option_fields
from hf_rksp.record.records import AuditRecord

#: options the <choices> hash leaves out: they are named by <source> or by a readable suffix
NOT_IN_CHOICES = ("name", "revision", "gguf_file", "prompts", "snapshots")
PART_MAX = 60
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str) -> str:
    out = _UNSAFE.sub("-", text).strip("-") or "x"
    out = out[:PART_MAX]
    return "x" + out if out.startswith(".") else out  # never a hidden folder, ".", ".."


def _hub_part(repo_id: str) -> str:
    return "__".join(_safe(p) for p in repo_id.split("/") if p)


def local_part(path: str | Path) -> str:
    """``<parent>__<name>-<6 hex of the resolved path>`` for a local directory or file."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    resolved = p.resolve()
    name = p.name
    if p.suffix.lower() in (".gguf", ".json"):
        name = p.stem
    parts = [x for x in (p.parent.name, name) if x]
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:6]
    return "__".join(_safe(x) for x in parts) + "-" + digest


def is_local_path(given: str) -> bool:
    """Whether a source as the user gave it names a local path (resolve_source's own test), not a hub id."""
    return given.startswith((".", "/", "~")) or Path(given).expanduser().exists()


def source_part(src) -> str:
    """The ``<source>`` part of the slug of a :class:`hf_rksp.models.loading.Source`."""
    if src.kind == "module":  # a model in memory: what it is called, and that it was in memory
        base = _hub_part(src.name or src.id) + "__in-memory"
    elif src.name:
        base = _hub_part(src.name)
    elif src.kind == "hub":
        base = _hub_part(src.id)
    elif src.kind == "gguf" and not is_local_path(src.id):  # one GGUF file of a hub repo, fetched
        base = _hub_part(src.id.removesuffix(".gguf")) if src.id.endswith(".gguf") else \
            _hub_part(src.id) + "__" + _safe(Path(src.gguf_file).stem)
    elif src.kind == "gguf":
        base = local_part(Path(src.path) / src.gguf_file)
    else:
        base = local_part(src.path or src.id)
    if src.revision:
        base += "__rev-" + _safe(src.revision)
    return base


def _file_value(value: str) -> str:
    """A file-valued option by its content (an edited file is other inputs), or as given when not a file."""
    p = Path(value).expanduser()
    if not p.is_file():
        return value
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def choices(opts: AuditOptions) -> dict[str, str]:
    """The recorded options that differ from their defaults and are not in another part of the slug."""
    out = {}
    for f, meta in audit_option_fields():
        if meta.recorded == "never" or f.name in NOT_IN_CHOICES:
            continue
        value = getattr(opts, f.name)
        if value == f.default:
            continue
        out[f.name] = _file_value(value) if f.name in ("text", "dataset") else str(value)
    if opts.prompts not in (None, "shipped"):
        out["prompts"] = _file_value(opts.prompts)
    return out


def choices_part(opts: AuditOptions) -> str:
    """8 hex digits naming :func:`choices`, or "" when every option is at its default."""
    c = choices(opts)
    if not c:
        return ""
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:8]


def audit_slug(src, opts: AuditOptions) -> str:
    """The folder name of the audit of ``src`` with ``opts`` (the rule in this module's docstring)."""
    slug = source_part(src) + ("__init" if src.init else "")
    slug += "__prompts" if opts.prompts is not None else ""
    slug += "__hidden-states" if opts.snapshots == "hidden-states" else ""
    h = choices_part(opts)
    return slug + (f"__{h}" if h else "")


def check_slug(record: AuditRecord) -> None:
    """Refuse a re-rendered audit whose slug does not follow from its own source and method.

    A hub id (or ``--name``) must give the slug's ``<source>`` part exactly; a local source's part (which
    hashes a path the record does not keep) must be its name and 6 hex digits; the readable suffixes must
    match the record's init, inputs and snapshots; what may follow is only the 8-hex ``<choices>``.
    """
    src, slug = record.source, record.slug
    heads = [re.escape(_hub_part(src.id) + ("__in-memory" if src.kind == "module" else ""))]
    if src.kind not in ("hub", "module") and src.path is None:  # a local path (no --name), or one GGUF file of a hub repo
        stem = Path(src.id).stem if src.id.lower().endswith((".gguf", ".json")) else Path(src.id).name
        heads += [re.escape(_hub_part(src.id.removesuffix(".gguf"))) + r"(?:__[A-Za-z0-9._-]+)?",
                  r"(?:[A-Za-z0-9._-]+__)?" + re.escape(_safe(stem)) + r"-[0-9a-f]{6}"]
    suffix = ("__init" if src.init else "") + ("__prompts" if record.inputs.origin == "prompts" else "") \
        + ("__hidden-states" if (record.method.snapshots or "").startswith("output_hidden_states") else "")
    rev = re.escape("__rev-" + _safe(src.revision)) if src.revision else ""
    pattern = f"(?:{'|'.join(heads)})(?:{rev})?{re.escape(suffix)}(?:__[0-9a-f]{{8}})?"
    if re.fullmatch(pattern, slug) is None:
        raise AuditFileError(f"audit slug {slug!r} does not follow from its source {src.id!r} and method "
                             "(docs/guides/auditing.md, 'Where an audit is written'); nothing was written")


#: what must be equal for an audit to replace another in place (the source's identity; method; inputs)
SOURCE_KEYS = ("id", "kind", "init", "revision", "config_origin", "gguf_file", "family", "n_blocks", "d_model")


def differences(old: AuditRecord, new: AuditRecord) -> list[str]:
    """What makes ``new`` another audit than ``old`` (empty: the same audit, which may be refreshed)."""
    out = [f"source {k}" for k in SOURCE_KEYS if getattr(old.source, k) != getattr(new.source, k)]
    old_m, new_m = old.method.to_dict(), new.method.to_dict()
    out += [f"method {k}" for k in sorted(set(old_m) | set(new_m)) if old_m.get(k) != new_m.get(k)]
    if (old.inputs.origin, old.inputs.sha256) != (new.inputs.origin, new.inputs.sha256):
        out.append("calibration inputs")
    if old.risk is not None and new.risk is not None and old.risk.lr != new.risk.lr:
        out.append("risk lr")
    return out


def existing(folder: Path) -> AuditRecord | None | str:
    """The audit in ``folder`` (None: no audit there; a string: why what is there cannot be read)."""
    if not (folder / "audit.json").exists():
        return None
    from hf_rksp.record.records import read_audit

    try:
        return read_audit(folder)
    except AuditFileError as e:
        return str(e)


def guard(out_dir: str | Path, record: AuditRecord, overwrite: bool, same_numbers: bool = False) -> bool:
    """Refuse to replace another audit in ``audits/<slug>/``; True when the same audit is refreshed there.

    ``same_numbers`` (a re-render): the blocks' numbers must be those in the folder too, since a record
    read from a file says nothing of the weights it was made from.
    """
    folder = Path(out_dir) / "audits" / record.slug
    old = existing(folder)
    if old is None:
        return False
    diff = [f"it cannot be read ({old[:120]})"] if isinstance(old, str) else differences(old, record)
    if same_numbers and not isinstance(old, str) and [b.to_dict() for b in old.blocks] != \
            [b.to_dict() for b in record.blocks]:
        diff.append("block numbers")
    if diff and not overwrite:
        raise AuditExistsError(f"{folder} holds another audit (different {', '.join(diff[:4])}); pass `overwrite` "
                               "to replace it, or `out_dir` elsewhere")
    return not diff


def guard_early(out_dir: str | Path, slug: str, command: str, overwrite: bool) -> None:
    """Before any work: refuse when ``audits/<slug>/`` holds an audit made by another command."""
    if overwrite:
        return
    folder = Path(out_dir) / "audits" / slug
    old = existing(folder)
    if old is None:
        return
    if isinstance(old, str):
        raise AuditExistsError(f"{folder} holds a file that is not a readable audit; pass `overwrite` to replace "
                               "it, or `out_dir` elsewhere")
    if old.command != command:
        raise AuditExistsError(f"{folder} holds another audit ({old.command}); pass `overwrite` to replace it, "
                               "or `out_dir` elsewhere")


def portable_path(path: str) -> str:
    """A local path as an audit records it: relative to the working directory when inside it, else its last
    part -- never an absolute path, which would name the user's machine in a published card."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    try:
        rel = p.relative_to(Path.cwd())
    except ValueError:
        return p.name or str(p)
    return str(rel) if str(rel) != "." else p.name
