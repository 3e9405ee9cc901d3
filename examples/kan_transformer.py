"""A KAN-style transformer (KAN feed-forward in place of each MLP), audited with RKSP.

    python examples/kan_transformer.py [--layers 4] [--width 128] [--out-dir .]

The paper reports that RKSP carries over to KAN transformers. Here each GPT-2
block keeps its attention and gets a Kolmogorov-Arnold feed-forward: every
input-output edge carries its own learnable 1-D function, written as a SiLU
base term plus a combination of Gaussian radial basis functions on a fixed grid
(the "FastKAN" parameterization of Li, 2024, a cheap stand-in for B-splines).
The model stays a GPT2Model, so hf-rksp finds its blocks as usual; the audit is
at random init on seeded random token ids, like `hf-rksp audit --init`.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn


class KANLayer(nn.Module):
    """y_j = sum_i [ b_ji * silu(x_i) + sum_k c_jik * exp(-((x_i - g_k) / h)^2) ]."""

    def __init__(self, d_in: int, d_out: int, grid: int = 8, span: float = 2.0):
        super().__init__()
        self.register_buffer("centers", torch.linspace(-span, span, grid))
        self.h = 2 * span / (grid - 1)
        self.norm = nn.LayerNorm(d_in)  # keeps inputs on the grid's range
        self.base = nn.Linear(d_in, d_out, bias=False)
        self.spline = nn.Linear(d_in * grid, d_out, bias=False)
        nn.init.normal_(self.spline.weight, std=0.1 / math.sqrt(d_in * grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)
        rbf = torch.exp(-(((z.unsqueeze(-1) - self.centers) / self.h) ** 2))
        return self.base(nn.functional.silu(x)) + self.spline(rbf.flatten(-2))


class KANFeedForward(nn.Module):
    """Drop-in for GPT2MLP: two KAN layers, d -> hidden -> d."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up = KANLayer(d, hidden)
        self.down = KANLayer(hidden, d)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(hidden_states))


def kan_gpt2(layers: int = 4, width: int = 128, heads: int = 4, vocab: int = 1024, seed: int = 0):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    model = GPT2Model(GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=512,
                                 bos_token_id=0, eos_token_id=0))
    for block in model.h:
        block.mlp = KANFeedForward(width, 2 * width)
    return model.eval()


def audit_kan(layers: int = 4, width: int = 128, tokens: int = 1024, seq_len: int = 256, seed: int = 0) -> list:
    from hf_rksp.pipeline.options import AuditOptions
    from hf_rksp.pipeline.run import profile_model
    from hf_rksp.capture.calibration import random_ids

    model = kan_gpt2(layers, width, seed=seed)
    ids = random_ids(model.config.vocab_size, tokens, seq_len, seed).input_ids
    blocks, _, _ = profile_model(model, ids, AuditOptions(tokens=tokens, seq_len=seq_len, seed=seed), progress=False)
    return blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    blocks = audit_kan(args.layers, args.width, args.tokens, seed=args.seed)
    print(f"KAN-GPT2 at init: {args.layers} blocks, width {args.width}, {args.tokens} random tokens")
    print(f"{'block':>5} {'near-unit':>10} {'expansive':>10} {'radius':>8} {'eta_nl':>7} {'ResDMD kept':>12}")
    for b in blocks:
        print(f"{b.index:>5} {b.near_unit_mass:>10.4f} {b.expansive_mass:>10.4f} "
              f"{b.spectral_radius:>8.4f} {b.nonlinearity_ratio:>7.4f} {b.resdmd_kept:>12.3f}")
    m = sum(b.near_unit_mass for b in blocks) / len(blocks)
    print(f"near-unit mass M = {m:.4f}")


if __name__ == "__main__":
    main()
