"""The audits this repo ships validate against the schema, and the small ones regenerate."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from hf_rksp.record.records import read_audit

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "audits").glob("*/audit.json"))


def test_every_shipped_audit_validates_and_has_its_card():
    assert len(SHIPPED) >= 4
    for p in SHIPPED:
        record = read_audit(p)  # schema 2.0, method v2
        assert record.slug == p.parent.name
        card = REPO / "model_cards" / record.slug / "README.md"
        assert card.is_file(), card
        assert record.command in card.read_text()


def _make_audits():
    spec = importlib.util.spec_from_file_location("make_audits", REPO / "audits" / "make_audits.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_audits"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("slug", ["gpt2__init", "sentence-transformers__all-MiniLM-L6-v2"])
def test_small_audits_regenerate(slug, tmp_path):
    """Same command, same numbers: tolerances cover BLAS differences across machines (float64
    algebra on float32 activations: ~1e-6 relative), and a near-unit count may flip by one
    eigenvalue whose modulus sits within 1e-6 of a band edge."""
    from hf_rksp.cli.commands import main

    args = _make_audits().shipped()[slug]()
    assert main(["audit", *args, "--out-dir", str(tmp_path), "-q"]) == 0
    new = json.loads((tmp_path / "audits" / slug / "audit.json").read_text())
    old = json.loads((REPO / "audits" / slug / "audit.json").read_text())
    assert new["inputs"]["sha256"] == old["inputs"]["sha256"]
    assert new["method"] == old["method"]
    assert len(new["blocks"]) == len(old["blocks"])
    for bn, bo in zip(new["blocks"], old["blocks"]):
        assert bn["m"] == bo["m"] and bn["rank"] == bo["rank"]
        assert bn["near_unit_mass"] == pytest.approx(bo["near_unit_mass"], abs=1.0 / bo["m"] + 1e-12)
        for k in ("spectral_radius", "nonlinearity_ratio"):
            assert bn[k] == pytest.approx(bo[k], rel=1e-5, abs=1e-8)
        en = np.array(bn["eigenvalues"]) @ [1, 1j]
        eo = np.array(bo["eigenvalues"]) @ [1, 1j]
        rows, cols = linear_sum_assignment(np.abs(en[:, None] - eo[None, :]))
        assert np.abs(en[rows] - eo[cols]).max() < 1e-5 * max(1.0, np.abs(eo).max())
