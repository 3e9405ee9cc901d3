"""The one place library errors become command-line words: parameters as flags, one line, tracebacks kept.

Library messages name parameters in backticks by their library name (```seq_len```); here each becomes the
flag that sets it (``--seq-len``), read from the option's metadata (``hf_rksp.utils.options``); a
:class:`~hf_rksp.errors.ConfigError` always names its parameter.  Anything else that escapes is our bug or the
system's: one line on stderr, the traceback in the debug log (``HF_RKSP_LOG=FILE``).

Everything the command line prints or logs passes :func:`redacted` here: the active Hugging Face token and
any token-shaped string become ``hf_***`` in the error line, the warnings, stdout (:func:`say`) and every
line of the debug log (:class:`RedactingFormatter`), tracebacks included.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from hf_rksp.errors import RKSPError
from hf_rksp.pipeline.options import AuditOptions
from hf_rksp.utils.options import flag as option_flag
from hf_rksp.utils.options import option_fields, switch
from hf_rksp.utils.secrets import active_tokens, redact

_NAMED = re.compile(r"`([a-z][a-z0-9_]*)`( [A-Za-z0-9:_.-]+)?")


def option_names(parser: argparse.ArgumentParser | None) -> set[str]:
    """Every dest of ``parser`` and its subcommands (the parameters a message may name)."""
    if parser is None:
        return set()
    names = set()
    for action in parser._actions:  # argparse keeps no public list of them
        names.add(action.dest)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= option_names(sub)
    return names


def _option(name: str):
    """The (field, Option) of audit option ``name``, or None."""
    return next(((f, meta) for f, meta in option_fields(AuditOptions) if f.name == name), None)


def _switch_flag(name: str, value: str) -> str | None:
    """The switch that gives ``name`` the value ``value`` (``quantize`` 8bit -> --load-in-8bit), if any."""
    found = _option(name)
    if found is not None and found[1].switches and value in found[1].switches:
        return found[1].switches[value][0]
    return None


def flag(name: str) -> str:
    """The flag that sets parameter ``name``: from the option's own metadata (``--no-kreiss``, the 8/4-bit
    switches), else ``--`` + the name with dashes."""
    found = _option(name)
    if found is None:
        return option_flag(name)
    f, meta = found
    if meta.switches:
        return "/".join(flags for flags, _ in meta.switches.values())
    return switch(f) or option_flag(name)


def worded(e: RKSPError, parser: argparse.ArgumentParser | None = None) -> str:
    """``e`` as the command line says it: its parameters as flags (those ``parser`` knows; all, without one)."""
    known = option_names(parser)
    def word(m: re.Match) -> str:
        name, value = m.group(1), m.group(2) or ""
        if known and name not in known:
            return name + value
        return _switch_flag(name, value.strip()) or flag(name) + value

    text = _NAMED.sub(word, str(e).replace("\n", " "))
    return text


def redacted(text: str, tokens=None) -> str:
    """``text`` without the active token or any token-shaped string (``hf_rksp.utils.secrets.redact``)."""
    return redact(text, tokens)


def say(text: str, *, file=None, end: str = "\n") -> None:
    """Print ``text`` (stdout unless ``file``) as the command line prints anything: redacted."""
    print(redacted(text), file=file or sys.stdout, end=end)


class RedactingFormatter(logging.Formatter):
    """The debug log's formatter: each whole record (message, arguments, traceback) redacted once formatted.

    The active tokens are read when the log opens (``tokens``), so a record costs no file read."""

    def __init__(self, fmt: str, tokens=None):
        super().__init__(fmt)
        self.tokens = tuple(active_tokens() if tokens is None else tokens)

    def format(self, record: logging.LogRecord) -> str:
        return redacted(super().format(record), self.tokens)


def fail(message: str) -> int:
    # redacted before the cut at 500 characters: a cut token would no longer be found
    say(f"hf-rksp: error: {redacted(message).replace(chr(10), ' ')[:500]}", file=sys.stderr)
    return 2


def unexpected(e: Exception) -> str:
    """An exception no layer typed: what the user can still act on, in one line."""
    logging.getLogger("hf_rksp").debug("unexpected error", exc_info=e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return ("out of memory; use --dtype bfloat16, a smaller --tokens or --stream (a streamed audit resumes "
                "from its last block when rerun)")
    if isinstance(e, OSError):
        name = str(e.filename or "file")  # a 5000-character path: its start and end, so the line stays readable
        name = name if len(name) <= 160 else f"{name[:80]}...{name[-80:]} ({len(name)} characters)"
        return redacted(f"{name}: {e.strerror or e}")
    first = redacted((str(e).splitlines() or [""])[0])[:200]
    return f"unexpected {type(e).__name__}: {first} (set HF_RKSP_LOG=FILE for the traceback, and please report it)"
