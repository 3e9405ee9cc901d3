"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A symbolic link at the path is replaced by the new file (``os.replace`` renames over the link), never
followed: what it pointed to is left as it was.  The folder is taken as given (an output folder's links are
refused before writing: ``hf_rksp.publish.local.check_output_tree``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_csv(header: list[str], rows: list[list], path_or_buf=None) -> str | None:
    """Rows as CSV (the csv module's quoting, ``\\n`` line ends; None is an empty cell, a float its repr, so it
    reads back exactly): the text when ``path_or_buf`` is None, else written to that path (atomically) or
    text buffer, like pandas' ``to_csv``."""
    import csv
    import io

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None else v for v in row] for row in rows])
    text = out.getvalue()
    if path_or_buf is None:
        return text
    if hasattr(path_or_buf, "write"):
        path_or_buf.write(text)
    else:
        write_text(path_or_buf, text)
    return None
