"""Typed errors.  Library code raises these in library terms; only the CLI words them as flags.

A message names a parameter in backticks, by its library name (```seq_len```, ```dtype``` = float32): a Python
user reads the argument to change, and ``hf_rksp/cli/errors.py`` (the one place errors become flags) turns each
into its command-line flag (``--seq-len``).  Errors carry their data (``param``, ``repo_id``, ``path``...).
Our own bugs are not RKSPErrors: they keep their traceback (the CLI writes it to the debug log).

    RKSPError                      anything the user can fix (the CLI prints one line, exits non-zero)
    ├── ConfigError                a method or audit parameter out of range
    │   └── SecretError            a Hugging Face token where it would be printed, written or uploaded
    ├── SourceError                the model/checkpoint/config cannot be found or read
    │   ├── HubError               the Hugging Face Hub refused or failed a download or an upload
    │   └── TokenizerError         the model has a tokenizer, but it cannot be loaded
    ├── SnapshotError              snapshots the method cannot use (too few tokens, constant stream)
    │   └── NonFiniteActivationError
    ├── InertKSSError              a KSS step whose snapshots carry no gradient (the term would change nothing)
    ├── AuditFileError             an audit.json that cannot be read, is invalid, or is of another method version
    ├── OutputError                results cannot be written
    │   └── AuditExistsError       the output folder holds another audit (``overwrite`` replaces it)
    └── MemoryPlanError            the model (or one block of it) cannot fit in the memory available
"""


class RKSPError(Exception):
    """An error the user can fix (bad input, missing model, not enough tokens...).

    ``resumable``: rerunning the same command can continue a streamed audit's saved progress (a full disk,
    an interruption); otherwise the same input fails the same way, and the progress is removed.
    """

    resumable = False


class ConfigError(RKSPError, ValueError):
    """A method or audit parameter is out of range (a negative band, eps <= 0, rank < 1...).

    ``param`` names the parameter in library terms (``band_upper``); the CLI turns it into its flag.
    """

    def __init__(self, message: str, *, param: str | None = None):
        self.param = param
        if param and f"`{param}`" not in message and not message.startswith(param + " "):
            message = f"`{param}`: {message}"  # the message names its parameter: `tokens`: must be ...
        elif param and message.startswith(param + " "):
            message = f"`{param}`{message[len(param):]}"  # eps must be > 0 -> `eps` must be > 0
        super().__init__(message)


class SecretError(ConfigError):
    """A Hugging Face token (token-shaped, or the one this machine uses) in a value or a file that would be
    printed, written or uploaded.  ``param`` names the parameter, or ``path`` the file; the value is never
    part of the message (``hf_rksp.utils.secrets``)."""

    def __init__(self, message: str, *, param: str | None = None, path: str | None = None):
        self.path = path
        super().__init__(message, param=param)


class SourceError(RKSPError):
    """The model source (hub id, directory, GGUF, config) cannot be found or read."""


class HubError(SourceError):
    """A Hub download or upload failed: ``repo_id``, and the ``filename`` or ``revision`` when known."""

    def __init__(self, message: str, *, repo_id: str, filename: str | None = None, revision: str | None = None):
        self.repo_id, self.filename, self.revision = repo_id, filename, revision
        super().__init__(message)


class TokenizerError(SourceError):
    """A model's tokenizer files are there but do not load (or load empty); ``files`` names them.

    Never a fallback to random token ids: those are for models with no tokenizer at all.
    """

    def __init__(self, message: str, *, files: list[str]):
        self.files = files
        super().__init__(message)


class SnapshotError(RKSPError):
    """The snapshots cannot be profiled (fewer than 2 tokens, no variance, shape mismatch)."""


class NonFiniteActivationError(SnapshotError):
    """NaN or inf appeared in the residual stream; ``block`` is the first block affected."""

    def __init__(self, block: int, where: str):
        self.block = block
        self.where = where
        super().__init__(
            f"non-finite values (NaN/inf) in the residual stream {where} block {block}; "
            "check the weights (or, in float16/bfloat16, retry with `dtype` float32)"
        )


class InertKSSError(RKSPError):
    """A KSS step captured no block snapshot that carries gradient, so its term could not shape anything.

    ``reason`` says why (the forward ran without grad, or nothing at or upstream of the drawn blocks trains).
    """

    def __init__(self, message: str, *, reason: str):
        self.reason = reason
        super().__init__(message)


class AuditFileError(RKSPError):
    """An audit.json is missing, not valid JSON, invalid against the schema, or of another method version."""


class OutputError(RKSPError):
    """Results cannot be written (unwritable or full output directory)."""

    resumable = True


class AuditExistsError(OutputError):
    """The audit's output folder holds another audit (other source, method or inputs); ``overwrite`` replaces it."""

    resumable = False


class AuditInterrupted(KeyboardInterrupt):
    """Ctrl-C during an audit; the message says whether progress was kept and where."""


class MemoryPlanError(RKSPError):
    """The audit cannot fit in memory as asked: ``need`` and ``available`` bytes, and what to change."""

    def __init__(self, message: str, *, need: int, available: int):
        self.need, self.available = need, available
        super().__init__(message)
