"""The typed audit record: exact JSON round trips on the shipped audits, typed access, and what it refuses."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from hf_rksp.errors import AuditFileError
from hf_rksp.record.records import AuditRecord, BlockRecord, read_audit
from hf_rksp.spectral import FEATURE_NAMES

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "audits").glob("*/audit.json"))
SMALL = REPO / "audits" / "sentence-transformers__all-MiniLM-L6-v2" / "audit.json"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_audit_round_trips_byte_for_byte(path):
    text = path.read_text(encoding="utf-8")
    record = read_audit(path)
    assert record.to_json() == text  # the format did not change: schema 2.0, same keys in the same order
    assert record.to_json() == json.dumps(json.loads(text), indent=2, allow_nan=False) + "\n"  # the old dict writer
    assert record.to_dict() == json.loads(text)
    assert AuditRecord.from_json(record.to_json()) == record


def test_typed_access_matches_the_json():
    d = json.loads(SMALL.read_text())
    r = read_audit(SMALL.parent)  # a directory holding audit.json reads too
    assert (r.slug, r.command, r.schema_version) == (d["slug"], d["command"], "2.0")
    assert r.method.rank == d["method"]["rank"] and r.method.band_upper == d["method"]["band_upper"]
    assert r.source.id == d["source"]["id"] and r.source.n_blocks == len(r.blocks) == len(d["blocks"])
    assert r.inputs.sha256 == d["inputs"]["sha256"] and r.inputs.detail["file"] == d["inputs"]["file"]
    assert r.environment.torch == d["environment"]["torch"] and r.timings == d["timings"]
    assert r.risk is None and r.risk_unavailable_reason == d["risk_unavailable_reason"]
    assert r.summary.score == d["summary"]["score"] and r.summary.verdict == d["summary"]["verdict"]
    for b, bd in zip(r.blocks, d["blocks"]):
        assert b.index == bd["index"] and b.m == bd["m"] and b.eigenvalues == bd["eigenvalues"]
        for name in FEATURE_NAMES:  # every registry feature, by name and as an attribute
            assert b.value(name) == getattr(b, name) == bd[name]
    for name in FEATURE_NAMES:
        assert dataclasses.asdict(r.summary.feature(name)) == {**d["summary"]["features"][name], "extra": {}}
    with pytest.raises(AttributeError):
        r.blocks[0].no_such_feature


def test_record_is_frozen_and_copies():
    r = read_audit(SMALL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.slug = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.blocks[0].index = 3
    assert copy.deepcopy(r) == r
    other = dataclasses.replace(r, summary=dataclasses.replace(r.summary, verdict="changed"))
    assert other != r and r.summary.verdict != "changed"


def test_unknown_keys_survive_a_round_trip():
    d = json.loads(SMALL.read_text())
    d["note"] = "kept"
    d["method"]["future_parameter"] = 1.5
    d["blocks"][0]["future_feature"] = 0.25
    d["summary"]["features"]["near_unit_mass"]["median"] = 0.1
    r = AuditRecord.from_dict(d)
    assert r.extra == {"note": "kept"} and r.method.extra == {"future_parameter": 1.5}
    assert r.blocks[0].extra == {"future_feature": 0.25}
    assert r.to_dict() == d
    assert AuditRecord.from_json(r.to_json()) == r


def test_optional_block_fields_are_written_only_when_set():
    b = read_audit(SMALL).blocks[0]
    assert set(b.to_dict()) == {"index", *FEATURE_NAMES, "m", "rank", "flags", "eigenvalues"}
    moe = dataclasses.replace(b, stack="encoder", stack_index=0, router={"n_experts": 4})
    assert list(moe.to_dict())[-3:] == ["stack", "stack_index", "router"]
    assert BlockRecord.from_dict(moe.to_dict()) == moe


def test_reader_refuses_other_versions_schema_violations_and_nan(tmp_path):
    d = json.loads(SMALL.read_text())
    old = copy.deepcopy(d)
    old["method"]["version"] = "1"
    with pytest.raises(AuditFileError, match="is an RKSP v1 audit; this hf-rksp reads v2 only"):
        AuditRecord.from_dict(old)
    p = tmp_path / "audit.json"
    p.write_text(json.dumps(old))
    with pytest.raises(AuditFileError, match=f"{p} is an RKSP v1 audit"):
        read_audit(p)
    bad = copy.deepcopy(d)
    bad["blocks"][0]["near_unit_mass"] = 1.5
    with pytest.raises(AuditFileError, match="schema 2.0 at blocks/0/near_unit_mass"):
        AuditRecord.from_dict(bad)
    with pytest.raises(AuditFileError, match="NaN"):
        AuditRecord.from_json(SMALL.read_text().replace('"spectral_radius": ', '"spectral_radius": NaN, "x": ', 1))
    with pytest.raises(AuditFileError, match="not an audit"):
        AuditRecord.from_json("[1, 2]")
    with pytest.raises(AuditFileError, match="not a valid JSON audit"):
        AuditRecord.from_json('{"slug": ')
    with pytest.raises(AuditFileError, match="not found"):
        read_audit(tmp_path / "missing.json")


def test_writer_refuses_nan():
    r = read_audit(SMALL)
    b = r.blocks[0]
    nan = dataclasses.replace(b, values={**b.values, "spectral_radius": float("nan")})
    with pytest.raises(AuditFileError, match="JSON does not allow"):
        dataclasses.replace(r, blocks=[nan, *r.blocks[1:]]).to_json()
