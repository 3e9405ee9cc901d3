"""Layer-major streaming (--stream) against the whole-model audit."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import interrupt_block, slug_of, tiny_config

from hf_rksp import audit
from hf_rksp.cli.commands import main

SMALL = dict(tokens=256, seq_len=128, progress=False)


def sharded_checkpoint(family: str, path, seed: int = 0, lm_head: bool = True):
    """A tiny checkpoint in HF's sharded-safetensors layout (several shards + index json)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if lm_head else AutoModel
    cls.from_config(tiny_config(family)).save_pretrained(path, max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.support("streaming")
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_streamed_equals_whole_model(family, tmp_path):
    ckpt = sharded_checkpoint(family, tmp_path / family)
    whole = audit(str(ckpt), out_dir=None, **SMALL)
    streamed = audit(str(ckpt), out_dir=None, stream=True, **SMALL)
    assert streamed.data["method"]["streamed"] is True and whole.data["method"]["streamed"] is False
    assert streamed.data["inputs"]["sha256"] == whole.data["inputs"]["sha256"]
    for a, b in zip(whole.data["blocks"], streamed.data["blocks"]):
        assert a["rank"] == b["rank"]
        assert a["near_unit_mass"] == b["near_unit_mass"]
        assert a["spectral_radius"] == pytest.approx(b["spectral_radius"], rel=1e-6)
        assert a["nonlinearity_ratio"] == pytest.approx(b["nonlinearity_ratio"], rel=1e-5)


@pytest.mark.support("streaming", "bert")
def test_streamed_encoder_from_base_model_checkpoint(tmp_path):
    ckpt = sharded_checkpoint("bert", tmp_path / "bert", lm_head=False)
    whole = audit(str(ckpt), out_dir=None, **SMALL)
    streamed = audit(str(ckpt), out_dir=None, stream=True, **SMALL)
    assert [b["near_unit_mass"] for b in whole.data["blocks"]] == [b["near_unit_mass"] for b in streamed.data["blocks"]]


def test_stream_cli_writes_same_blocks(tmp_path, capsys):
    ckpt = sharded_checkpoint("llama", tmp_path / "ll")
    for sub, extra in (("a", []), ("b", ["--stream"])):
        rc = main(["audit", str(ckpt), "--tokens", "256", "--seq-len", "128", "--out-dir", str(tmp_path / sub),
                   "-q", *extra])
        assert rc == 0, capsys.readouterr().err
    args = (str(ckpt), "--tokens", "256", "--seq-len", "128")
    a = json.loads((tmp_path / "a" / "audits" / slug_of(*args) / "audit.json").read_text())
    b = json.loads((tmp_path / "b" / "audits" / slug_of(*args, "--stream") / "audit.json").read_text())
    assert "--stream" in b["command"] and "--stream" not in a["command"]
    assert [x["near_unit_mass"] for x in a["blocks"]] == [x["near_unit_mass"] for x in b["blocks"]]


def test_stream_refuses_what_it_cannot_stream(tmp_path, capsys):
    ckpt = tmp_path / "bin"
    ckpt.mkdir()
    tiny_config("gpt2").save_pretrained(ckpt)
    from transformers import AutoModel

    torch.save(AutoModel.from_config(tiny_config("gpt2")).state_dict(), ckpt / "pytorch_model.bin")
    cases = [
        ([str(ckpt), "--stream"], ".bin"),
        ([str(tmp_path / "x"), "--init", "--stream"], None),  # missing path wins first
    ]
    for argv, word in cases:
        rc = main(["audit", *argv, "--tokens", "256", "--seq-len", "128", "--no-write", "-q"])
        err = capsys.readouterr().err
        assert rc != 0 and err.startswith("hf-rksp: error:") and len(err.strip().splitlines()) == 1, err
        if word:
            assert word in err


def _same_blocks(a: dict, b: dict) -> None:
    """Same numbers: these paths do the same float32 forward and the same spectral algebra."""
    assert len(a["blocks"]) == len(b["blocks"])
    for x, y in zip(a["blocks"], b["blocks"]):
        assert x["rank"] == y["rank"] and x["near_unit_mass"] == y["near_unit_mass"]
        assert x["spectral_radius"] == pytest.approx(y["spectral_radius"], rel=1e-6)
        assert x["nonlinearity_ratio"] == pytest.approx(y["nonlinearity_ratio"], rel=1e-5)


@pytest.mark.support("streaming")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_init_streamed_equals_whole_model_init(family, tmp_path):
    """--init --stream creates each block from its own seed: the same weights as the whole-model --init."""
    cfg = tmp_path / "config.json"
    tiny_config(family).to_json_file(cfg)
    whole = audit(None, config=str(cfg), out_dir=None, seed=3, **SMALL)
    streamed = audit(None, config=str(cfg), out_dir=None, seed=3, stream=True, **SMALL)
    assert streamed.data["method"]["streamed"] is True and "seeded init" in streamed.data["method"]["snapshots"]
    _same_blocks(whole.data, streamed.data)
    other = audit(None, config=str(cfg), out_dir=None, seed=4, stream=True, **SMALL)
    assert other.data["blocks"][0]["spectral_radius"] != streamed.data["blocks"][0]["spectral_radius"]


def _checkpoint_of_kind(kind: str, tmp_path):
    """The same tiny Llama as a sharded safetensors directory or as a Q8_0 GGUF file, both named 'ckpt'."""
    ckpt = sharded_checkpoint("llama", tmp_path / "ckpt")
    if kind == "safetensors":
        return ckpt
    from gguf_fixtures import tiny_llama_gguf
    from transformers import AutoModel

    return tiny_llama_gguf(tmp_path / "ckpt.gguf", AutoModel.from_pretrained(ckpt))


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_interrupted_stream_resumes_to_the_same_json(kind, tmp_path, monkeypatch):
    """Ctrl-C while block 2 loads; the rerun picks up at block 2 and writes what an uninterrupted run writes."""
    ckpt = _checkpoint_of_kind(kind, tmp_path)
    reference = audit(str(ckpt), out_dir=None, stream=True, **SMALL)
    out = tmp_path / "out"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        interrupt_block(m, 2)
        audit(str(ckpt), out_dir=str(out), stream=True, **SMALL)
    partial = list((out / "audits" / ".partial").iterdir())
    assert len(partial) == 1 and json.loads((partial[0] / "progress.json").read_text())["next_block"] == 2
    assert [p.name for p in (out / "audits").iterdir()] == [".partial"]  # nothing published by the interrupted run
    resumed = audit(str(ckpt), out_dir=str(out), stream=True, **SMALL)
    assert resumed.data["timings"]["resumed_at_block"] == 2
    assert resumed.data["blocks"] == reference.data["blocks"]
    assert not (out / "audits" / ".partial").exists()  # progress removed once complete, and its empty folder
    on_disk = json.loads((out / "audits" / resumed.record.slug / "audit.json").read_text())
    assert on_disk["blocks"] == reference.data["blocks"]


def _change_block0(ckpt):
    """Rewrite the file holding block 0's attention weights with other values (same names, shapes, size)."""
    from safetensors.torch import load_file, save_file

    if ckpt.suffix == ".gguf":
        from gguf_fixtures import tiny_llama_gguf
        from transformers import AutoModel

        torch.manual_seed(7)
        tiny_llama_gguf(ckpt, AutoModel.from_config(tiny_config("llama")))
        return ckpt.name
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][key]
    sd = load_file(str(shard))
    sd[key] = torch.flip(sd[key], dims=[0]).contiguous()
    save_file(sd, str(shard), metadata={"format": "pt"})
    return shard.name


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_resume_refuses_progress_of_other_weights(kind, tmp_path, monkeypatch, caplog):
    """Interrupted at block 2, then one shard (the GGUF file) changes: the rerun starts over, says why in one
    warning, and writes exactly what a fresh audit of the changed weights writes (issue 29)."""
    ckpt = _checkpoint_of_kind(kind, tmp_path)
    out = tmp_path / "out"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        interrupt_block(m, 2)
        audit(str(ckpt), out_dir=str(out), stream=True, **SMALL)
    assert list((out / "audits" / ".partial").glob("*/progress.json"))
    changed = _change_block0(ckpt)
    fresh = audit(str(ckpt), out_dir=None, stream=True, **SMALL)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_rksp"):  # whatever level an earlier test left it at
        rerun = audit(str(ckpt), out_dir=str(out), stream=True, **SMALL)
    assert "resumed_at_block" not in rerun.data["timings"]
    assert rerun.data["blocks"] == fresh.data["blocks"]
    said = [r.getMessage() for r in caplog.records if "other weights" in r.getMessage()]
    assert len(said) == 1 and changed in said[0] and "starting over" in said[0], said
    assert not (out / "audits" / ".partial").exists()


