"""Library-level audit behaviour: families, snapshots, JSON contents, reproducibility."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny, tiny_config

from hf_rksp import audit
from hf_rksp.capture.hooks import capture_snapshots
from hf_rksp.errors import RKSPError
from hf_rksp.models.blocks import find_blocks
from hf_rksp.models.loading import resolve_source

SMALL = dict(tokens=256, seq_len=128, progress=False)


@pytest.mark.support("init audit")
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "bert"])
def test_every_supported_family_audits(family, tmp_path):
    path = save_tiny(family, tmp_path / family)
    res = audit(str(path), init=True, out_dir=None, **SMALL)
    d = res.data
    assert d["source"]["family"] == family
    assert len(d["blocks"]) == d["source"]["n_blocks"] == tiny_config(family).num_hidden_layers
    assert d["inputs"]["origin"] == "random-token-ids"  # no tokenizer in a config-only dir
    assert res.paths == {}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hooks_capture_block_io_not_hidden_states(family):
    """Block inputs equal hidden_states[i]; the last block's output is taken before any final norm."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(family)).eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    _, blocks = find_blocks(model)
    snaps = capture_snapshots(model, blocks, ids, batch_size=2, progress=False)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = len(blocks)
    for i in range(n):
        torch.testing.assert_close(snaps.inputs[i], hs[i].reshape(-1, hs[i].shape[-1]))
    for i in range(n - 1):
        torch.testing.assert_close(snaps.outputs[i], snaps.inputs[i + 1])
    last = hs[n].reshape(-1, hs[n].shape[-1])
    if family in ("gpt2", "llama"):  # final LayerNorm/RMSNorm applied to hidden_states[-1]
        assert not torch.allclose(snaps.outputs[-1], last, atol=1e-3)
    else:  # BERT (post-LN) has no final norm: the two agree
        torch.testing.assert_close(snaps.outputs[-1], last)


def test_json_contents_and_reproducibility(tiny_dirs, tmp_path):
    a = audit(str(tiny_dirs["llama"]), init=True, out_dir=str(tmp_path / "a"), seed=3, **SMALL)
    b = audit(str(tiny_dirs["llama"]), init=True, out_dir=str(tmp_path / "b"), seed=3, **SMALL)
    c = audit(str(tiny_dirs["llama"]), init=True, out_dir=None, seed=4, **SMALL)
    da = json.loads(open(a.paths["audit"]).read())
    assert open(a.paths["audit"]).read() == a.record.to_json() and da == a.data  # the record is what was written
    assert a.record.summary.score == a.near_unit_mass == da["summary"]["score"]
    assert da["schema_version"] == "2.0"
    for key in ("name", "version", "rank", "eps", "band_upper", "band_lower", "contractive", "resdmd_tau", "tokens",
                "seq_len", "seed", "dtype"):
        assert key in da["method"]
    m = da["method"]
    assert m["name"] == "RKSP" and m["version"] == "2"
    # the paper's defaults (docs/method.md), recorded; d = 64 <= 1024: --rank auto is full DMD
    assert (m["eps"], m["band_upper"], m["band_lower"], m["contractive"], m["resdmd_tau"]) == (1e-5, 1.05, 0.9, 0.8, 0.1)
    assert m["rank"] == "full" and m["rank_option"] == "auto"
    from hf_rksp.spectral import FEATURE_NAMES

    for blk in da["blocks"]:
        assert set(FEATURE_NAMES) <= set(blk) and blk["m"] == blk["rank"] == len(blk["eigenvalues"]) == 64
        masses = [blk[k] for k in ("near_unit_mass", "expansive_mass", "mid_mass", "contractive_mass")]
        assert sum(masses) == pytest.approx(1.0)
    summ = da["summary"]
    assert summ["score"] == pytest.approx(sum(blk["near_unit_mass"] for blk in da["blocks"]) / 3)
    for name in FEATURE_NAMES:
        agg = summ["features"][name]
        assert set(agg) == {"mean", "max", "min", "std", "early", "middle", "late", "n"}
    nu = [blk["near_unit_mass"] for blk in da["blocks"]]  # 3 blocks: one per third of depth
    assert (summ["features"]["near_unit_mass"]["early"], summ["features"]["near_unit_mass"]["late"]) == (nu[0], nu[2])
    for key in ("id", "revision", "family", "n_blocks", "d_model", "n_params"):
        assert key in da["source"]
    assert da["source"]["n_params"] == sum(
        p.numel() for p in __import__("transformers").AutoModel.from_config(tiny_config("llama")).parameters()
    )
    for key in ("hf_rksp", "torch", "transformers", "python"):
        assert key in da["environment"]
    assert len(da["inputs"]["sha256"]) == 64
    # risk from the shipped model (hf_rksp/data/risk_model.json), with its provenance; a tiny llama at init is
    # outside the sweep's ranges and says so
    from hf_rksp.pipeline.risk import load_risk_model
    shipped = load_risk_model()
    if shipped is None:
        assert da["risk"] is None and da["risk_unavailable_reason"]
        assert "No calibrated probability" in da["summary"]["verdict"]
    else:
        # no hollow band: a tiny llama is outside the sweep's ranges (and the shipped model's held-out AUROC is
        # below 0.8), so there is no probability, and the reason says which command gives one
        assert da["risk"] is None and "no informative estimate" in da["risk_unavailable_reason"]
        assert "hf-rksp preflight" in da["risk_unavailable_reason"]
        assert "No calibrated probability" in da["summary"]["verdict"]
    assert "--seed 3" in da["command"] and "--init" in da["command"]
    # same seed: same numbers; other seed: other weights and ids
    assert da["blocks"] == b.data["blocks"]
    assert da["inputs"]["sha256"] == b.data["inputs"]["sha256"]
    assert c.data["inputs"]["sha256"] != da["inputs"]["sha256"]
    assert c.data["blocks"][0]["eigenvalues"] != da["blocks"][0]["eigenvalues"]


