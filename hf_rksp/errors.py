"""Typed errors.  Library code raises these in library terms; only the CLI words them as flags.

    RKSPError                      anything the user can fix (the CLI prints one line, exits non-zero)
    ├── ConfigError                a method or audit parameter out of range
    ├── SourceError                the model/checkpoint/config cannot be found or read
    ├── SnapshotError              snapshots the method cannot use (too few tokens, constant stream)
    │   └── NonFiniteActivationError
    ├── AuditFileError             an audit.json that cannot be read, is invalid, or is of another method version
    └── OutputError                results cannot be written
"""


class RKSPError(Exception):
    """An error the user can fix (bad input, missing model, not enough tokens...)."""


class ConfigError(RKSPError, ValueError):
    """A method or audit parameter is out of range (a negative band, eps <= 0, rank < 1...).

    ``param`` names the parameter in library terms (``band_upper``); the CLI turns it into its flag.
    """

    def __init__(self, message: str, *, param: str | None = None):
        self.param = param
        super().__init__(message)


class SourceError(RKSPError):
    """The model source (hub id, directory, GGUF, config) cannot be found or read."""


class SnapshotError(RKSPError):
    """The snapshots cannot be profiled (fewer than 2 tokens, no variance, shape mismatch)."""


class NonFiniteActivationError(SnapshotError):
    """NaN or inf appeared in the residual stream; ``block`` is the first block affected."""

    def __init__(self, block: int, where: str):
        self.block = block
        self.where = where
        super().__init__(
            f"non-finite values (NaN/inf) in the residual stream {where} block {block}; "
            "check the weights (or, in float16/bfloat16, retry with --dtype float32)"
        )


class AuditFileError(RKSPError):
    """An audit.json is missing, not valid JSON, invalid against the schema, or of another method version."""


class OutputError(RKSPError):
    """Results cannot be written (unwritable or full output directory)."""
