"""Publishing an audit: ``audits/<slug>/`` and ``model_cards/<slug>/`` switch together, even across a crash.

Both folders are staged complete first (``.<slug>.stage.<pid>.*``).  Then a
journal ``audits/.publish-<slug>.json`` naming every rename is written and
synced, and the renames run: each existing target to a backup
(``.<slug>.old.*``), each staged folder to its target.  The journal is removed
once all are done, then the backups.

- An error during the renames (a full disk, a permission) rolls back at once:
  the earlier pair is put back, nothing new stays.
- A crash (SIGKILL, power loss) leaves the journal; the next hf-rksp command
  on this output folder (:func:`recover`) completes it, since the staged
  folders were complete before the journal existed.  Readers therefore see
  the old pair or the new pair, never one of each.

All of this runs under an exclusive ``flock`` on the output folder, so
concurrent audits into one folder publish one after the other.

Outputs stay inside the output folder: a symbolic link where hf-rksp would
write, rename or delete (``audits/``, ``model_cards/``, a slug folder or a
file in one, ``audits/.partial/`` and what it holds, a publish journal) is
refused with one line before anything is written (:func:`check_output_tree`);
the link and its target are left as they are.  A journal that names anything
but entries of ``audits/`` and ``model_cards/`` is refused the same way.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from hf_rksp.errors import OutputError, SecretError
from hf_rksp.utils.secrets import WHAT, active_tokens, has_secret_bytes

PARENTS = ("audits", "model_cards")
JOURNAL = ".publish-{slug}.json"


#: the longest file name and path (bytes, with its terminating NUL) Linux and macOS file systems take
NAME_MAX, PATH_MAX = 255, 4096


def short_path(path, keep: int = 120) -> str:
    """A path for a one-line message: as it is up to ``keep`` characters, else its start and end."""
    text = str(path)
    return text if len(text) <= keep else f"{text[:keep // 2]}...{text[-(keep // 2):]}"


def check_out_dir(out_dir: Path) -> None:
    """Fail before any work when results could not be written under ``out_dir``; writes nothing."""
    p = Path(out_dir)
    full = str(p.absolute()).encode()
    if len(full) >= PATH_MAX:  # refused before any work, not by the first write after the audit
        raise OutputError(f"`out_dir` {short_path(out_dir)} is {len(full)} bytes long; a path may have at most "
                          f"{PATH_MAX - 1}: File name too long")
    for part in p.parts:
        if len(part.encode()) > NAME_MAX:
            raise OutputError(f"`out_dir` {short_path(out_dir)}: the folder name {short_path(part)} is "
                              f"{len(part.encode())} bytes, more than the {NAME_MAX} a file name may have: "
                              "File name too long")
    check_output_tree(out_dir)
    if p.exists() and not p.is_dir():
        raise OutputError(f"`out_dir` {out_dir} exists and is not a directory")
    existing = next(a for a in (p, *p.absolute().parents) if a.exists())
    if not existing.is_dir():
        raise OutputError(f"`out_dir` {out_dir}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputError(f"`out_dir` {out_dir}: cannot write in {existing}: {e.strerror or e}") from None


def _entries(d: Path) -> list[Path]:
    """The entries of folder ``d`` (none when it is absent, a link or not a folder)."""
    if d.is_symlink() or not d.is_dir():
        return []
    return sorted(Path(e.path) for e in os.scandir(d))


def check_output_tree(out_dir: str | Path, slug: str | None = None) -> None:
    """Refuse (OutputError, one line) a symbolic link where hf-rksp writes, renames or deletes under
    ``out_dir``: ``audits/``, ``model_cards/``, ``audits/.partial/``, its folders and their files, the
    publish journals, and (given ``slug``) ``audits/<slug>/``, ``model_cards/<slug>/`` and their files.

    Refusing, rather than replacing the link, is the documented choice: a link there was put by someone on
    purpose, and neither it nor what it points to (outside the output folder, or not) is hf-rksp's to change.
    ``out_dir`` itself may be a link: it is the folder the user named.  Reads links, follows none.
    """
    out_dir = Path(out_dir)
    parents = [out_dir / p for p in PARENTS]
    partial = out_dir / "audits" / ".partial"
    paths = [*parents, partial, *_entries(partial)]
    paths += [f for d in _entries(partial) for f in _entries(d)]
    paths += [j for j in _entries(out_dir / "audits") if j.name.startswith(".publish-")]
    if slug is not None:
        for folder in (p / slug for p in parents):
            paths += [folder, *_entries(folder)]
    for p in paths:
        if p.is_symlink():
            raise OutputError(f"{p} is a symbolic link: hf-rksp writes only real folders and files inside "
                              f"`out_dir` and never follows, moves or deletes a link there (remove the link, "
                              f"or point `out_dir` at the folder it names)")


def check_contents(slug: str, contents: dict[str, dict[str, bytes]]) -> None:
    """No file about to be written holds a Hugging Face token (token-shaped or the active one): SecretError
    naming the file, never the value; nothing is written."""
    tokens = active_tokens()
    for parent, files in contents.items():
        for name, data in files.items():
            if has_secret_bytes(data, tokens):
                where = f"{parent}/{slug}/{name}"
                raise SecretError(f"{where} would hold {WHAT}: refused, nothing was written (a source id, "
                                  "`name` or path in the audit carries it)", path=where)


def _check_steps(out_dir: Path, journal: Path, steps) -> None:
    """A journal's renames name entries of ``audits/`` and ``model_cards/`` only (no link among them):
    anything else is not a journal hf-rksp wrote, and is refused before any rename."""
    def inside(rel) -> bool:
        parts = Path(rel).parts if isinstance(rel, str) else ()
        return (len(parts) == 2 and parts[0] in PARENTS and parts[1] not in (".", "..", ".partial")
                and not Path(rel).is_absolute())

    if not isinstance(steps, list) or not all(
            isinstance(s, dict) and all(inside(s.get(k)) for k in ("staged", "target", "backup")) for s in steps):
        raise OutputError(f"{journal} names paths outside `out_dir`'s audits/ and model_cards/: it is not a "
                          "journal hf-rksp wrote; nothing was changed (inspect and remove it)")
    for s in steps:
        for k in ("staged", "target", "backup"):
            if (out_dir / s[k]).is_symlink():
                raise OutputError(f"{out_dir / s[k]} is a symbolic link: hf-rksp never follows, moves or "
                                  "deletes a link inside `out_dir` (remove the link)")


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked(out_dir: Path):
    """An exclusive lock on ``out_dir`` (flock on the folder itself: no lock file to leave behind)."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; a killed process releases it too


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(folder / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _stage(parent: Path, slug: str, files: dict[str, bytes]) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f".{slug}.stage.{os.getpid()}.", dir=parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(d, 0o777 & ~mask)  # mkdtemp makes 0700
        _write_files(d, files)
        _fsync_dir(d)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d


def _backup_name(target: Path) -> Path:
    return target.parent / f".{target.name}.old.{os.getpid()}.{os.urandom(4).hex()}"


def _roll_forward(out_dir: Path, steps: list[dict]) -> None:
    """Finish a journal's renames: a staged folder still there replaces its target (kept as the backup)."""
    for s in steps:
        staged, target, backup = (out_dir / s[k] for k in ("staged", "target", "backup"))
        if not staged.exists():
            continue  # this pair was switched already
        if target.exists():
            if backup.exists():
                shutil.rmtree(target)
            else:
                os.rename(target, backup)
        os.rename(staged, target)


def _roll_back(out_dir: Path, steps: list[dict]) -> None:
    """Undo a journal's renames after an error: every target gets its backup back, staged folders go."""
    for s in reversed(steps):
        staged, target, backup = (out_dir / s[k] for k in ("staged", "target", "backup"))
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
        elif backup.exists() or not s["had_target"]:
            shutil.rmtree(target, ignore_errors=True)
        if backup.exists():
            os.rename(backup, target)


def _finish(out_dir: Path, journal: Path, steps: list[dict]) -> None:
    journal.unlink(missing_ok=True)
    _fsync_dir(journal.parent)
    for s in steps:
        shutil.rmtree(out_dir / s["backup"], ignore_errors=True)


def recover(out_dir: str | Path) -> None:
    """Complete what a killed publish left in ``out_dir`` (journals), and drop orphaned staging folders."""
    out_dir = Path(out_dir)
    check_output_tree(out_dir)
    if not (out_dir / "audits").is_dir():
        return
    with locked(out_dir):
        for journal in (out_dir / "audits").glob(".publish-*.json"):
            try:
                steps = json.loads(journal.read_text())["steps"]
            except (OSError, ValueError, KeyError, TypeError):
                journal.unlink(missing_ok=True)  # written before any rename: nothing to complete
                continue
            _check_steps(out_dir, journal, steps)
            _roll_forward(out_dir, steps)
            _finish(out_dir, journal, steps)
        for tmp in (out_dir / "audits").glob(".publish-*.tmp"):
            tmp.unlink(missing_ok=True)  # a journal killed while being written: no rename had started
        for parent in PARENTS:
            for d in (out_dir / parent).glob(".*.stage.*.*") if (out_dir / parent).is_dir() else ():
                if not _alive(d.name.split(".stage.", 1)[1].split(".", 1)[0]):
                    shutil.rmtree(d, ignore_errors=True)
            for d in (out_dir / parent).glob(".*.old.*.*") if (out_dir / parent).is_dir() else ():
                shutil.rmtree(d, ignore_errors=True)  # no journal names it any more: its publish completed


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def publish(out_dir: str | Path, slug: str, contents: dict[str, dict[str, bytes]],
            check: Callable[[], None] | None = None) -> dict[str, Path]:
    """Write ``contents`` ({"audits": {file: bytes}, "model_cards": {...}}) as ``<parent>/<slug>/`` folders.

    Returns the published folders.  Raises OutputError (earlier results untouched, nothing new left) when
    writing fails; see the module docstring for what a crash leaves and how the next run completes it.
    ``check`` runs under the lock just before the switch: what it raises leaves everything as it was.
    """
    out_dir = Path(out_dir)
    check_output_tree(out_dir, slug)
    check_contents(slug, contents)
    created = [d for d in (out_dir, *(out_dir / p for p in contents)) if not d.exists()]
    staged: list[Path] = []
    try:
        for parent in contents:
            (out_dir / parent).mkdir(parents=True, exist_ok=True)
        recover(out_dir)
        for parent, files in contents.items():
            staged.append(_stage(out_dir / parent, slug, files))
        with locked(out_dir):
            _checked(check, staged)
            _switch(out_dir, slug, [(s, out_dir / parent / slug) for s, parent in zip(staged, contents)])
    except OSError as e:
        for s in staged:
            shutil.rmtree(s, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()  # only when empty: a folder this failed publish created
            except OSError:
                pass
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OutputError(f"could not write the audit under {out_dir}: {why} ({e.filename or out_dir}); "
                          "earlier outputs are unchanged") from None
    return {parent: out_dir / parent / slug for parent in contents}


def _checked(check: Callable[[], None] | None, staged: list[Path]) -> None:
    """Run ``check``; when it refuses, the staged folders go and its error goes on."""
    if check is None:
        return
    try:
        check()
    except Exception:
        for s in staged:
            shutil.rmtree(s, ignore_errors=True)
        raise


def _switch(out_dir: Path, slug: str, pairs: list[tuple[Path, Path]]) -> None:
    """The journaled renames (under the lock): all pairs switch, or (on an error) none."""
    rel = lambda p: str(p.relative_to(out_dir))  # noqa: E731
    steps = [{"staged": rel(s), "target": rel(t), "backup": rel(_backup_name(t)), "had_target": t.exists()}
             for s, t in pairs]
    journal = out_dir / "audits" / JOURNAL.format(slug=slug)
    tmp = journal.with_suffix(".tmp")
    _write_files(tmp.parent, {tmp.name: json.dumps({"steps": steps}).encode()})
    os.replace(tmp, journal)
    _fsync_dir(journal.parent)
    try:
        _roll_forward(out_dir, steps)
    except BaseException:
        _roll_back(out_dir, steps)
        journal.unlink(missing_ok=True)
        raise
    _finish(out_dir, journal, steps)


def working_names(slug: str) -> list[str]:
    """Every name a publish of ``slug`` may give a file or folder, each at its longest: the slug's folders,
    its staging folders and backups (a 7-digit process id, Linux's largest, and 8 random characters) and
    its journal."""
    pid, rand = "9" * 7, "x" * 8
    journal = JOURNAL.format(slug=slug)
    return [slug, f".{slug}.stage.{pid}.{rand}", f".{slug}.old.{pid}.{rand}", journal,
            journal.removesuffix(".json") + ".tmp"]


def interrupted(out_dir: str | Path, slug: str, contents: dict[str, dict[str, bytes]], *, had_earlier: bool,
                created: list[Path]) -> str:
    """After Ctrl-C in :func:`publish` of ``contents``: tidy what it left and say what the folder now holds.

    A journal left behind (Ctrl-C after it was written) is completed, as the next command would
    (:func:`recover`); this process's staging folders, backups and half-written journal are removed, and so
    are the folders this publish created (``created``), if empty.  Then the slug's audit.json and card are
    compared byte for byte with ``contents``: the message says which audit each holds, exactly.
    """
    out_dir = Path(out_dir)
    try:
        recover(out_dir)
        mine = (f".{slug}.stage.{os.getpid()}.", f".{slug}.old.{os.getpid()}.")
        for parent in PARENTS:
            for d in (out_dir / parent).iterdir() if (out_dir / parent).is_dir() else ():
                if d.name.startswith(mine):
                    shutil.rmtree(d, ignore_errors=True)
        (out_dir / "audits" / JOURNAL.format(slug=slug)).with_suffix(".tmp").unlink(missing_ok=True)
        for d in sorted(created, key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
    except OSError as e:  # the tidying failed: the state is still read and said below
        why = f" (tidying up failed: {e.strerror or e})"
    else:
        why = ""
    files = {parent: out_dir / parent / slug / name for parent, name in (("audits", "audit.json"),
                                                                          ("model_cards", "README.md"))}
    state = {parent: ("absent" if not f.is_file() else
                      "new" if f.read_bytes() == contents[parent][f.name] else "earlier")
             for parent, f in files.items()}
    a, c = (files[p].parent for p in PARENTS)
    if state["audits"] == state["model_cards"] == "new":
        return (f"interrupted after publishing: {a} and {c} hold the new audit"
                + (", which replaced the earlier one" if had_earlier else "") + why)
    if state["audits"] == state["model_cards"] == "absent":
        return f"interrupted; nothing was written{why}"
    if state["audits"] == state["model_cards"] == "earlier":
        return f"interrupted; nothing was written: {a} and {c} still hold the earlier audit, unchanged{why}"
    words = {"new": "the new audit", "earlier": "an earlier audit", "absent": "nothing"}
    return (f"interrupted while publishing: {a} holds {words[state['audits']]}, {c} "
            f"{words[state['model_cards']]}; rerun the command{why}")
