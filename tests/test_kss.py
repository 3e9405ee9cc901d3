"""Koopman Spectral Shaping: the soft spectral loss, KSSTrainer and RKSPMonitorCallback."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from hf_rksp.models.blocks import find_blocks
from hf_rksp.pipeline.options import AuditOptions
from hf_rksp.pipeline.run import profile_model
from hf_rksp.spectral import differentiable_eigenvalues, kss_penalty
from hf_rksp.training.kss import KSSConfig as _KSSConfig
from hf_rksp.training.kss import LayerKSS, SnapshotSampler, layer_kss

VOCAB = 256


def tiny_lm(family: str, no_norm: bool = False, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
                                       bos_token_id=0, eos_token_id=0))
        if no_norm:
            for b in m.transformer.h:
                b.ln_1, b.ln_2 = nn.Identity(), nn.Identity()
            m.transformer.ln_f = nn.Identity()
    else:
        m = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         max_position_embeddings=128))
        if no_norm:
            for b in m.model.layers:
                b.input_layernorm, b.post_attention_layernorm = nn.Identity(), nn.Identity()
            m.model.norm = nn.Identity()
    return m


class Tokens(Dataset):
    def __init__(self, n=64, t=64, seed=0):
        self.x = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def targs(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=8,
                logging_steps=5, save_strategy="no", disable_tqdm=True, seed=0, learning_rate=1e-3)
    base.update(kw)
    return TrainingArguments(**base)


def model_profile(model):
    ids = torch.randint(0, VOCAB, (4, 128), generator=torch.Generator().manual_seed(5))
    blocks, _, _ = profile_model(model, ids, AuditOptions(tokens=512, seq_len=128, batch_size=4), progress=False)
    return (sum(b.near_unit_mass for b in blocks) / len(blocks), max(b.spectral_radius for b in blocks))


# -- the spectral core pieces KSS uses ---------------------------------------------------------

def test_core_operator_is_differentiable_with_a_detached_basis():
    """KSS's operator is the audit's (hf_rksp.spectral): gradients reach the snapshots, the whitening
    basis V does not carry any (X's Gram and the whitening matrix do), and its value is the audit's."""
    from hf_rksp.spectral import dmd_operator, eigen, whiten

    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 32, dtype=torch.float64, generator=g).requires_grad_()
    y = (x.detach() @ torch.randn(32, 32, dtype=torch.float64, generator=g) / 6).requires_grad_()
    wh = whiten(x, y)
    assert wh.s.requires_grad is False and wh.basis.requires_grad is False
    op = dmd_operator(wh, 16, generator=torch.Generator().manual_seed(0))
    assert op.matrix.shape == (16, 16)
    op.matrix.sum().backward()
    assert x.grad is not None and y.grad is not None and torch.isfinite(x.grad).all()
    ref = dmd_operator(whiten(x.detach(), y.detach()), 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eigen(ref)[0], torch.linalg.eigvals(op.matrix.detach()))


# -- eigenvalue gradients (hf_rksp.spectral.differentiable_eigenvalues) ---------------------------

def _loss_of(a: torch.Tensor) -> torch.Tensor:
    s = differentiable_eigenvalues(a)
    return kss_penalty(s.eigenvalues)


def _central_fd(a0: torch.Tensor, direction: torch.Tensor, h: float) -> float:
    """Five-point central difference (truncation error O(h^4))."""
    with torch.no_grad():
        f = [float(_loss_of(a0 + k * h * direction)) for k in (-2, -1, 1, 2)]
    return (f[0] - 8 * f[1] + 8 * f[2] - f[3]) / (12 * h)


def test_eigenvalue_gradient_equals_torch_eig_backward():
    """V^-H diag(g) V^H from the forward's own decomposition = torch.linalg.eigvals' backward (1e-10:
    the same formula, different solves)."""
    a = (torch.randn(24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 5)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    _loss_of(a1).backward()
    kss_penalty(torch.linalg.eigvals(a2)).backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-2, 1e-4])
def test_near_identity_operator_gradient_matches_finite_differences(scale):
    """A = 0.97 I + scale R, all 32 eigenvalues within `scale` of each other (no-norm blocks at init):
    eigenvector derivatives blow up like 1/scale, eigenvalue derivatives do not; the gradient is finite
    and equals a five-point central difference along random directions (1e-5 relative: h = 3e-4 scale
    keeps h ||E|| / gap ~ 0.01 for eigenvalue gaps ~0.3 scale, so the truncation error is ~1e-8; the
    eigenvalues' rounding, ~1e-14 each, costs ~1e-6 after dividing by h)."""
    g = torch.Generator().manual_seed(1)
    a0 = 0.97 * torch.eye(32, dtype=torch.float64) + scale * torch.randn(32, 32, dtype=torch.float64, generator=g)
    a = a0.clone().requires_grad_()
    s = differentiable_eigenvalues(a)
    assert s.differentiable and s.condition < 1e3
    kss_penalty(s.eigenvalues).backward()
    assert torch.isfinite(a.grad).all() and float(a.grad.abs().sum()) > 0
    for _ in range(3):
        e = torch.randn(32, 32, dtype=torch.float64, generator=g)
        assert float((a.grad * e).sum()) == pytest.approx(_central_fd(a0, e, 3e-4 * scale), rel=1e-5)


def test_jordan_block_is_skipped_with_a_finite_gradient():
    """An exact Jordan block: the eigenvalue is not differentiable there (a perturbation eps of the corner
    moves the 4 eigenvalues by eps^(1/4), the loss by ~eps^(1/2): the one-sided difference quotient grows
    as h shrinks), so no gradient is defined; the layer is flagged (condition above max_condition) and the
    gradient is finite (zero).  Pulled apart (diagonal 1, 1.2, 1.4, 1.6 on the same Jordan chain) the
    eigenvalues are well enough conditioned and the gradient equals a central difference (1e-6 relative)."""
    n = 4
    jordan = torch.eye(n, dtype=torch.float64) + torch.diag(torch.ones(n - 1, dtype=torch.float64), 1)
    a = jordan.clone().requires_grad_()
    s = differentiable_eigenvalues(a)
    assert not s.differentiable and s.condition > 1e4 and s.eigenvalues.requires_grad is False
    loss = kss_penalty(s.eigenvalues)
    assert loss.requires_grad is False  # nothing flows: the caller skips the layer
    corner = torch.zeros(n, n, dtype=torch.float64)
    corner[-1, 0] = 1.0
    with torch.no_grad():
        quotients = [abs(float(_loss_of(jordan + h * corner) - _loss_of(jordan))) / h for h in (1e-4, 1e-6, 1e-8)]
    assert quotients[0] < quotients[1] < quotients[2] and quotients[2] > 30 * quotients[0]

    apart = jordan + torch.diag(torch.arange(n, dtype=torch.float64) * 0.2)
    a = apart.clone().requires_grad_()
    s = differentiable_eigenvalues(a)
    assert s.differentiable and s.condition < 1e3
    kss_penalty(s.eigenvalues).backward()
    assert torch.isfinite(a.grad).all()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        e = torch.randn(n, n, dtype=torch.float64, generator=g)
        assert float((a.grad * e).sum()) == pytest.approx(_central_fd(apart, e, 1e-6), rel=1e-6)


def test_layer_kss_gradient_on_a_no_norm_block_at_init_matches_finite_differences():
    """The whole KSS path (whitening -> rank-32 randomized DMD -> eigenvalues -> Eq. 14) on a no-norm
    block of the paper's model at init (near-identity: the update is ~2% of the stream), differentiated
    into the block's own weights.  Those weights change Y only, and everything detached (whitening basis,
    Hb, random basis) depends on X only, so the gradient is exact there: it equals a central difference
    (1e-5 relative, h = 1e-5)."""
    from benchmarks.paper_models import GPT, GPTConfig, associative_recall
    from hf_rksp.training.kss import KSSConfig, layer_kss

    torch.manual_seed(42)
    model = GPT(GPTConfig(norm="none", d_model=64, n_layers=2, n_heads=4)).double()
    ids, _ = associative_recall(8, seed=42)
    with torch.no_grad():
        x = (model.wte(ids) + model.wpe(torch.arange(ids.shape[1]))).detach()
    block = model.blocks[0]
    w = block.mlp.proj.weight
    cfg = KSSConfig()

    def loss() -> LayerKSS:
        y = block(x)
        return layer_kss(x.reshape(-1, 64), y.reshape(-1, 64), cfg, generator=torch.Generator().manual_seed(0))

    r = loss()
    assert not r.skipped and r.rank == 32
    with torch.no_grad():
        assert float((block(x) - x).norm() / x.norm()) < 0.1  # near-identity
    (grad,) = torch.autograd.grad(r.loss, w)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    e = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    h = 1e-5
    with torch.no_grad():
        w.add_(h * e)
        up = float(loss().loss)
        w.sub_(2 * h * e)
        down = float(loss().loss)
        w.add_(h * e)
    assert float((grad * e).sum()) == pytest.approx((up - down) / (2 * h), rel=1e-5)


# -- the loss on real blocks -------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["embedding_scale", "embedding_random", "block0_random"])
def test_kss_gradient_upstream_of_the_block_matches_finite_differences(direction):
    """Upstream parameters (embeddings, earlier blocks) change X, hence the whitening: the gradient there
    is exact only because X's Gram and the whitening matrix are in the graph (whitening.py, Gradients).
    Full DMD (rank > d), so no random basis is involved; the loss of block 1 of a no-norm model at init,
    in float64, against a central difference (h = 1e-5; 1e-4 relative: the difference's truncation error
    is ~1e-8, what is left is block 0's input having rank k < d, where range(X~)'s rotation is not followed).
    The first KSS (whitening detached) got the scale direction wrong by a factor of ~1e6: it asked the
    stream to shrink, which changes nothing in the real operator."""
    from benchmarks.paper_models import GPT, GPTConfig, associative_recall
    from hf_rksp.training.kss import KSSConfig, layer_kss

    torch.manual_seed(42)
    model = GPT(GPTConfig(norm="none", d_model=32, n_layers=2, n_heads=2)).double()
    ids, _ = associative_recall(8, seed=42)
    cfg = KSSConfig(rank=64, subsample=400)

    def loss() -> torch.Tensor:
        h = model.wte(ids) + model.wpe(torch.arange(ids.shape[1]))
        x = model.blocks[0](h)
        y = model.blocks[1](x)
        return layer_kss(x.reshape(-1, 32), y.reshape(-1, 32), cfg).loss

    g = torch.Generator().manual_seed(5)
    params = {"embedding_scale": [model.wte.weight, model.wpe.weight],
              "embedding_random": [model.wte.weight, model.wpe.weight],
              "block0_random": [p for p in model.blocks[0].parameters() if p.ndim == 2]}[direction]
    dirs = [p.detach().clone() if direction == "embedding_scale" else
            torch.randn(p.shape, dtype=torch.float64, generator=g) * 0.02 for p in params]
    grads = torch.autograd.grad(loss(), params)
    analytic = sum(float((gr * e).sum()) for gr, e in zip(grads, dirs))
    h = 1e-5
    with torch.no_grad():
        for p, e in zip(params, dirs):
            p.add_(h * e)
        up = float(loss())
        for p, e in zip(params, dirs):
            p.sub_(2 * h * e)
        down = float(loss())
        for p, e in zip(params, dirs):
            p.add_(h * e)
    assert analytic == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-9)

@pytest.mark.parametrize("family,no_norm", [("gpt2", False), ("llama", False), ("gpt2", True), ("llama", True)])
def test_kss_loss_gradients_reach_block_weights(family, no_norm):
    model = tiny_lm(family, no_norm).train()
    _, blocks = find_blocks(model)
    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    with SnapshotSampler(list(blocks), 128, torch.Generator().manual_seed(0)) as s:
        model(input_ids=ids)
    losses = [layer_kss(x, y, _KSSConfig(), generator=torch.Generator().manual_seed(0)) for x, y in s.pairs()]
    assert not any(r.skipped for r in losses)
    torch.stack([r.loss for r in losses]).mean().backward()
    for b in blocks:
        grads = [p.grad for p in b.parameters() if p.requires_grad]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert sum(float(gr.abs().sum()) for gr in grads) > 0
    assert all(0 <= r.near_unit_mass <= 1 and r.rank == 32 and math.isfinite(float(r.loss.detach())) for r in losses)


def test_no_norm_high_lr_training_stays_finite(tmp_path):
    from hf_rksp import KSSConfig, KSSTrainer

    model = tiny_lm("gpt2", no_norm=True)
    tr = KSSTrainer(model=model, args=targs(tmp_path, max_steps=8, learning_rate=3e-2, max_grad_norm=0.0),
                    train_dataset=Tokens(), kss_config=KSSConfig(alpha=1.0, every_n_steps=1))
    tr.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    kss_logs = [h for h in tr.state.log_history if "kss/loss" in h]
    assert kss_logs and all(math.isfinite(h["kss/loss"]) for h in kss_logs)


# -- KSSTrainer --------------------------------------------------------------------------------

def kss_view(model, cfg) -> tuple[float, float, float]:
    """What KSS sees on a fixed batch: mean hard near-unit mass, expansive mass and L_l over every block's
    rank-32 operator (no grad, fixed seeds)."""
    _, blocks = find_blocks(model)
    ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(5))
    was = model.training
    model.eval()
    with torch.no_grad(), SnapshotSampler(list(blocks), cfg.subsample, torch.Generator().manual_seed(0)) as s:
        model(input_ids=ids)
    model.train(was)
    rs = [layer_kss(x, y, cfg, generator=torch.Generator().manual_seed(i)) for i, (x, y) in enumerate(s.pairs())]
    n = len(rs)
    return (sum(r.near_unit_mass for r in rs) / n, sum(r.expansive_mass for r in rs) / n,
            sum(float(r.loss) for r in rs) / n)


