"""Regenerate the README trainer matrix from the tests marked @pytest.mark.trainers.

    python tests/trainer_matrix.py

Runs those tests (pytest -m trainers), collects their outcomes (conftest.py writes the table) and replaces
the block between the trainer-matrix markers in README.md.  Nothing in the table is written by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- trainer-matrix:start -->", "<!-- trainer-matrix:end -->"


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / "matrix.md"
        env = {**os.environ, "HF_RKSP_TRAINER_MATRIX": str(table), "HF_HUB_OFFLINE": "1"}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "trainers", "-p", "no:warnings",
                              str(REPO / "tests" / "test_kss.py"), str(REPO / "tests" / "test_kss_trainers.py")],
                             env=env, cwd=REPO)
        if not table.is_file():
            print("no trainer results were recorded", file=sys.stderr)
            return rc or 1
        text = table.read_text()
    readme = REPO / "README.md"
    s = readme.read_text()
    i, j = s.index(START) + len(START), s.index(END)
    readme.write_text(s[:i] + "\n" + text + s[j:])
    print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
