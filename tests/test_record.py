"""The typed audit record: exact JSON round trips on the shipped audits, typed access, and what it refuses."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from hf_rksp.errors import AuditFileError
from hf_rksp.record.records import (
    AuditRecord,
    BlockRecord,
    RiskEntry,
    RouterStats,
    SummaryRecord,
    read_audit,
)
from hf_rksp.record.summary import summarize
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
    router = RouterStats(n_experts=4, top_k=2, load_max_over_mean=1.5, router_logit_max=3.0,
                         router_entropy_mean=1.0, router_entropy_max=1.386)
    moe = dataclasses.replace(b, stack="encoder", stack_index=0, router=router)
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


# ----------------------------------------------------------------------------- typed end to end


def _close(x, y, at="summary"):
    """x == y, numbers to 1e-12 (relative or absolute), keys in the same order."""
    if isinstance(x, dict):
        assert isinstance(y, dict) and list(x) == list(y), at
        for k in x:
            _close(x[k], y[k], f"{at}/{k}")
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y), at
        for i, (a, b) in enumerate(zip(x, y)):
            _close(a, b, f"{at}/{i}")
    elif isinstance(x, float) and not isinstance(y, bool):
        assert y == pytest.approx(x, rel=1e-12, abs=1e-12), at
    else:
        assert x == y and type(x) is type(y), at


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_summarize_on_block_records_is_the_stored_summary(path):
    """summarize(list[BlockRecord]) -> SummaryRecord rebuilds every shipped audit's summary from its blocks."""
    r = read_audit(path)
    s = summarize(r.blocks)
    assert isinstance(s, SummaryRecord) and s.verdict is None
    stored = r.summary.to_dict()
    del stored["verdict"]  # written by the report from the numbers
    stored.pop("degenerate", None)  # written by the pipeline from the method (N <= d + 1): not a block aggregate
    _close(stored, s.to_dict())
    assert s.features["near_unit_mass"].mean == s.score


def test_summarize_stacks_and_flags():
    """Encoder-decoder blocks get a summary per stack; flags and the worst block are block indices."""
    b = read_audit(SMALL).blocks
    blocks = [dataclasses.replace(x, stack="encoder" if x.index < 3 else "decoder", stack_index=x.index % 3,
                                  flags=["near_identity"] if x.index == 1 else []) for x in b[:6]]
    s = summarize(blocks)
    assert list(s.stacks) == ["decoder", "encoder"]
    plain = [dataclasses.replace(x, stack=None, stack_index=None) for x in blocks[:3]]
    assert s.stacks["encoder"] == summarize(plain) and s.stacks["encoder"].stacks is None
    assert s.flagged_blocks == {"near_identity": [1], "rank_deficient": []}
    radii = [x.spectral_radius for x in blocks]
    assert s.spectral_radius_max_block == blocks[radii.index(max(radii))].index
    assert s.to_dict()["stacks"]["decoder"]["features"]["near_unit_mass"]["n"] == 3


def test_router_stats_round_trip_in_their_order():
    """A MoE block's router entry is a RouterStats written with the keys in the order they always had."""
    d = json.loads(SMALL.read_text())["blocks"][0]
    d["router"] = {"n_experts": 4, "top_k": 2, "expert_load": [0.25, 0.5, 0.125, 0.125], "load_max_over_mean": 2.0,
                   "load_cv": 0.6, "router_logit_max": 3.5, "router_entropy_mean": 1.2, "router_entropy_max": 1.386}
    b = BlockRecord.from_dict(d)
    assert isinstance(b.router, RouterStats) and b.router.top_k == 2 and b.router.expert_load[1] == 0.5
    assert json.dumps(b.to_dict()) == json.dumps(d)


