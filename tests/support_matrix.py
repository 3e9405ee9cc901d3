"""Regenerate the README support matrix from the tests marked @pytest.mark.support.

    python tests/support_matrix.py

Runs those tests (pytest -m support), collects their outcomes (conftest.py
writes the table) and replaces the block between the support-matrix markers in
README.md. Nothing in the table is written by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"



def regenerate(env: str, what: str, pytest_args: list[str], start: str, end: str) -> int:
    """Run ``pytest_args`` with ``env`` naming a file for conftest.py's table, then put that table between
    ``start`` and ``end`` in README.md (shared with trainer_matrix.py)."""
    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / "matrix.md"
        environ = {**os.environ, env: str(table), "HF_HUB_OFFLINE": "1"}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", *pytest_args], env=environ, cwd=REPO)
        if not table.is_file():
            print(f"no {what} results were recorded", file=sys.stderr)
            return rc or 1
        text = table.read_text()
    readme = REPO / "README.md"
    s = readme.read_text()
    i, j = s.index(start) + len(start), s.index(end)
    readme.write_text(s[:i] + "\n" + text + s[j:])
    print(text)
    return rc


def main() -> int:
    return regenerate("HF_RKSP_SUPPORT_MATRIX", "support", ["-m", "support", str(REPO / "tests")], START, END)


if __name__ == "__main__":
    sys.exit(main())
