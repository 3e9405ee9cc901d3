"""`hf-rksp compare` and `hf-rksp audit --from-audit`."""

from __future__ import annotations

import json

import pytest

from hf_rksp import audit
from hf_rksp.cli import main
from hf_rksp.compare import compare, load_audit

SMALL = dict(tokens=256, seq_len=128, progress=False)


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_dirs):
    out = tmp_path_factory.mktemp("cmp")
    a = audit(str(tiny_dirs["llama"]), init=True, seed=0, out_dir=str(out), **SMALL)
    b = audit(str(tiny_dirs["llama"]), out_dir=str(out / "trained"), seed=0, **SMALL)
    return out, a, b


def test_compare_function(two):
    _, a, b = two
    res = compare(a.data, b.data)
    assert len(res["blocks"]) == len(a.data["blocks"])
    for ra, ba, bb in zip(res["blocks"], a.data["blocks"], b.data["blocks"]):
        assert ra["near_unit_mass_delta"] == pytest.approx(bb["near_unit_mass"] - ba["near_unit_mass"])
        assert ra["spectral_radius_delta"] == pytest.approx(bb["spectral_radius"] - ba["spectral_radius"])
    s = res["summary"]["near_unit_mass"]
    assert s["delta"] == pytest.approx(b.near_unit_mass - a.near_unit_mass)
    assert "near-unit mass" in res["verdict"]
    same = compare(a.data, a.data)
    assert all(r["near_unit_mass_delta"] == 0 for r in same["blocks"]) and same["warnings"] == []


def test_compare_cli(two, capsys, tmp_path):
    out, a, b = two
    png = tmp_path / "cmp.png"
    rc = main(["compare", a.paths["audit"], str(out / "trained" / "audits" / b.data["slug"]), "--plot", str(png), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert res["a"]["slug"] == a.data["slug"] and res["b"]["init"] is False
    rc = main(["compare", a.data["slug"], "does-not-exist", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("hf-rksp: error:") and "does-not-exist" in err


def test_from_audit_rerenders_same_card(two, tmp_path, capsys):
    out, a, _ = two
    rc = main(["audit", "--from-audit", a.paths["audit"], "--out-dir", str(tmp_path), "-q"])
    assert rc == 0, capsys.readouterr().err
    slug = a.data["slug"]
    assert (tmp_path / "model_cards" / slug / "README.md").read_text() == open(a.paths["card"]).read()
    assert json.loads((tmp_path / "audits" / slug / "audit.json").read_text()) == a.data
    assert load_audit(slug, tmp_path) == a.data
