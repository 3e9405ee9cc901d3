"""Options defined once: a dataclass field plus its :class:`Option` metadata (help, group, checks, recording).

``ProfileOptions`` (capture) and ``AuditOptions`` (pipeline) declare every option as
``name: type = option(default, help=..., group=...)``.  The command line's flags, the
reproducing command an audit records, the simple range checks, compare's method fields and
the option table of the docs are all read from these fields, so an option is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

RECORDED = ("always", "if_changed", "never")


@dataclass(frozen=True)
class Option:
    """What an option means and how it is given, checked and recorded (``field.metadata["option"]``).

    ``help`` says what the value means, in library terms; the default is added from the field's default
    (``default_help`` words it where the value alone does not).  ``parse`` turns command-line text into
    the value (int, float, or a function raising ValueError); ``choices`` are the values allowed;
    ``switches`` gives an option as one switch per value (``{"8bit": ("--load-in-8bit", help)}``).
    A bool is a switch that sets the value other than its default: ``--name`` or ``--no-name``.
    ``recorded``: whether the reproducing command holds it always, when it differs from the default,
    or never (it does not change the numbers).  ``bounds`` (integers, inclusive) and ``positive``
    (finite floats > 0; None allowed where the default is None) are checked before any work.
    ``compared``: two audits that differ here have incomparable numbers.
    """

    help: str
    group: str
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple | None = None
    switches: dict | None = None
    default_help: str | None = None
    recorded: str = "if_changed"
    bounds: tuple[int, int] | None = None
    positive: bool = False
    compared: bool = False

    def __post_init__(self):
        if self.recorded not in RECORDED:
            raise ValueError(f"recorded must be one of {RECORDED}, got {self.recorded!r}")


def option(default: Any = MISSING, *, help: str, group: str, **meta) -> Any:
    """A dataclass field carrying its :class:`Option` (see there for the keywords)."""
    return field(default=default, metadata={"option": Option(help=help, group=group, **meta)})


def option_of(f: Field) -> Option | None:
    """The :class:`Option` of a dataclass field, or None for a field that is not an option."""
    return f.metadata.get("option")


def option_fields(cls_or_obj) -> list[tuple[Field, Option]]:
    """Every option field of an options dataclass (or instance), in declaration order."""
    return [(f, option_of(f)) for f in fields(cls_or_obj) if option_of(f) is not None]


def flag(name: str) -> str:
    """The command-line flag of an option: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


def switch(f: Field) -> str | None:
    """The flag of a bool option: the one that sets the value other than its default."""
    if not isinstance(f.default, bool):
        return None
    return flag(f.name) if f.default is False else "--no-" + flag(f.name)[2:]


def format_value(value) -> str:
    """A value as the command line and the help write it (floats in their shortest form: 1e-05, 0.9)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_text(f: Field) -> str:
    """The help of an option with its default appended (none for switches, which say their effect)."""
    meta = option_of(f)
    if meta.default_help is not None:
        return f"{meta.help} (default: {meta.default_help})"
    if switch(f) is not None or meta.switches or f.default is None:
        return meta.help
    return f"{meta.help} (default: {format_value(f.default)})"


def parse_rank(text: str) -> str | int:
    """``--rank``: "full", "auto" or an integer R (ValueError otherwise)."""
    if text in ("full", "auto"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected full, auto or an integer, got {text!r}") from None