@pytest.mark.support("KSS")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kss_on_moves_spectrum_in_the_intended_direction(family, tmp_path):
    """Same seed, data and steps on a no-norm model (near-unit mass far above gamma at init): with KSS on
    (alpha 1, every step, lr 3e-3), the KSS loss of every block on a fixed batch ends lower than with KSS
    off, and the expansive mass no higher.  (How the near-unit mass moves under the defaults is measured
    in benchmarks/paper_repro.py's runs: M_~1 at the end of training.)"""
    from hf_rksp import KSSConfig, KSSTrainer

    STEPS = 40
    out = {}
    for mode in ("off", "on"):
        model = tiny_lm(family, no_norm=True)
        cfg = KSSConfig(mode=mode, alpha=1.0, every_n_steps=1)
        tr = KSSTrainer(model=model, args=targs(tmp_path / mode, max_steps=STEPS, learning_rate=3e-3),
                        train_dataset=Tokens(), kss_config=cfg)
        tr.train()
        out[mode] = kss_view(model, cfg)
        keys = {k for h in tr.state.log_history for k in h}
        if mode == "on":
            assert {"kss/loss", "kss/near_unit_mass", "kss/soft_near_unit_mass", "kss/expansive_mass",
                    "kss/spectral_radius", "kss/alpha", "kss/layers_skipped"} <= keys
            assert tr.kss_state.kss_steps == STEPS and tr.kss_state.layers_evaluated == STEPS  # 50% of 2 blocks
        else:
            assert not any(k.startswith("kss/") for k in keys)
    assert out["on"][2] < out["off"][2], out
    assert out["on"][1] <= out["off"][1], out


