"""The ``hf-rksp`` command line: the parser, the commands and the one place errors are worded as flags."""

from hf_rksp.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
