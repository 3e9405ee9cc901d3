"""The paper's small GPT-2-style models and its two tasks (D.1, D.2; docs/method.md), in plain torch.

Tasks, seeded and generated on the fly: ``associative_recall`` (with
``RecallModel`` / ``RecallDataset``, last-position cross-entropy, for
``transformers.Trainer``) and the synthetic LM ``synthetic_lm`` (with
``LMModel`` / ``LMDataset``, next-token cross-entropy).

A nanoGPT-style decoder (learned positions, causal self-attention, GELU MLP
of width 4d, no dropout) with one of six normalizations, initialized the way
that reproduces the paper's Table 1 at init (docs/method.md, "What we
verified ourselves"): **every weight matrix and embedding drawn from N(0, 0.02^2), no
1/sqrt(2L) residual scaling, biases zero**, norm gains 1 and biases 0.

Residual blocks, ``f_a`` = attention sublayer, ``f_m`` = MLP sublayer:

    "pre"       x = x + f_a(LN(x));            x = x + f_m(LN(x))
    "rms"       as "pre" with RMSNorm (gain only, eps 1e-5)
    "post"      x = LN(x + f_a(x));            x = LN(x + f_m(x))
    "subln"     as "pre", plus a LayerNorm inside each sublayer before its output projection
                (Magneto / "sub-LN", Wang et al. 2022): f_a = W_o LN(attn(.)), f_m = W_2 LN(GELU(W_1 .))
    "deepnorm"  x = LN(alpha x + f_a(x));      x = LN(alpha x + f_m(x))      (DeepNet, Wang et al. 2022)
                alpha = (2L)^(1/4), and the DeepNet init: W_v, W_o, W_1, W_2 multiplied by
                beta = (8L)^(-1/4) after the N(0, 0.02^2) draw (L = number of blocks; the decoder-only
                formulas of DeepNet Table 1 with N = L)
    "none"      x = x + f_a(x);                x = x + f_m(x)

Variants (for the DeepNorm / SubLN rows of Table 1, which depend on details
the paper does not give) are switched by ``GPTConfig`` fields; the defaults
are the formulas above.  What they give against Table 1 (d 256, L 6, seeds 42/123/456,
benchmarks/paper_table1.py --variants): Pre-LN, Post-LN, RMSNorm and No-Norm
match; DeepNet's post-placed DeepNorm cannot (its output LayerNorm keeps every
block near-unit after block 0: M_~1 0.83, not 0.00), while the pre-placed
``deepnorm_placement="pre"`` (x = alpha x + f(LN(x)), every eigenvalue ~ alpha^2)
gives 0.00 / 1.00 / 3.61 (beta on v, o, fc, proj) or 3.88 (beta on o, proj);
Magneto SubLN matches the masses but not rho (5.6, block 0's inner LayerNorms
amplify the sublayers against the 0.028-scale embeddings).  A final norm (LayerNorm, RMSNorm for "rms", none for
"none"; ``final_norm=True`` puts a LayerNorm after No-Norm blocks too) and an LM head (tied to the token
embedding, as in GPT-2) follow.

``model.blocks`` is an ``nn.ModuleList`` whose members map the residual
stream (B, T, d) to the residual stream, so ``block_snapshots`` can take
X = block input and Y = block output with forward hooks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("pre", "post", "rms", "deepnorm", "subln", "none")


@dataclass
class GPTConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    seq_len: int = 64
    norm: str = "pre"
    init_std: float = 0.02
    #: GPT-2's 1/sqrt(2L) scaling of the residual output projections (off: the paper's Table 1 setting)
    residual_scaling: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # --- DeepNorm knobs (defaults: the DeepNet paper's decoder-only formulas) ---
    #: residual weight alpha; None -> (2L)^(1/4)
    deepnorm_alpha: float | None = None
    #: init scale beta; None -> (8L)^(-1/4)
    deepnorm_beta: float | None = None
    #: where the norm sits: "post" (x = LN(alpha x + f(x)), DeepNet) or "pre" (x = alpha x + f(LN(x)))
    deepnorm_placement: str = "post"
    # --- SubLN knobs ---
    #: gain on W_v, W_o, W_1, W_2 at init (Magneto uses sqrt(log 2L); 1.0 = plain N(0, 0.02^2))
    subln_gain: float = 1.0
    #: which sublayers get the inner LayerNorm: "both", "mlp" or "attn"
    subln_where: str = "both"
    #: the weights that DeepNorm's beta / SubLN's gain multiply: any of "v", "o", "fc", "proj"
    scaled_weights: tuple[str, ...] = ("v", "o", "fc", "proj")
    #: the norm before the LM head: None = the block norm's kind (none for "none"); True = that kind, or a
    #: LayerNorm for "none" (No-Norm blocks under a final LayerNorm, as GPT-2-style code keeps ln_f); False = none
    final_norm: bool | None = None

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.deepnorm_placement not in ("post", "pre"):
            raise ValueError(f"deepnorm_placement must be 'post' or 'pre', got {self.deepnorm_placement!r}")
        if self.subln_where not in ("both", "mlp", "attn"):
            raise ValueError(f"subln_where must be 'both', 'mlp' or 'attn', got {self.subln_where!r}")
        if not set(self.scaled_weights) <= {"v", "o", "fc", "proj"}:
            raise ValueError(f"scaled_weights must be among v, o, fc, proj, got {self.scaled_weights!r}")

    @property
    def alpha(self) -> float:
        """DeepNorm's residual weight (1 for every other norm)."""
        if self.norm != "deepnorm":
            return 1.0
        return self.deepnorm_alpha if self.deepnorm_alpha is not None else (2 * self.n_layers) ** 0.25

    @property
    def beta(self) -> float:
        """DeepNorm's init scale of W_v, W_o, W_1, W_2 (1 for every other norm)."""
        if self.norm != "deepnorm":
            return 1.0
        return self.deepnorm_beta if self.deepnorm_beta is not None else (8 * self.n_layers) ** -0.25


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_final_norm(cfg: GPTConfig) -> nn.Module:
    """The norm before the LM head (``GPTConfig.final_norm``)."""
    if cfg.final_norm is None:
        return make_norm(cfg)
    if not cfg.final_norm:
        return nn.Identity()
    return make_norm(cfg) if cfg.norm != "none" else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "none":
        return nn.Identity()
    if cfg.norm == "rms":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, inner_norm: bool):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.inner_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if inner_norm else nn.Identity()

    def forward(self, x):
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = (lin(x).view(b, t, h, d // h).transpose(1, 2) for lin in (self.q, self.k, self.v))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        z = z.transpose(1, 2).reshape(b, t, d)
        return self.o(self.inner_norm(z))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, inner_norm: bool):
        super().__init__()
        d = cfg.d_model
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.inner_norm = nn.LayerNorm(4 * d, eps=cfg.norm_eps) if inner_norm else nn.Identity()

    def forward(self, x):
        return self.proj(self.inner_norm(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One residual block: residual stream (B, T, d) -> residual stream (B, T, d)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.norm
        if cfg.norm == "deepnorm" and cfg.deepnorm_placement == "pre":
            self.kind = "deepnorm_pre"
        self.alpha = cfg.alpha
        sub = cfg.norm == "subln"
        self.attn = CausalSelfAttention(cfg, inner_norm=sub and cfg.subln_where in ("both", "attn"))
        self.mlp = MLP(cfg, inner_norm=sub and cfg.subln_where in ("both", "mlp"))
        self.norm1 = make_norm(cfg)
        self.norm2 = make_norm(cfg)

    def forward(self, x):
        if self.kind in ("post", "deepnorm"):  # x = LN(alpha x + f(x)); alpha = 1 for Post-LN
            x = self.norm1(self.alpha * x + self.attn(x))
            return self.norm2(self.alpha * x + self.mlp(x))
        # pre-norm family ("none" has identity norms): x = alpha x + f(N(x))
        x = self.alpha * x + self.attn(self.norm1(x))
        return self.alpha * x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_final_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def reset_parameters(self):
        """N(0, std^2) for every weight matrix and embedding, zero biases, unit norm gains; then DeepNet/SubLN gains."""
        cfg = self.cfg
        std = cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        gain = cfg.beta if cfg.norm == "deepnorm" else (cfg.subln_gain if cfg.norm == "subln" else 1.0)
        for blk in self.blocks:
            if gain != 1.0:
                named = {"v": blk.attn.v, "o": blk.attn.o, "fc": blk.mlp.fc, "proj": blk.mlp.proj}
                for name in cfg.scaled_weights:
                    named[name].weight.mul_(gain)
            if cfg.residual_scaling:
                for lin in (blk.attn.o, blk.mlp.proj):
                    lin.weight.mul_(1.0 / math.sqrt(2 * cfg.n_layers))

    def forward(self, input_ids):
        t = input_ids.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} > seq_len {self.cfg.seq_len}")
        x = self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm_f(x))


@torch.no_grad()
def block_snapshots(model: GPT, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass; for every block (X, Y) = (input, output) residual stream, each (N, d) with N = B*T."""
    snaps: list = [None] * len(model.blocks)

    def hook(i):
        def fn(module, args, output):
            x = args[0]
            d = x.shape[-1]
            snaps[i] = (x.reshape(-1, d).detach().clone(), output.reshape(-1, d).detach().clone())
        return fn

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(model.blocks)]
    try:
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return snaps


def associative_recall(batch: int, *, seed: int, n_pairs: int = 4, length: int = 64, vocab_size: int = 256
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """D.1 (docs/method.md): ``[k1, v1, ..., k_n, v_n, fillers..., q]`` and the value of q as the label.

    Per sequence (seeded, generated on the fly): n_pairs distinct keys and
    n_pairs values (independent, may repeat) drawn uniformly from the
    vocabulary, ``length - 2 n_pairs - 1`` filler tokens drawn uniformly from
    the vocabulary, and a query key chosen uniformly among the keys as the
    last token.  Returns ``input_ids`` (batch, length) and ``labels`` (batch,).
    """
    if length < 2 * n_pairs + 1:
        raise ValueError(f"length {length} < 2 * n_pairs + 1")
    if n_pairs > vocab_size:
        raise ValueError("n_pairs > vocab_size: keys cannot be distinct")
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(batch, vocab_size, generator=g).argsort(dim=1)[:, :n_pairs]  # distinct per row
    values = torch.randint(0, vocab_size, (batch, n_pairs), generator=g)
    fillers = torch.randint(0, vocab_size, (batch, length - 2 * n_pairs - 1), generator=g)
    which = torch.randint(0, n_pairs, (batch,), generator=g)
    rows = torch.arange(batch)
    query, labels = keys[rows, which], values[rows, which]
    pairs = torch.stack([keys, values], dim=2).reshape(batch, 2 * n_pairs)
    return torch.cat([pairs, fillers, query[:, None]], dim=1), labels


class RecallModel(nn.Module):
    """A GPT for the associative-recall task in ``transformers.Trainer`` form.

    ``forward(input_ids, labels)`` returns ``{"loss", "logits"}`` with the
    cross-entropy of the *last* position's logits against the recalled value
    (D.1; docs/method.md).  The blocks are at ``gpt.blocks`` (``KSSConfig(block_path="gpt.blocks")``).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gpt = GPT(cfg)

    def forward(self, input_ids, labels=None, **_):
        logits = self.gpt(input_ids)[:, -1]
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


class RecallDataset(torch.utils.data.Dataset):
    """``n`` associative-recall sequences, generated once from ``seed`` (no downloads)."""

    def __init__(self, n: int, *, seed: int, **task):
        self.input_ids, self.labels = associative_recall(n, seed=seed, **task)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


# --- The synthetic LM task (D.2; docs/method.md) -----------------------------------------------------------------

#: token ids below this are reserved (the paper draws every token from {10, ..., V - 1})
LM_FIRST_TOKEN = 10


def synthetic_lm_sequence(rng: random.Random, *, length: int = 256, vocab_size: int = 10_000) -> list[int]:
    """One sequence of the paper's D.2 (docs/method.md): segments concatenated until ``length`` tokens, then truncated.

    Each segment is, with equal probability, a *repetition* (a pattern of 2-5
    i.i.d. tokens repeated 2-4 times), a *sequential* run (5-15 consecutive
    integers) or a *random* run (5-15 i.i.d. tokens); every token lies in
    {10, ..., V - 1}.  The paper does not give the segment-type probabilities:
    uniform is **[ours]**.
    """
    lo, hi = LM_FIRST_TOKEN, vocab_size - 1
    if hi - lo < 15:
        raise ValueError(f"vocab_size {vocab_size} leaves fewer than 16 tokens above {LM_FIRST_TOKEN}")
    out: list[int] = []
    while len(out) < length:
        kind = rng.randrange(3)
        if kind == 0:
            pattern = [rng.randint(lo, hi) for _ in range(rng.randint(2, 5))]
            out.extend(pattern * rng.randint(2, 4))
        elif kind == 1:
            n = rng.randint(5, 15)
            start = rng.randint(lo, hi - n + 1)
            out.extend(range(start, start + n))
        else:
            out.extend(rng.randint(lo, hi) for _ in range(rng.randint(5, 15)))
    return out[:length]


def synthetic_lm(batch: int, *, seed: int, length: int = 256, vocab_size: int = 10_000, start: int = 0
                 ) -> torch.Tensor:
    """Sequences ``start .. start + batch - 1`` of the seeded synthetic LM stream, as (batch, length) ids.

    Sequence i depends only on (seed, i) (generated on the fly, no downloads), so a
    dataset can produce any item without generating the ones before it.
    """
    rows = [synthetic_lm_sequence(random.Random(_lm_item_seed(seed, start + i)), length=length,
                                  vocab_size=vocab_size) for i in range(batch)]
    return torch.tensor(rows, dtype=torch.long)


def _lm_item_seed(seed: int, i: int) -> int:
    return (seed * 1_000_003 + i) & 0xFFFFFFFFFFFF


class LMModel(nn.Module):
    """A GPT for the synthetic LM task in ``transformers.Trainer`` form.

    ``forward(input_ids, labels)`` returns ``{"loss", "logits"}`` with the
    next-token cross-entropy over positions 1..T-1 (``labels`` are the input ids
    themselves, shifted inside, as in ``transformers``' causal LMs).  Blocks at ``gpt.blocks``.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gpt = GPT(cfg)

    def forward(self, input_ids, labels=None, **_):
        logits = self.gpt(input_ids)
        out = {"logits": logits}
        if labels is not None:
            v = logits.shape[-1]
            out["loss"] = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), labels[:, 1:].reshape(-1))
        return out


class LMDataset(torch.utils.data.Dataset):
    """``n`` synthetic LM sequences of the stream ``seed``, each generated when it is read."""

    def __init__(self, n: int, *, seed: int, length: int = 256, vocab_size: int = 10_000):
        self.n, self.seed, self.length, self.vocab_size = n, seed, length, vocab_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        ids = synthetic_lm(1, seed=self.seed, length=self.length, vocab_size=self.vocab_size, start=i)[0]
        return {"input_ids": ids, "labels": ids}
