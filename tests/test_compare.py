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
    assert len(res.blocks) == len(a.record.blocks)
    for ra, ba, bb in zip(res.blocks, a.record.blocks, b.record.blocks):
        assert ra.delta("near_unit_mass") == pytest.approx(bb.near_unit_mass - ba.near_unit_mass)
        assert ra.delta("spectral_radius") == pytest.approx(bb.spectral_radius - ba.spectral_radius)
    s = res.summary["near_unit_mass_mean"]
    assert s.delta == pytest.approx(b.near_unit_mass - a.near_unit_mass)
    from hf_rksp.spectral import FEATURE_NAMES

    assert {f"{n}_mean" for n in FEATURE_NAMES} | {"spectral_radius_max"} == set(res.summary)
    assert "near-unit mass" in res.verdict
    same = compare(a.record, a.record)
    assert all(r.delta("near_unit_mass") == 0 for r in same.blocks) and same.warnings == []


def _old_compare_dict(a, b) -> dict:
    """compare()'s result as the dict it was before it was typed: the JSON `hf-rksp compare --json` prints."""
    from hf_rksp.report.compare import SUMMARY_ROWS, _delta
    from hf_rksp.spectral import FEATURES

    blocks = [{"index": ba.index, **{f"{f.name}_delta": _delta(ba.value(f.name), bb.value(f.name)) for f in FEATURES}}
              for ba, bb in zip(a.blocks, b.blocks)] if len(a.blocks) == len(b.blocks) else []
    summary = {}
    for name, agg in SUMMARY_ROWS:
        xa, xb = getattr(a.summary.features[name], agg), getattr(b.summary.features[name], agg)
        summary[f"{name}_{agg}"] = {"a": xa, "b": xb, "delta": _delta(xa, xb),  # + the blocks each counts
                                    "n_a": a.summary.features[name].n, "n_b": b.summary.features[name].n}
    return {"a": {"slug": a.slug, "id": a.source.id, "init": a.source.init},
            "b": {"slug": b.slug, "id": b.source.id, "init": b.source.init},
            "summary": summary, "blocks": blocks}


def test_comparison_to_dict_is_the_json_it_always_was(two):
    """The typed Comparison writes the same keys, in the same order, as the dict compare() used to return."""
    _, a, b = two
    for x, y in ((a.record, b.record), (b.record, a.record), (a.record, a.record)):
        got = compare(x, y).to_dict()
        assert list(got) == ["a", "b", "summary", "blocks", "warnings", "verdict"]
        want = _old_compare_dict(x, y)
        assert json.dumps({k: got[k] for k in want}) == json.dumps(want)
    # different depths: no per-block rows, a warning, and the verdict without the largest change
    from dataclasses import replace

    short = replace(b.record, blocks=b.record.blocks[:1])
    got = compare(a.record, short).to_dict()
    assert got["blocks"] == [] and any("block counts differ" in w for w in got["warnings"])
    assert "Largest per-block change" not in got["verdict"]



def test_method_fields_are_the_compared_options():
    """compare warns on exactly the options marked ``compared``, each a field of the method record."""
    from dataclasses import fields

    from hf_rksp.pipeline.options import COMPARED
    from hf_rksp.record.records import MethodRecord
    from hf_rksp.report.compare import METHOD_FIELDS

    assert METHOD_FIELDS == COMPARED == ("rank", "eps", "band_upper", "band_lower", "contractive", "resdmd_tau",
                                         "sketch", "snapshots", "tokens")
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


def test_compare_table_keeps_columns_apart_and_lists_n(two, capsys):
    """Every row has as many whitespace-separated cells as the header says (no numbers run together), the
    per-block header names each feature in full, and each mean comes with the blocks it counts."""
    _, a, b = two
    assert main(["compare", a.paths["audit"], b.paths["audit"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split() == ["A", "n", "A", "B", "n", "B", "B", "-", "A"])
    for ln in lines[head + 1:head + 17]:
        name, va, na, vb, nb, d = ln.split()
        assert int(na) <= len(a.record.blocks) and int(nb) <= len(b.record.blocks)
        assert va == "-" or float(va) == pytest.approx(a.record.summary.features[name.rsplit("_", 1)[0]].mean,
                                                        abs=1e-4, rel=1e-3) or name == "spectral_radius_max"
    assert "block  near_unit_mass  expansive_mass  spectral_radius  nonlinearity_ratio" in lines


def test_compare_help_describes_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "Compare two RKSP audits" in capsys.readouterr().out