def _risk() -> dict:
    return {"probability": 0.42, "band": "medium", "lr": 6e-4, "lr_source": "default for family 'gpt2'",
            "lr_ceiling": None, "lr_ceiling_probability": 0.1, "in_range": False, "warnings": ["lr = 6e-4 is outside"],
            "model": {"sweep_data_sha256": "0" * 64, "n_runs": 10, "features": ["near_unit_mass"],
                      "divergence_definition": "loss > 10", "cv_ece": None, "cv_auroc": 0.9}}


def test_risk_entry_is_typed_and_its_json_unchanged():
    d = json.loads(SMALL.read_text())
    d["risk"] = _risk()
    d.pop("risk_unavailable_reason", None)
    text = json.dumps(d, indent=2) + "\n"
    r = AuditRecord.from_json(text)
    assert isinstance(r.risk, RiskEntry) and r.risk.lr_ceiling is None and r.risk.band == "medium"
    assert r.risk.model["cv_auroc"] == 0.9
    assert r.to_json() == text  # lr_ceiling stays null, the model's provenance stays last
    with_ceiling = dataclasses.replace(r.risk, lr_ceiling=1e-3, extra={"future": 1})
    assert list(with_ceiling.to_dict())[-2:] == ["model", "future"]
    assert RiskEntry.from_dict(with_ceiling.to_dict()) == with_ceiling


def test_risk_model_fills_a_risk_entry():
    from hf_rksp.pipeline.risk import LogisticFit, RiskModel, assess_summary

    model = RiskModel(features=("near_unit_mass", "lr"), fit=LogisticFit((0.3, -3.0), (0.1, 0.5), -1.0, (2.0, 1.0), 0.01),
                      n_runs=10, n_diverged=3, divergence_definition="loss > 10", sweep_data_sha256="0" * 64,
                      valid={"lr": [1e-4, 1e-2], "near_unit_mass": [0, 1]}, cv={"ece": 0.1, "auroc": 0.9}, rksp={})
    summary = read_audit(SMALL).summary
    entry, reason = assess_summary(summary, lr=1e-3, family="bert", init=True, model=model)
    assert reason is None and isinstance(entry, RiskEntry) and entry.lr_source == "given" and entry.in_range is True
    assert entry.model["heldout_auroc"] == 0.9  # a probability always carries the covering model's held-out AUROC
    assert entry == assess_summary(summary.to_dict(), lr=1e-3, family="bert", init=True, model=model)[0]  # a dict
    # settings the model does not cover (trained weights, an lr outside its range): no probability, and why
    for kw in ({"init": False, "lr": 1e-3}, {"init": True, "lr": 0.5}):
        none, why = assess_summary(summary, family="bert", model=model, **kw)
        assert none is None and "no informative estimate" in why and "hf-rksp preflight" in why
    # a model that does not predict (held-out AUROC < 0.8) gives no probability anywhere, and says its AUROC
    weak = dataclasses.replace(model, cv={"ece": 0.1, "auroc": 0.49})
    none, why = assess_summary(summary, lr=1e-3, family="bert", init=True, model=weak)
    assert none is None and "held-out AUROC 0.49" in why and "hf-rksp preflight" in why
    assert list(entry.to_dict()) == ["probability", "band", "lr", "lr_source", "lr_ceiling", "lr_ceiling_probability",
                                     "in_range", "warnings", "model"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_to_pandas_round_trips_every_feature(path):
    """One row per block, one column per registry feature: the same numbers as the record (None as NaN)."""
    import math

    r = read_audit(path)
    df = r.to_pandas()
    assert list(df.index) == [b.index for b in r.blocks]
    assert list(df.columns[:len(FEATURE_NAMES)]) == list(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        for got, b in zip(df[name].tolist(), r.blocks):
            want = b.value(name)
            assert (math.isnan(got) if want is None else got == want), (name, b.index)
    assert df["m"].tolist() == [b.m for b in r.blocks] and df["rank"].tolist() == [b.rank for b in r.blocks]


def test_to_pandas_without_pandas_says_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)  # what an environment without pandas gives
    with pytest.raises(ImportError, match="pip install pandas"):
        read_audit(SHIPPED[0]).to_pandas()