def test_checkpoint_resume_keeps_kss_state(tmp_path):
    from hf_rksp import KSSConfig, KSSTrainer
    from hf_rksp.training.trainer import KSS_STATE_NAME

    cfg = KSSConfig(alpha=0.5, every_n_steps=2, warmup_steps=2)
    full = KSSTrainer(model=tiny_lm("gpt2"), args=targs(tmp_path / "a", max_steps=6, save_strategy="steps",
                                                        save_steps=3), train_dataset=Tokens(), kss_config=cfg)
    full.train()
    s3 = json.loads((tmp_path / "a" / "checkpoint-3" / KSS_STATE_NAME).read_text())
    s6 = json.loads((tmp_path / "a" / "checkpoint-6" / KSS_STATE_NAME).read_text())
    assert s3["config"] == cfg.to_dict()
    assert s3["state"]["kss_steps"] == 2 and s6["state"]["kss_steps"] == 3  # steps 0, 2 | 4

    resumed = KSSTrainer(model=tiny_lm("gpt2"), args=targs(tmp_path / "a", max_steps=6, save_strategy="no"),
                         train_dataset=Tokens())  # no kss_config: taken from the checkpoint
    assert resumed.load_kss_state(str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.kss_config == cfg and resumed.kss_state.kss_steps == 2
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.kss_state.kss_steps == s6["state"]["kss_steps"]
    assert resumed.kss_state.evaluations == s6["state"]["evaluations"]


def test_gradient_accumulation_and_bf16(tmp_path):
    from hf_rksp import KSSConfig, KSSTrainer

    tr = KSSTrainer(model=tiny_lm("llama"), args=targs(tmp_path, max_steps=2, gradient_accumulation_steps=2,
                                                       per_device_train_batch_size=4, bf16=True, logging_steps=1),
                    train_dataset=Tokens(), kss_config=KSSConfig(alpha=1.0, every_n_steps=1))
    tr.train()
    assert tr.kss_state.kss_steps == 2 and tr.kss_state.evaluations == 4
    assert all(math.isfinite(h["kss/loss"]) for h in tr.state.log_history if "kss/loss" in h)


def test_config_validation_and_schedule():
    from hf_rksp import KSSConfig

    c = KSSConfig(alpha=2.0, warmup_steps=4, decay="linear", decay_steps=10)
    assert c.schedule(0, 100) == pytest.approx(0.5)
    assert c.schedule(3, 100) == pytest.approx(2.0)
    assert c.schedule(9, 100) == pytest.approx(2.0 * 0.5)
    assert c.schedule(20, 100) == 0.0
    cos = KSSConfig(alpha=1.0, decay="cosine")
    assert cos.schedule(50, 100) == pytest.approx(0.5)
    assert KSSConfig.from_dict(c.to_dict()) == c


# -- RKSPMonitorCallback -----------------------------------------------------------------------

@pytest.mark.trainers("Trainer|full|1|monitor")
def test_monitor_callback_with_plain_trainer(tmp_path, caplog):
    from transformers import Trainer

    from hf_rksp import RKSPMonitorCallback

    ids = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(9))
    mon = RKSPMonitorCallback(ids, every_n_steps=3, max_spectral_radius=0.5)  # every profile passes it
    tr = Trainer(model=tiny_lm("gpt2"), args=targs(tmp_path, max_steps=6, logging_steps=100),
                 train_dataset=Tokens(), callbacks=[mon])
    with caplog.at_level(logging.WARNING, logger="hf_rksp"):
        tr.train()
    assert [h["step"] for h in mon.history] == [0, 3, 6]
    logged = [h for h in tr.state.log_history if "rksp/near_unit_mass" in h]
    assert [h["step"] for h in logged] == [3, 6]
    assert all(0 <= h["rksp/near_unit_mass"] <= 1 for h in logged)
    assert any("spectral radius" in r.getMessage() for r in caplog.records)