def test_pretrained_dir_uses_saved_weights(tmp_path):
    """A checkpoint saved from seed 7 audits exactly like --init with seed 7, and unlike seed 8."""
    path = save_tiny("gpt2", tmp_path / "g", seed=7)
    loaded = audit(str(path), out_dir=None, seed=7, **SMALL)
    init7 = audit(str(path), init=True, out_dir=None, seed=7, **SMALL)
    assert loaded.data["source"]["init"] is False
    assert loaded.data["inputs"]["origin"] == "random-token-ids"  # no tokenizer saved
    assert loaded.data["inputs"]["sha256"] == init7.data["inputs"]["sha256"]
    assert loaded.data["blocks"] == init7.data["blocks"]
    other = audit(str(tmp_path / "g"), init=True, out_dir=None, seed=8, **SMALL)
    assert other.data["blocks"][0]["eigenvalues"] != init7.data["blocks"][0]["eigenvalues"]


def test_slugs():
    assert resolve_source("meta-llama/Llama-2-7b-hf", init=True).slug == "meta-llama__Llama-2-7b-hf__init"
    assert resolve_source("gpt2").slug == "gpt2"
    with pytest.raises(RKSPError):
        resolve_source(None)


def test_shipped_configs_build_on_meta_device():
    """Every shipped config is a valid architecture of a supported family."""
    from accelerate import init_empty_weights
    from transformers import AutoModel

    from hf_rksp.models.loading import (
        _config_from_dict,
        shipped_config,
        shipped_config_names,
    )

    expected = {"gpt2": 12, "gpt2-xl": 48, "meta-llama/Llama-2-7b-hf": 32, "meta-llama/Llama-2-13b-hf": 40,
                "HuggingFaceTB/SmolLM2-135M": 30, "sentence-transformers/all-MiniLM-L6-v2": 6}
    for name in shipped_config_names():
        cfg = _config_from_dict(shipped_config(name), name, False)
        with init_empty_weights():
            m = AutoModel.from_config(cfg)
        _, blocks = find_blocks(m)
        if name in expected:
            assert len(blocks) == expected[name]
    with init_empty_weights():
        m = AutoModel.from_config(_config_from_dict(shipped_config("meta-llama/Llama-2-7b-hf"), "", False))
    assert 6.4e9 < sum(p.numel() for p in m.parameters()) < 6.8e9


def test_published_schema_is_the_generated_one():
    """hf_rksp/schema/audit.schema.json is hf_rksp.record.records.audit_schema(), built from the feature registry."""
    from importlib import resources

    from hf_rksp.record.records import audit_schema
    from hf_rksp.spectral import FEATURE_NAMES

    published = json.loads(resources.files("hf_rksp").joinpath("schema/audit.schema.json").read_text())
    assert published == audit_schema()
    block = published["properties"]["blocks"]["items"]
    assert set(FEATURE_NAMES) <= set(block["required"])


