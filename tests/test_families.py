"""Block discovery across families: each tiny config audits at init, and hooks see the residual stream."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import slug_of

from hf_rksp import audit
from hf_rksp.capture.hooks import capture_snapshots
from hf_rksp.cli.commands import main
from hf_rksp.models.blocks import BLOCK_PATHS, find_blocks

TINY = {
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8, bos_token_id=0, eos_token_id=0),
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "phi": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "gemma": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128),
    "qwen3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128),
    "mixtral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                      num_experts=4, num_experts_per_tok=2),
    "mamba": dict(hidden_size=64, num_hidden_layers=2, state_size=8),
    "mamba2": dict(hidden_size=64, num_hidden_layers=2, state_size=8, num_heads=4, head_dim=32, n_groups=1),
    "roberta": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    max_position_embeddings=258),
    "deberta-v2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "t5": dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16),
    "vit": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8),
}


def config_file(tmp_path, model_type: str, **kw) -> str:
    d = {"model_type": model_type, "vocab_size": 512, "max_position_embeddings": 256, **TINY.get(model_type, {}), **kw}
    p = tmp_path / f"{model_type}.json"
    p.write_text(json.dumps(d))
    return str(p)


@pytest.mark.support("init audit")
@pytest.mark.parametrize("model_type", sorted(TINY))
def test_family_audits_at_init(model_type, tmp_path):
    assert model_type in BLOCK_PATHS
    res = audit(config=config_file(tmp_path, model_type), tokens=128, seq_len=64, out_dir=None, progress=False)
    d = res.data
    n_blocks = 4 if model_type == "t5" else 2  # T5: encoder and decoder stacks
    assert d["source"]["family"] == model_type and len(d["blocks"]) == n_blocks
    for b in d["blocks"]:
        # a LayerNorm'd stream (post-LN encoders) has zero feature-mean: rank d - 1
        assert b["rank"] in (63, 64) and b["m"] == b["rank"] and 0 <= b["near_unit_mass"] <= 1


@pytest.mark.support("streaming")
@pytest.mark.parametrize("model_type", sorted(set(TINY) - {"t5", "vit"}))
def test_family_streams_at_init(model_type, tmp_path):
    """--init --stream (each block created from its own seed, run, dropped) equals the whole-model --init."""
    cfg = config_file(tmp_path, model_type)
    whole = audit(config=cfg, tokens=128, seq_len=64, out_dir=None, progress=False).data
    streamed = audit(config=cfg, tokens=128, seq_len=64, out_dir=None, progress=False, stream=True).data
    assert streamed["method"]["streamed"] and len(streamed["blocks"]) == len(whole["blocks"]) == 2
    for a, b in zip(whole["blocks"], streamed["blocks"]):
        assert a["rank"] == b["rank"] and a["near_unit_mass"] == b["near_unit_mass"]
        assert a["spectral_radius"] == pytest.approx(b["spectral_radius"], rel=1e-6)
        assert ("router" in a) == ("router" in b)  # MoE routing statistics, streamed too
        if "router" in a:  # key by key: pytest >= 9.2's approx refuses dicts holding lists
            assert b["router"].keys() == a["router"].keys()
            for key, value in a["router"].items():
                assert b["router"][key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.parametrize("model_type", ["gpt_neox", "opt", "falcon", "mixtral", "mamba", "deberta-v2"])
def test_hooks_see_the_residual_stream(model_type, tmp_path):
    """Block inputs are the hidden states the model reports between blocks."""
    from transformers import AutoConfig, AutoModel

    d = json.loads(open(config_file(tmp_path, model_type)).read())
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(d.pop("model_type"), **d)).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    _, blocks = find_blocks(model)
    snaps = capture_snapshots(model, blocks, ids, batch_size=2, progress=False)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    flat = [h.reshape(-1, h.shape[-1]) for h in hs]
    if model_type == "mamba":  # MambaModel records hidden states after each block, not before
        torch.testing.assert_close(snaps.outputs[0], flat[0])
        torch.testing.assert_close(snaps.outputs[1], flat[1])
    else:
        torch.testing.assert_close(snaps.inputs[0], flat[0])
        torch.testing.assert_close(snaps.inputs[1], flat[1])
    torch.testing.assert_close(snaps.outputs[0], snaps.inputs[1])


def test_unknown_family_needs_blocks_flag(tmp_path, capsys):
    cfg = config_file(tmp_path, "stablelm", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    out = tmp_path / "out"
    rc = main(["audit", "--config", cfg, "--tokens", "128", "--seq-len", "64", "--out-dir", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc != 0 and "stablelm" in err and "--blocks" in err and not out.exists()
    rc = main(["audit", "--config", cfg, "--blocks", "layers", "--tokens", "128", "--seq-len", "64",
               "--out-dir", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "audits" / slug_of("--config", cfg, "--blocks", "layers", "--tokens", "128",
                                                "--seq-len", "64") / "audit.json").read_text())
    assert len(data["blocks"]) == 2 and "--blocks layers" in data["command"]
    rc = main(["audit", "--config", cfg, "--blocks", "model.layers", "--tokens", "128", "--seq-len", "64",
               "--no-write", "-q"])  # the base-model prefix is accepted too
    assert rc == 0
    capsys.readouterr()
    rc = main(["audit", "--config", cfg, "--blocks", "nope.layers", "--tokens", "128", "--seq-len", "64",
               "--no-write", "-q"])
    assert rc != 0 and "nope.layers" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_router_statistics(model_type, tmp_path):
    """Router stats match an independent count from the model's own output_router_logits."""
    from transformers import AutoConfig, AutoModel

    from hf_rksp.pipeline.options import AuditOptions
    from hf_rksp.pipeline.run import profile_model

    d = json.loads(open(config_file(tmp_path, model_type)).read())
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(d.pop("model_type"), **d)).eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    results, _, _ = profile_model(model, ids, AuditOptions(tokens=128, seq_len=64, batch_size=2), progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    for i, b in enumerate(results):
        r = b.router
        lg = logits[i].float()
        top = torch.topk(torch.softmax(lg, -1), r.top_k, dim=-1).indices
        load = torch.bincount(top.reshape(-1), minlength=lg.shape[-1]).double()
        load = load / load.sum()
        assert r.n_experts == 4 and r.top_k == 2
        assert r.expert_load == pytest.approx(load.tolist(), abs=1e-6)
        assert r.router_logit_max == pytest.approx(float(lg.abs().max()), rel=1e-5)
        assert r.load_max_over_mean == pytest.approx(float(load.max() * 4), rel=1e-5)
        assert 0 < r.router_entropy_mean <= r.router_entropy_max + 1e-9


def test_moe_audit_card_and_schema(tmp_path):
    res = audit(config=config_file(tmp_path, "mixtral"), tokens=128, seq_len=64, out_dir=str(tmp_path / "o"),
                progress=False)  # writing validates against the JSON Schema
    card = open(res.paths["card"]).read()
    assert "## Mixture-of-experts routing" in card and "| 1 | 4 (2) |" in card


def test_dense_models_have_no_router_stats(tmp_path):
    res = audit(config=config_file(tmp_path, "phi"), tokens=128, seq_len=64, out_dir=None, progress=False)
    assert all("router" not in b for b in res.data["blocks"])


def test_kan_transformer_example_audits():
    """examples/kan_transformer.py: KAN feed-forwards in every block; the audit sees them."""
    import importlib.util
    from pathlib import Path

    p = Path(__file__).resolve().parent.parent / "examples" / "kan_transformer.py"
    spec = importlib.util.spec_from_file_location("kan_transformer", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.kan_gpt2(layers=2, width=32)
    assert all(isinstance(b.mlp, mod.KANFeedForward) for b in model.h)
    blocks = mod.audit_kan(layers=2, width=32, tokens=256, seq_len=128)
    assert len(blocks) == 2 and all(b.rank == 32 for b in blocks)
    # the KAN feed-forward changes the map: same seed, GPT-2 with its MLPs, different spectrum
    from hf_rksp.capture.calibration import random_ids
    from hf_rksp.pipeline.options import AuditOptions
    from hf_rksp.pipeline.run import profile_model

    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2Model

    plain = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=1024, n_positions=512)).eval()
    ids = random_ids(1024, 256, 128, 0).input_ids
    ref, _, _ = profile_model(plain, ids, AuditOptions(tokens=256, seq_len=128), progress=False)
    assert [b.eigenvalues for b in ref] != [b.eigenvalues for b in blocks]