def test_sampler_takes_the_same_non_padding_positions_in_every_block():
    model = tiny_lm("gpt2").eval()
    _, blocks = find_blocks(model)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[:, 10:] = 0
    with SnapshotSampler(list(blocks), 100, torch.Generator().manual_seed(0), mask.reshape(-1).bool()) as s:
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    valid = mask.reshape(-1).bool()
    (x0, y0), (x1, _) = s.pairs()
    assert x0.shape[0] == int(valid.sum()) == 20
    torch.testing.assert_close(x0, hs[0].reshape(-1, 64)[valid])
    torch.testing.assert_close(x1, y0)


@pytest.mark.support("KSS")
@pytest.mark.parametrize("model_type,kw", [
    ("mixtral", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)),
    ("mamba", dict(hidden_size=64, num_hidden_layers=2, state_size=8)),
])
def test_kss_trains_moe_and_ssm_families(model_type, kw, tmp_path):
    """KSS works beyond dense attention: a few steps on tiny Mixtral (MoE) and Mamba (SSM) models."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_rksp import KSSConfig, KSSTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, vocab_size=VOCAB, max_position_embeddings=128, **kw))
    tr = KSSTrainer(model=model, args=targs(tmp_path, max_steps=3, logging_steps=1), train_dataset=Tokens(n=24),
                    kss_config=KSSConfig(mode="on", alpha=1.0, every_n_steps=1))
    tr.train()
    logs = [h for h in tr.state.log_history if "kss/loss" in h]
    assert logs and all(math.isfinite(h["kss/loss"]) and h["kss/loss"] > 0 for h in logs)
    assert tr.kss_state.kss_steps == 3
    # the KSS loss alone reaches every block (MoE: only routed experts get gradient, so per block)
    model.zero_grad()
    _, blocks = find_blocks(model)
    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    with SnapshotSampler(list(blocks), 128, torch.Generator().manual_seed(0)) as s:
        model(input_ids=ids)
    torch.stack([layer_kss(x, y, _KSSConfig()).loss for x, y in s.pairs()]).mean().backward()
    for b in blocks:
        grads = [p.grad for p in b.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.trainers("Trainer|full|1|auto")
@pytest.mark.parametrize("score,kappa,lr,no_norm,expect_on", [
    (0.6, 50.0, 1e-4, False, True),  # M > 0.5
    (0.2, 50.0, 1.0, False, False),  # M < 0.3, modest kappa: off whatever the lr
    (0.2, 1e5, 1e-4, False, True),  # large kappa
    (0.2, None, 1e-4, False, True),  # kappa infinite (a singular V)
    (0.4, 50.0, 1e-4, False, False),  # in between, normalized, default lr
    (0.4, 50.0, 2e-3, False, True),  # in between, lr > 2x the family default (gpt2: 6e-4)
    (0.4, 50.0, 1e-4, True, True),  # in between, no normalization
])
def test_auto_mode_follows_the_papers_decision_rule(tmp_path, monkeypatch, score, kappa, lr, no_norm, expect_on):
    """mode="auto" profiles the model before step 1 and applies the paper's Fig. 7 flow (no v2 risk model
    ships yet).  The profile is stubbed to a given M and mean kappa, so every branch is exercised."""
    from hf_rksp import KSSConfig, KSSTrainer
    from hf_rksp.record.records import Aggregate, SummaryRecord
    from hf_rksp.training import trainer

    def agg(mean=None, max=None):
        return Aggregate(mean=mean, max=max, min=None, std=None, n=2, early=None, middle=None, late=None)

    def fake_profile(model, ids, options):
        feats = {"spectral_radius": agg(max=1.5), "eigvec_condition": agg(mean=kappa)}
        return SummaryRecord(score=score, features=feats, spectral_radius_max_block=0, flagged_blocks={}), 2

    monkeypatch.setattr(trainer, "profile_summary", fake_profile)
    model = tiny_lm("gpt2", no_norm=no_norm)
    assert trainer.has_normalization(model) is not no_norm
    tr = KSSTrainer(model=model, args=targs(tmp_path, max_steps=2, learning_rate=lr, logging_steps=1),
                    train_dataset=Tokens(), kss_config=KSSConfig(mode="auto", every_n_steps=1))
    tr.train()
    auto = tr.kss_state.auto
    assert auto["enabled"] is expect_on and auto["lr"] == lr and auto["near_unit_mass"] == score
    assert auto["normalized"] is not no_norm and auto["reason"]
    assert (tr.kss_state.kss_steps > 0) is expect_on
    assert tr.kss_state_dict()["state"]["auto"] == auto  # saved with checkpoints, kept on resume


@pytest.mark.parametrize("clip,ratio,warned", [(0.0, None, True), (1.0, None, False), (0.0, 1.0, False)])
def test_kss_without_any_gradient_bound_warns(tmp_path, caplog, clip, ratio, warned):
    """KSS with neither clipping nor max_grad_ratio warns before training (its gradient is unbounded after a
    loss spike); the Trainer's default clipping, or a ratio bound, is silent."""
    from hf_rksp import KSSConfig, KSSTrainer

    tr = KSSTrainer(model=tiny_lm("gpt2", no_norm=True), args=targs(tmp_path, max_steps=1, max_grad_norm=clip),
                    train_dataset=Tokens(), kss_config=KSSConfig(mode="on", every_n_steps=1, max_grad_ratio=ratio))
    with caplog.at_level(logging.WARNING, logger="hf_rksp"):
        tr.train()
    assert any("without gradient clipping" in r.getMessage() for r in caplog.records) is warned