def test_audit_checks_once_and_leaves_the_callers_options_alone(tiny_dirs, monkeypatch):
    """check_options once per audit, the spectral config built once by the pipeline, options and source copied."""
    from dataclasses import replace

    from hf_rksp.pipeline import run
    from hf_rksp.pipeline.options import AuditOptions

    calls = {"check": 0, "config": 0}
    check, config = run.check_audit_options, run.rksp_config

    def counted_check(*a, **k):
        calls["check"] += 1
        return check(*a, **k)

    def counted_config(*a, **k):
        calls["config"] += 1
        return config(*a, **k)

    monkeypatch.setattr(run, "check_audit_options", counted_check)
    monkeypatch.setattr(run, "rksp_config", counted_config)
    opts = AuditOptions(tokens=256, seq_len=128, name="org/tiny")
    before = replace(opts)
    monkeypatch.setattr(run, "plan_for", lambda src, o: type("Plan", (), {"stream": True})())  # "too big: stream"
    res = audit(str(tiny_dirs["llama"]), init=True, out_dir=None, options=opts, progress=False)
    assert calls == {"check": 1, "config": 1}
    assert opts == before and opts.stream is False  # the audit streamed on a copy
    assert res.record.method.streamed and "--stream" in res.record.command and res.record.source.id == "org/tiny"


def test_cli_audit_runs_on_our_default_threads_and_the_numbers_do_not_depend_on_them(tiny_dirs, monkeypatch,
                                                                                      capsys):
    """`hf-rksp audit` without --threads runs on hf_rksp.utils.threads.default_threads() (half the usable
    cores; 8 usable cores are made to appear so that it differs from 1 and from torch's setting), with
    --threads on the count given; the library's audit() leaves torch's setting alone.  The numbers (every
    block's features, the score) of 1 and 2 threads agree to 1e-9 relative (float64 spectra; the float32
    forward's summation order may differ between thread counts), which is why audit.json does not record
    the count."""
    import os

    from hf_rksp.cli.commands import main
    from hf_rksp.pipeline import run
    from hf_rksp.utils import threads

    seen = []
    real = run.profile_model

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(run, "profile_model", spy)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.default_threads() == 4
    before = torch.get_num_threads()
    small = ["--init", "--tokens", "128", "--seq-len", "64", "--no-write", "-q"]
    assert main(["audit", str(tiny_dirs["llama"]), *small]) == 0
    assert main(["audit", str(tiny_dirs["llama"]), *small, "--threads", "3"]) == 0
    audit(str(tiny_dirs["llama"]), init=True, out_dir=None, tokens=128, seq_len=64, progress=False)
    assert seen == [4, 3, before] and torch.get_num_threads() == before
    capsys.readouterr()
    one, two = (audit(str(tiny_dirs["llama"]), init=True, out_dir=None, tokens=128, seq_len=64, threads=n,
                      progress=False).record.to_dict() for n in (1, 2))
    from benchmarks.audit_threads import max_relative_difference, numbers_of

    a, b = numbers_of(one), numbers_of(two)
    assert len(a) > 20 and max_relative_difference(a, b) <= 1e-9


def test_loaded_model_is_typed(tiny_dirs):
    """load_model and load_for_streaming fill LoadedModel's fields."""
    from hf_rksp.models.loading import load_for_streaming, load_model

    whole = load_model(resolve_source(str(tiny_dirs["llama"])), dtype="float32", device="cpu")
    assert (whole.family, whole.model_class, whole.streamed) == ("llama", type(whole.model).__name__, False)
    assert whole.n_params == sum(p.numel() for p in whole.model.parameters()) and whole.checkpoint is None
    streamed = load_for_streaming(resolve_source(str(tiny_dirs["llama"])), dtype="bfloat16")
    assert streamed.streamed and streamed.dtype == torch.bfloat16 and streamed.checkpoint is not None
    assert streamed.n_params == whole.n_params and streamed.family == "llama"


def test_threads_option_is_scoped_to_the_audit(tiny_dirs, monkeypatch):
    """--threads N (AuditOptions.threads): the audit runs on N torch threads, the process's setting comes back
    after it, the reproducing command does not record it (it does not change what is computed), and a count
    out of range is refused before any work."""
    import torch

    from hf_rksp.cli import build_parser
    from hf_rksp.errors import ConfigError
    from hf_rksp.pipeline import run

    seen = []
    real = run.profile_model

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(run, "profile_model", spy)
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    res = audit(str(tiny_dirs["llama"]), init=True, out_dir=None, tokens=256, seq_len=128, threads=other,
                progress=False)
    assert seen == [other] and torch.get_num_threads() == before
    assert "--threads" not in res.record.command
    args = build_parser().parse_args(["audit", "x", "--threads", "3"])
    assert args.threads == 3
    with pytest.raises(ConfigError, match="threads"):
        audit(str(tiny_dirs["llama"]), init=True, out_dir=None, threads=0)
