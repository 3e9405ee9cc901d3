"""hf_rksp/models: seeded random init with no global side effect, and the checkpoint protocol."""

from __future__ import annotations

import json

import torch

from hf_rksp.models.loading import load_model, resolve_source


def test_building_at_init_leaves_the_global_rng_alone(tmp_path):
    """--init seeds its own draws: a caller's torch RNG stream is the same before and after, and the weights
    depend on the seed only (not on the caller's RNG state)."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 64,
                               "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}))
    torch.manual_seed(1234)
    want = torch.rand(3)
    torch.manual_seed(1234)
    a = load_model(resolve_source(None, init=True, config_path=str(cfg)), seed=5).model
    assert torch.equal(torch.rand(3), want)
    torch.manual_seed(99)
    b = load_model(resolve_source(None, init=True, config_path=str(cfg)), seed=5).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_every_checkpoint_format_implements_the_protocol(tmp_path):
    """The three checkpoint readers satisfy models.checkpoints.Checkpoint (what streaming relies on)."""
    from safetensors.torch import save_file

    from hf_rksp.models.checkpoints import Checkpoint
    from hf_rksp.models.checkpoints.gguf import GGUFCheckpoint
    from hf_rksp.models.checkpoints.hub import HubCheckpoint
    from hf_rksp.models.checkpoints.safetensors import SafetensorsCheckpoint

    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert isinstance(ckpt, Checkpoint) and ckpt.shapes == {"w": (2, 3)} and ckpt.progress() == {}
    assert torch.equal(ckpt.read(["w"])["w"], torch.ones(2, 3))
    for cls in (GGUFCheckpoint, HubCheckpoint):  # built from files in their own tests: here, the methods
        assert all(callable(getattr(cls, m, None)) for m in ("read", "expect", "progress")), cls