@pytest.mark.parametrize("kwargs,param", [
    ({"alpha": -0.1}, "alpha"), ({"gamma": 1.5}, "gamma"), ({"gamma": -0.1}, "gamma"),
    ({"tau_l": 1.05, "tau_u": 1.05}, "tau_l"), ({"tau_l": 0.9, "tau_u": 0.95}, "tau_l"), ({"rank": 1}, "rank"),
    ({"every_n_steps": 0}, "every_n_steps"), ({"layer_fraction": 0.0}, "layer_fraction"),
    ({"subsample": 32}, "subsample"), ({"T": 0.0}, "T"), ({"beta": -1.0}, "beta"), ({"alpha": math.nan}, "alpha"),
    ({"mode": "maybe"}, "mode"), ({"terms": "all"}, "terms"), ({"max_grad_ratio": 0.0}, "max_grad_ratio"), ({"auto_threshold": 1.5}, "auto_threshold"), ({"decay": "exp"}, "decay"),
])
def test_bad_kss_config_raises_one_clear_error(kwargs, param):
    from hf_rksp import KSSConfig
    from hf_rksp.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        KSSConfig(**kwargs)
    text = str(e.value)
    assert e.value.param == param and text.startswith(f"`{param}`") and text.endswith("(KSSConfig)") and "\n" not in text


