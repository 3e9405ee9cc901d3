"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dir(parent: Path, prefix: str) -> Path:
    """A fresh staging directory with normal permissions (mkdtemp makes 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(d, 0o777 & ~_umask())
    return d


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


def publish_dirs(pairs: list[tuple[Path, Path]]) -> None:
    """Swap each staged directory into place as a whole: all targets are replaced, or none.

    Each existing target is first renamed to a backup; if any later rename
    fails, the new directories are removed and the backups renamed back.
    """
    done: list[list] = []  # [target, backup or None, new dir in place?]
    try:
        for staging, target in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
            entry = [target, None, False]
            done.append(entry)
            if target.exists():
                backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                os.rmdir(backup)
                os.rename(target, backup)
                entry[1] = backup
            os.rename(staging, target)
            entry[2] = True
    except BaseException:
        for target, backup, placed in reversed(done):
            if placed:
                shutil.rmtree(target, ignore_errors=True)
            if backup is not None:
                os.rename(backup, target)
        raise
    for _, backup, _ in done:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
