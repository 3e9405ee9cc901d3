"""Regenerate the README trainer matrix from the tests marked @pytest.mark.trainers.

    python tests/trainer_matrix.py

Runs those tests (pytest -m trainers), collects their outcomes (conftest.py writes the table) and replaces
the block between the trainer-matrix markers in README.md.  Nothing in the table is written by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from support_matrix import regenerate  # the same runner and README rewrite as the support matrix

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- trainer-matrix:start -->", "<!-- trainer-matrix:end -->"


def main() -> int:
    return regenerate("HF_RKSP_TRAINER_MATRIX", "trainer", ["-m", "trainers", "-p", "no:warnings",
                                                           str(REPO / "tests" / "test_kss.py"),
                                                           str(REPO / "tests" / "test_kss_trainers.py")], START, END)


if __name__ == "__main__":
    sys.exit(main())