def test_kss_defaults_are_the_papers():
    from hf_rksp import KSSConfig

    c = KSSConfig()
    assert (c.alpha, c.every_n_steps, c.layer_fraction, c.rank, c.T, c.tau_u, c.tau_l) == \
        (0.15, 10, 0.5, 32, 20.0, 1.05, 0.90)
    assert 0.3 <= c.gamma <= 0.5


def test_ablation_terms_are_the_two_halves_of_eq_14():
    from hf_rksp import KSSConfig

    lam = torch.tensor([0.5 + 0.2j, 0.95, -1.02 + 0.1j, 1.2 - 0.3j], dtype=torch.complex128)
    both, unstable, near = (float(KSSConfig(terms=t).penalty(lam)) for t in ("both", "unstable", "near_unit"))
    assert both == pytest.approx(unstable + near, rel=1e-12) and unstable > 0 and near > 0
    assert both == pytest.approx(float(kss_penalty(lam)), rel=1e-12)


def test_layer_draw_is_seeded_and_half():
    from hf_rksp.training.kss import select_layers

    draws = [select_layers(12, 0.5, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(len(d) == 6 and d == sorted(set(d)) for d in draws)
    assert draws[0] == select_layers(12, 0.5, torch.Generator().manual_seed(0))
    assert len({tuple(d) for d in draws}) > 10
    assert select_layers(1, 0.5, torch.Generator().manual_seed(0)) == [0]


def test_measured_gradient_norms_split_the_total(tmp_path):
    """measure_grad_norms: on a KSS step the task gradient's norm and alpha * grad L_KSS's norm are logged;
    the Trainer's total gradient norm (no clipping, no accumulation) lies between their difference and
    their sum, and measuring changes nothing in training."""
    from benchmarks.paper_models import GPTConfig, RecallDataset, RecallModel
    from hf_rksp import KSSConfig, KSSTrainer

    logs = {}
    for measure in (False, True):
        torch.manual_seed(0)
        model = RecallModel(GPTConfig(norm="none", d_model=64, n_layers=2, n_heads=4))
        cfg = KSSConfig(every_n_steps=1, block_path="gpt.blocks", measure_grad_norms=measure)
        tr = KSSTrainer(model=model, args=targs(tmp_path / str(measure), max_steps=2, logging_steps=1,
                                                max_grad_norm=0.0),
                        train_dataset=RecallDataset(64, seed=0), kss_config=cfg)
        tr.train()
        logs[measure] = [h for h in tr.state.log_history if "loss" in h and "grad_norm" in h]
    assert [h["loss"] for h in logs[True]] == [h["loss"] for h in logs[False]]
    for h in logs[True]:
        task, kss, total = h["kss/task_grad_norm"], h["kss/grad_norm"], h["grad_norm"]
        assert task > 0 and kss > 0
        assert abs(task - kss) * (1 - 1e-4) <= total <= (task + kss) * (1 + 1e-4)
    assert not any("kss/task_grad_norm" in h for h in logs[False])


def test_max_grad_ratio_bounds_the_kss_gradient(tmp_path):
    """max_grad_ratio (ours): the KSS term is scaled so that its gradient's norm is at most ratio x the task
    gradient's: the total gradient norm then stays within (1 + ratio) x the task gradient's."""
    from benchmarks.paper_models import GPTConfig, RecallDataset, RecallModel
    from hf_rksp import KSSConfig, KSSTrainer

    torch.manual_seed(0)
    model = RecallModel(GPTConfig(norm="none", d_model=64, n_layers=2, n_heads=4))
    cfg = KSSConfig(every_n_steps=1, block_path="gpt.blocks", max_grad_ratio=0.5)
    tr = KSSTrainer(model=model, args=targs(tmp_path, max_steps=2, logging_steps=1, max_grad_norm=0.0),
                    train_dataset=RecallDataset(64, seed=0), kss_config=cfg)
    tr.train()
    logs = [h for h in tr.state.log_history if "grad_norm" in h and "kss/grad_scale" in h]
    assert len(logs) == 2
    for h in logs:
        assert 0 < h["kss/grad_scale"] < 1  # at init the KSS gradient is far larger than the task's
        assert h["grad_norm"] <= 1.5 * h["kss/task_grad_norm"] * (1 + 1e-4)


def test_kss_step_is_the_documented_draw_and_bounds_its_gradient():
    """KSSStep (what KSSTrainer and the benchmarks call) against the pieces assembled by hand.

    The term must equal alpha * mean L_l over the blocks and positions its docstring says it draws, to
    1e-12 (the same float64 computation on the same snapshots: only summation order could differ), and with
    max_grad_ratio the term's gradient norm must be at most ratio x the task's (1e-6 relative: a rescaling,
    measured again through float32 parameter gradients).
    """
    from hf_rksp.models.init import group_seed
    from hf_rksp.training.kss import KSSStep, select_layers

    model = tiny_lm("gpt2", no_norm=True).eval()  # no dropout: the two forwards see the same stream
    _, blocks = find_blocks(model)
    blocks = list(blocks) * 2  # 4 entries, so the draw of 50% is a real choice
    cfg = _KSSConfig(seed=7, subsample=96)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    with KSSStep(blocks, cfg, step=20, micro=3) as k:
        loss = model(input_ids=ids, labels=ids).loss
    out = k.result(loss, 0.15)

    chosen = select_layers(4, cfg.layer_fraction, torch.Generator().manual_seed(group_seed(7, 20)))
    gen = torch.Generator().manual_seed(group_seed(8, 20 * 1009 + 3))
    with SnapshotSampler([blocks[i] for i in chosen], 96, gen) as s:
        model(input_ids=ids)
    ref = [layer_kss(x, y, cfg, generator=torch.Generator().manual_seed(group_seed(9, 20 * 1009 + i)))
           for i, (x, y) in zip(chosen, s.pairs())]
    assert out.chosen == chosen and len(out.layers) == len(chosen) == 2
    want = 0.15 * torch.stack([r.loss for r in ref if not r.skipped]).mean()
    term, want = float(out.term.detach()), float(want.detach())
    assert abs(term - want) <= 1e-12 * max(1.0, abs(want))

    params = [p for p in model.parameters() if p.requires_grad]
    bounded = _KSSConfig(seed=7, subsample=96, max_grad_ratio=1e-3)
    with KSSStep(blocks, bounded, step=20) as k:
        loss = model(input_ids=ids, labels=ids).loss
    out = k.result(loss, 0.15, params)
    grads = torch.autograd.grad(out.term, params, allow_unused=True)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    assert 0 < out.grad_norms["kss/grad_scale"] < 1
    assert norm <= 1e-3 * out.grad_norms["kss/task_grad_norm"] * (1 + 1e-6)
    with pytest.raises(ValueError, match="parameters"):
        with KSSStep(blocks, bounded, step=20) as k:
            loss = model(input_ids=ids, labels=ids).loss
        k.result(loss, 0.15)


def test_pod_sketch_kss_reaches_the_block_and_is_recorded():
    """KSSConfig(sketch="pod"): the loss of a rank-8 POD sketch is finite and its gradient reaches the block
    (the POD basis, like V, is a detached function of the snapshots); the setting survives a checkpoint."""
    from benchmarks.paper_models import GPT, GPTConfig, associative_recall
    from hf_rksp.training.kss import KSSConfig, layer_kss

    torch.manual_seed(0)
    model = GPT(GPTConfig(norm="none", d_model=32, n_layers=1, n_heads=2))
    ids, _ = associative_recall(8, seed=0)
    cfg = KSSConfig(rank=8, subsample=256, sketch="pod")
    with SnapshotSampler(list(model.blocks), 256, torch.Generator().manual_seed(0)) as s:
        model(ids)
    (x, y), = s.pairs()
    out = layer_kss(x, y, cfg)
    assert out.rank == 8 and not out.skipped and math.isfinite(float(out.loss.detach()))
    out.loss.backward()
    grads = [p.grad for p in model.blocks[0].parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert KSSConfig.from_dict(cfg.to_dict()).sketch == "pod"
    with pytest.raises(ValueError, match="sketch"):
        KSSConfig(sketch="svd")