def test_resume_of_unchanged_weights_is_silent(tmp_path, monkeypatch, caplog):
    """The same weights (files untouched) resume with no warning: the identity is stable across processes'
    reads (stat of the files, not of anything the audit writes)."""
    ckpt = _checkpoint_of_kind("safetensors", tmp_path)
    out = tmp_path / "out"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        interrupt_block(m, 1)
        audit(str(ckpt), out_dir=str(out), stream=True, **SMALL)
    caplog.clear()
    resumed = audit(str(ckpt), out_dir=str(out), stream=True, **SMALL)
    assert resumed.data["timings"]["resumed_at_block"] == 1
    assert not [r for r in caplog.records if "other weights" in r.getMessage()]


@pytest.fixture(scope="module")
def smollm2_safetensors(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M-Instruct (real weights) rewritten as a sharded safetensors checkpoint + tokenizer."""
    from hf_rksp.models.loading import load_model, resolve_source, save_sharded

    return save_sharded(load_model(resolve_source(str(smollm2_gguf))), tmp_path_factory.mktemp("smol_st"),
                        max_shard_size="150MB")


@pytest.mark.slow
@pytest.mark.support("streaming", "llama")
def test_smollm2_streamed_matches_whole_model(smollm2_safetensors):
    """SmolLM2-135M (real weights, d = 576: full DMD) streamed block by block from sharded safetensors vs
    loaded whole: the same v2 algebra on forwards that differ only by float32 rounding, so per block the
    near-unit mass moves by at most 2 eigenvalues of 511 (band-edge flips) and rho by < 1e-4 relative."""
    assert len(list(smollm2_safetensors.glob("*.safetensors"))) >= 2
    whole = audit(str(smollm2_safetensors), out_dir=None, tokens=512, seq_len=256, progress=False)
    streamed = audit(str(smollm2_safetensors), out_dir=None, stream=True, tokens=512, seq_len=256, progress=False)
    assert streamed.data["inputs"]["origin"] == "embedded-text"
    assert streamed.data["method"]["rank"] == "full" and streamed.data["method"]["streamed"]
    for a, b in zip(whole.data["blocks"], streamed.data["blocks"]):
        assert a["m"] == b["m"]
        assert abs(a["near_unit_mass"] - b["near_unit_mass"]) <= 2 / a["m"] + 1e-12
        assert b["spectral_radius"] == pytest.approx(a["spectral_radius"], rel=1e-4)


def test_device_map_cpu_matches_plain_load(tmp_path):
    """--device-map cpu goes through accelerate's dispatch and gives the plain load's numbers."""
    ckpt = sharded_checkpoint("llama", tmp_path / "ckpt")
    plain = audit(str(ckpt), out_dir=None, **SMALL)
    mapped = audit(str(ckpt), out_dir=None, device_map="cpu", max_memory="cpu=4GiB", **SMALL)
    _same_blocks(plain.data, mapped.data)
    assert "--device-map cpu --max-memory cpu=4GiB" in mapped.data["command"]


def test_placement_and_quantization_errors(tmp_path, capsys):
    ckpt = sharded_checkpoint("gpt2", tmp_path / "ckpt")
    capsys.readouterr()  # the checkpoint writer's progress bar
    cases = [
        (["--max-memory", "cpu=4GiB"], "--device-map"),
        (["--device-map", "cpu", "--max-memory", "lots"], "DEVICE=SIZE"),
        (["--device-map", "cpu", "--stream"], "--stream"),
    ]
    if not torch.cuda.is_available():
        cases += [(["--load-in-8bit"], "CUDA"), (["--load-in-4bit"], "CUDA"), (["--device-map", "cuda"], "CUDA")]
    for extra, word in cases:
        rc = main(["audit", str(ckpt), *extra, "--tokens", "256", "--seq-len", "128", "--out-dir", str(tmp_path / "o"),
                   "-q"])
        err = capsys.readouterr().err
        assert rc != 0 and err.startswith("hf-rksp: error:") and len(err.strip().splitlines()) == 1, (extra, err)
        assert word in err, (extra, err)
        assert not (tmp_path / "o").exists()


def test_rank_r_is_seeded_per_block_and_recorded(tmp_path):
    """--rank 8: rank-8 randomized DMD whose basis each block draws from its own seed, so streamed and
    whole-model audits agree exactly; m = 8 eigenvalues per block; the command and method record it."""
    ckpt = sharded_checkpoint("llama", tmp_path / "ckpt")
    whole = audit(str(ckpt), out_dir=None, rank=8, **SMALL)
    assert whole.data["method"]["rank"] == 8 and "--rank 8" in whole.data["command"]
    assert all(b["m"] == 8 == len(b["eigenvalues"]) and b["rank"] == 64 for b in whole.data["blocks"])
    streamed = audit(str(ckpt), out_dir=None, rank=8, stream=True, **SMALL)
    _same_blocks(whole.data, streamed.data)
    other_seed = audit(str(ckpt), out_dir=None, rank=8, seed=1, **SMALL)
    assert other_seed.data["blocks"][0]["eigenvalues"] != whole.data["blocks"][0]["eigenvalues"]


def test_rank_auto_is_full_up_to_1024_wide_then_32():
    from hf_rksp.capture.profile import resolve_rank

    assert resolve_rank("auto", 2048, 576) is None and resolve_rank("auto", 2048, 1024) is None
    assert resolve_rank("auto", 2048, 4096) == 32 and resolve_rank("auto", 512, 4096) is None  # k <= 511
    assert resolve_rank("full", 2048, 4096) is None and resolve_rank(16, 2048, 64) == 16


def test_resume_state_keeps_block_records(tmp_path):
    """progress.json holds the blocks done as their audit-JSON objects (the format it always had, so a progress
    file written before the blocks were typed still resumes); load gives BlockRecords back, router stats too."""
    import dataclasses
    from pathlib import Path

    from hf_rksp.capture.streaming import ResumeState
    from hf_rksp.record.records import BlockRecord, RouterStats, read_audit

    shipped = Path(__file__).resolve().parents[1] / "audits" / "gpt2__init" / "audit.json"
    blocks = read_audit(shipped).blocks[:3]
    router = RouterStats(n_experts=4, top_k=2, expert_load=[0.25] * 4, load_max_over_mean=1.0, load_cv=0.0,
                         router_logit_max=2.0, router_entropy_mean=1.3, router_entropy_max=1.386)
    blocks[1] = dataclasses.replace(blocks[1], router=router)
    hidden = [torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))]
    state = ResumeState(tmp_path / "p", "key")
    state.save(3, blocks, hidden)
    saved = json.loads((tmp_path / "p" / "progress.json").read_text())
    assert saved["results"] == [b.to_dict() for b in blocks]
    nxt, results, h = ResumeState(tmp_path / "p", "key").load(5, 1)
    assert nxt == 3 and results == blocks and all(isinstance(r, BlockRecord) for r in results)
    assert results[1].router == router and torch.equal(h[0], hidden[0])
    assert ResumeState(tmp_path / "p", "other key").load(5, 1) is None
