"""The one place library errors become command-line words: parameters as flags, one line, tracebacks kept.

Library messages name parameters in backticks by their library name (```seq_len```); here each becomes the
flag that sets it (``--seq-len``), read from the option's metadata (``hf_rksp.utils.options``); a
:class:`~hf_rksp.errors.ConfigError` always names its parameter.  Anything else that escapes is our bug or the
system's: one line on stderr, the traceback in the debug log (``HF_RKSP_LOG=FILE``).
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


def fail(message: str) -> int:
    print(f"hf-rksp: error: {message.replace(chr(10), ' ')[:500]}", file=sys.stderr)
    return 2


def unexpected(e: Exception) -> str:
    """An exception no layer typed: what the user can still act on, in one line."""
    logging.getLogger("hf_rksp").debug("unexpected error", exc_info=e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return ("out of memory; use --dtype bfloat16, a smaller --tokens or --stream (a streamed audit resumes "
                "from its last block when rerun)")
    if isinstance(e, OSError):
        return f"{e.filename or 'file'}: {e.strerror or e}"
    first = (str(e).splitlines() or [""])[0][:200]
    return f"unexpected {type(e).__name__}: {first} (set HF_RKSP_LOG=FILE for the traceback, and please report it)"
