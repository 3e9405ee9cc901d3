"""`hf-rksp compare` and `hf-rksp audit --from-audit`."""

from __future__ import annotations

import json

import pytest

from hf_rksp import audit
from hf_rksp.cli.commands import main
from hf_rksp.report.compare import compare, load_audit

SMALL = dict(tokens=256, seq_len=128, progress=False)


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_dirs):
    out = tmp_path_factory.mktemp("cmp")
    a = audit(str(tiny_dirs["llama"]), init=True, seed=0, out_dir=str(out), **SMALL)
    b = audit(str(tiny_dirs["llama"]), out_dir=str(out / "trained"), seed=0, **SMALL)
    return out, a, b


def test_compare_function(two):
    _, a, b = two
    res = compare(a.record, b.record)
    assert len(res["blocks"]) == len(a.record.blocks)
    for ra, ba, bb in zip(res["blocks"], a.record.blocks, b.record.blocks):
        assert ra["near_unit_mass_delta"] == pytest.approx(bb.near_unit_mass - ba.near_unit_mass)
        assert ra["spectral_radius_delta"] == pytest.approx(bb.spectral_radius - ba.spectral_radius)
    s = res["summary"]["near_unit_mass_mean"]
    assert s["delta"] == pytest.approx(b.near_unit_mass - a.near_unit_mass)
    from hf_rksp.spectral import FEATURE_NAMES

    assert {f"{n}_mean" for n in FEATURE_NAMES} | {"spectral_radius_max"} == set(res["summary"])
    assert "near-unit mass" in res["verdict"]
    same = compare(a.record, a.record)
    assert all(r["near_unit_mass_delta"] == 0 for r in same["blocks"]) and same["warnings"] == []



def test_method_fields_are_the_compared_options():
    """compare warns on exactly the options marked ``compared``, each a field of the method record."""
    from dataclasses import fields

    from hf_rksp.pipeline.options import COMPARED
    from hf_rksp.record.records import MethodRecord
    from hf_rksp.report.compare import METHOD_FIELDS

    assert METHOD_FIELDS == COMPARED == ("rank", "eps", "band_upper", "band_lower", "contractive", "resdmd_tau",
                                         "tokens")
    assert set(METHOD_FIELDS) <= {f.name for f in fields(MethodRecord)}

def test_compare_cli(two, capsys, tmp_path):
    out, a, b = two
    png = tmp_path / "cmp.png"
    rc = main(["compare", a.paths["audit"], str(out / "trained" / "audits" / b.record.slug), "--plot", str(png),
               "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert res["a"]["slug"] == a.record.slug and res["b"]["init"] is False
    rc = main(["compare", a.record.slug, "does-not-exist", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("hf-rksp: error:") and "does-not-exist" in err


def test_from_audit_rerenders_same_card(two, tmp_path, capsys):
    out, a, _ = two
    rc = main(["audit", "--from-audit", a.paths["audit"], "--out-dir", str(tmp_path), "-q"])
    assert rc == 0, capsys.readouterr().err
    slug = a.record.slug
    assert (tmp_path / "model_cards" / slug / "README.md").read_text() == open(a.paths["card"]).read()
    assert (tmp_path / "audits" / slug / "audit.json").read_text() == open(a.paths["audit"]).read()
    assert load_audit(slug, tmp_path) == a.record


def test_compare_refuses_other_method_versions(two, tmp_path, capsys):
    """A v1 audit is not read (one clear line), and compare() refuses mixed versions."""
    from dataclasses import replace

    from hf_rksp.errors import AuditFileError

    _, a, _ = two
    old = json.loads(open(a.paths["audit"]).read())
    old["method"]["version"] = "1"
    p = tmp_path / "old.json"
    p.write_text(json.dumps(old))
    rc = main(["compare", str(p), a.paths["audit"]])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "v1 audit" in err
    with pytest.raises(AuditFileError, match="cannot compare an RKSP v1 audit with an RKSP v2"):
        compare(replace(a.record, method=replace(a.record.method, version="1")), a.record)


def test_reader_rejects_nan_and_non_utf8(two, tmp_path):
    from hf_rksp.errors import AuditFileError
    from hf_rksp.record.records import read_audit

    _, a, _ = two
    text = open(a.paths["audit"]).read()
    bad = tmp_path / "nan.json"
    bad.write_text(text.replace('"spectral_radius": ', '"spectral_radius": NaN, "x": ', 1))
    with pytest.raises(AuditFileError, match="NaN"):
        read_audit(bad)
    raw = tmp_path / "latin.json"
    raw.write_bytes(b'{"slug": "\xff"}')
    with pytest.raises(AuditFileError, match="UTF-8"):
        read_audit(raw)
