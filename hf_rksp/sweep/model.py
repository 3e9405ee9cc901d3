"""The small decoder-only transformers the divergence sweep trains from scratch.

Two families share one module so every factor of the sweep is a config field:
``style="gpt"`` (LayerNorm, GELU MLP, learned positions) and ``style="llama"``
(RMSNorm, SwiGLU, rotary).  ``norm`` places the normalization: ``pre``
(x + f(norm(x))), ``post`` (norm(x + f(x))) or ``none``.  Every weight is
drawn from N(0, init_std^2), biases are zero, so ``init_std`` is the init-scale
factor.  The blocks live at ``model.blocks`` (registered in
:data:`hf_rksp.blocks.BLOCK_PATHS`), so the audit, KSS and the Trainer treat
this model like any Hugging Face model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

NORMS = ("pre", "post", "none")
STYLES = ("gpt", "llama")


class SweepLMConfig(PretrainedConfig):
    model_type = "rksp_sweep_lm"

    def __init__(self, vocab_size=256, d_model=64, n_layers=4, n_heads=4, max_len=128, norm="pre",
                 style="gpt", init_std=0.02, **kwargs):
        if norm not in NORMS or style not in STYLES:
            raise ValueError(f"norm must be one of {NORMS} and style one of {STYLES}, got {norm!r}, {style!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.max_len, self.norm, self.style, self.init_std = max_len, norm, style, init_std
        self.hidden_size, self.num_hidden_layers = d_model, n_layers
        super().__init__(**kwargs)


def _norm(cfg: SweepLMConfig) -> nn.Module:
    if cfg.norm == "none":
        return nn.Identity()
    return nn.LayerNorm(cfg.d_model) if cfg.style == "gpt" else nn.RMSNorm(cfg.d_model, eps=1e-6)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SweepBlock(nn.Module):
    def __init__(self, cfg: SweepLMConfig):
        super().__init__()
        d, bias = cfg.d_model, cfg.style == "gpt"
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        if cfg.style == "gpt":
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        else:
            hidden = 64 * math.ceil(8 * d / 3 / 64)
            self.gate_up, self.out = nn.Linear(d, 2 * hidden, bias=False), nn.Linear(hidden, d, bias=False)
        self.stats: list[dict] | None = None  # set to a list to record attention logits/entropy

    def attention(self, x: torch.Tensor, rope) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        if self.stats is not None:  # explicit path: the baselines need the logits
            logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            p = logits.softmax(-1)
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (b, h, t)
            self.stats.append({"max_logit": float(logits.max()), "min_entropy": float(ent.mean(dim=(0, 2)).min())})
            o = p @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(b, t, d))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.style == "gpt":
            return self.out(F.gelu(self.fc(x)))
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(g) * u)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        if self.cfg.norm == "post":
            x = self.norm1(x + self.attention(x, rope))
            return self.norm2(x + self.mlp(x))
        x = x + self.attention(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class SweepLM(PreTrainedModel):
    config_class = SweepLMConfig
    base_model_prefix = "sweep"
    _no_split_modules = ["SweepBlock"]

    def __init__(self, config: SweepLMConfig):
        super().__init__(config)
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.max_len, d) if config.style == "gpt" else None
        self.blocks = nn.ModuleList([SweepBlock(config) for _ in range(config.n_layers)])
        self.final_norm = _norm(config) if config.norm == "pre" else nn.Identity()
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def _rope(self, t: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.style != "llama":
            return None
        hd = self.config.d_model // self.config.n_heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(t, device=device, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask=None, **kwargs):
        t = input_ids.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.config.max_len}")
        x = self.embed(input_ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=input_ids.device))
        rope = self._rope(t, input_ids.device)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.head(self.final_norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)
