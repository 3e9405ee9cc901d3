"""hf_rksp/models: seeded random init with no global side effect, and the checkpoint protocol."""

from __future__ import annotations

import json
import os

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


CUSTOM_CONFIG = '''
from transformers import PretrainedConfig


class XTinyConfig(PretrainedConfig):
    model_type = "xtiny"

    def __init__(self, vocab_size=512, hidden_size=64, num_hidden_layers=3, max_position_embeddings=256, **kw):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.max_position_embeddings = num_hidden_layers, max_position_embeddings
        super().__init__(**kw)
'''

CUSTOM_MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_xtiny import XTinyConfig


class XTinyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, hidden_states, **kwargs):
        return hidden_states + self.down(torch.tanh(self.up(self.norm(hidden_states))))


class XTinyModel(PreTrainedModel):
    config_class = XTinyConfig
    base_model_prefix = "xtiny"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(XTinyBlock(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, output_hidden_states=False, **kwargs):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return BaseModelOutput(last_hidden_state=h)
'''


def custom_code_model(path):
    """A model folder whose config and model classes are its own code (auto_map), with safetensors weights."""
    path.mkdir()
    (path / "configuration_xtiny.py").write_text(CUSTOM_CONFIG)
    (path / "modeling_xtiny.py").write_text(CUSTOM_MODEL)
    (path / "config.json").write_text(json.dumps({
        "model_type": "xtiny", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 3,
        "max_position_embeddings": 256,
        "auto_map": {"AutoConfig": "configuration_xtiny.XTinyConfig", "AutoModel": "modeling_xtiny.XTinyModel"}}))
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(path, trust_remote_code=True), trust_remote_code=True)
    model.save_pretrained(path)
    return path


def test_trust_remote_code_reaches_every_build(tmp_path):
    """A local custom-code model (configuration/modeling files named by auto_map) audits offline with
    --trust-remote-code, whole, streamed and at init; without it, one line naming the flag.  Each run is a
    fresh process: transformers registers a custom class once it is built, after which a build that lacks
    the flag passes in that process (issue 29: the flag did not reach the memory planner's and the
    streamed path's meta-model builds)."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).parents[1]))
    ckpt = tmp_path / "xtiny"
    script = (f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"from test_models import custom_code_model; custom_code_model(pathlib.Path({str(ckpt)!r}))")
    made = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert made.returncode == 0, made.stderr
    scores = {}
    for run in ("whole", "stream", "init", "untrusted"):
        argv = ["audit", str(ckpt), "--blocks", "layers", "--tokens", "256", "--seq-len", "128", "-q",
                "--out-dir", str(tmp_path / run)]
        argv += {"whole": ["--trust-remote-code"], "stream": ["--trust-remote-code", "--stream"],
                 "init": ["--trust-remote-code", "--init"], "untrusted": []}[run]
        p = subprocess.run([sys.executable, "-m", "hf_rksp", *argv], env=env, capture_output=True, text=True,
                           timeout=300, check=False, stdin=subprocess.DEVNULL)
        if run == "untrusted":
            assert p.returncode == 2 and p.stderr.strip() == (
                f"hf-rksp: error: {ckpt} holds custom code (its own model classes, named by its config's auto_map): "
                "read it, then pass --trust-remote-code to run it"), p.stderr
            continue
        assert p.returncode == 0, p.stderr
        (written,) = (tmp_path / run / "audits").glob("*/audit.json")  # the one audit (slug: the slug rule's)
        assert "__xtiny-" in written.parent.name and ("__init" in written.parent.name) == (run == "init")
        data = json.loads(written.read_text())
        assert data["source"]["model_class"] == "XTinyModel" and data["source"]["n_blocks"] == 3
        assert data["method"]["streamed"] == (run == "stream")
        scores[run] = [b["near_unit_mass"] for b in data["blocks"]]
    assert scores["whole"] == scores["stream"]  # the same weights and float32 forward, read block by block