def test_vit_audits_on_synthetic_images(tmp_path):
    """ViT: calibrated on seeded synthetic images; positions = images x (patches + CLS)."""
    res = audit(config=config_file(tmp_path, "vit"), tokens=256, seq_len=128, out_dir=str(tmp_path / "o"),
                progress=False)
    inp = res.data["inputs"]
    assert inp["origin"] == "synthetic-images" and inp["seq_len"] == 17 and inp["n_sequences"] == 15
    assert inp["n_tokens"] == 255 and res.data["method"]["seq_len"] == 17
    again = audit(config=config_file(tmp_path, "vit"), tokens=256, seq_len=128, out_dir=None, progress=False)
    assert again.data["inputs"]["sha256"] == inp["sha256"] and again.data["blocks"] == res.data["blocks"]


def test_t5_encoder_and_decoder_stacks_profiled_separately(tmp_path):
    cfg = config_file(tmp_path, "t5", d_model=64, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=4, d_kv=16)
    res = audit(config=cfg, tokens=256, seq_len=128, out_dir=str(tmp_path / "o"), progress=False)
    blocks = res.data["blocks"]
    assert [(b["stack"], b["stack_index"]) for b in blocks] == [
        ("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1), ("decoder", 2)]
    stacks = res.data["summary"]["stacks"]
    assert stacks["encoder"]["score"] == pytest.approx(sum(b["near_unit_mass"] for b in blocks[:2]) / 2)
    assert stacks["decoder"]["score"] == pytest.approx(sum(b["near_unit_mass"] for b in blocks[2:]) / 3)
