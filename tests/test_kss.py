"""Koopman Spectral Shaping: the soft spectral loss, KSSTrainer and RKSPMonitorCallback."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from hf_rksp.audit import AuditOptions, profile_model
from hf_rksp.blocks import find_blocks
from hf_rksp.kss import SnapshotSampler, block_kss_loss, choose_rotation, soft_count

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
    return (sum(b["near_unit_mass"] for b in blocks) / len(blocks), max(b["spectral_radius"] for b in blocks))


# -- the spectral core pieces KSS uses ---------------------------------------------------------

def test_core_operator_is_differentiable_with_stop_gradient_whitening():
    """KSS's operator is the audit's (hf_rksp.spectral): gradients reach the snapshots, the whitening
    basis does not carry any, and under no_grad it is the audit's operator exactly."""
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


def _hard_symmetric(ev, delta):
    """v1 KSS's hard counts: share of |lambda| within delta of 1, and above 1 + delta."""
    mod = ev.abs()
    return {"near_unit_mass": float(((mod - 1).abs() <= delta).double().mean()),
            "outside_mass": float((mod > 1 + delta).double().mean())}


# -- the soft counts ---------------------------------------------------------------------------

def _step_error_bound(ev, radius, nodes, theta):
    """Per-eigenvalue bound on |Re f(lambda) - 1[|lambda| < radius]|: min(q/(1-q), 1 + 1/|1 - w|)."""
    w = (ev / radius) ** nodes * complex(math.cos(-2 * math.pi * theta), math.sin(-2 * math.pi * theta))
    q = torch.minimum(w.abs(), 1 / w.abs())
    tail = torch.where(q < 1, q / (1 - q), torch.full_like(q, float("inf")))
    return torch.minimum(tail, 1 + 1 / (1 - w).abs())


@pytest.mark.parametrize("nodes", [32, 128])
def test_soft_counts_agree_with_hard_counts(nodes):
    """tr of the contour quadrature equals sum_i 1/(1 - w_i) (identity, 1e-8), and the soft masses
    differ from the hard masses by no more than the analytic per-eigenvalue bound
    (each term's error is <= q/(1-q), q = exp(-M |ln |lambda|/rho|)); on average by < 0.03 at M = 128."""
    g = torch.Generator().manual_seed(0)
    r, delta, errs = 64, 0.05, []
    for trial in range(12):
        k = torch.randn(r, r, dtype=torch.float64, generator=g) / math.sqrt(r) * (0.9 + 0.02 * trial)
        ev = torch.linalg.eigvals(k)
        radii = (1 - delta, 1 + delta)
        th = [choose_rotation(ev, rho, nodes)[0] for rho in radii]
        c = soft_count(k, radii, nodes, th)
        for j, rho in enumerate(radii):
            w = (ev / rho) ** nodes * complex(math.cos(-2 * math.pi * th[j]), math.sin(-2 * math.pi * th[j]))
            assert abs(float((1 / (1 - w)).sum().real) - float(c[j])) < 1e-8
        hard = _hard_symmetric(ev, delta)
        soft_near, soft_out = float(c[1] - c[0]) / r, float(r - c[1]) / r
        b_in = _step_error_bound(ev, radii[0], nodes, th[0]).sum()
        b_out = _step_error_bound(ev, radii[1], nodes, th[1]).sum()
        assert abs(soft_near - hard["near_unit_mass"]) * r <= float(b_in + b_out) + 1e-9
        assert abs(soft_out - hard["outside_mass"]) * r <= float(b_out) + 1e-9
        errs.append(abs(soft_near - hard["near_unit_mass"]))
    if nodes == 128:
        assert sum(errs) / len(errs) < 0.03


def test_gradients_finite_at_degenerate_and_defective_spectra():
    """The identity (r-fold eigenvalue 1 on the band) and a Jordan block: the soft counts' gradient is
    finite and non-zero; eig's backward through eigenvectors is not finite at the identity."""
    for k0 in (torch.eye(16, dtype=torch.float64),
               torch.eye(16, dtype=torch.float64) + torch.diag(torch.ones(15, dtype=torch.float64), 1)):
        k = k0.clone().requires_grad_()
        ev = torch.linalg.eigvals(k.detach())
        th = [choose_rotation(ev, rho, 32)[0] for rho in (0.95, 1.05)]
        c = soft_count(k, (0.95, 1.05), 32, th)
        (c[1] - c[0]).backward()
        assert torch.isfinite(k.grad).all() and k.grad.abs().sum() > 0
    k = torch.eye(16, dtype=torch.float64, requires_grad=True)
    _, vecs = torch.linalg.eig(k)  # what an eigenvector-based loss would differentiate
    vecs.abs().sum().backward()
    assert not torch.isfinite(k.grad).all()


def test_rotation_keeps_poles_away_from_eigenvalues_on_the_circle():
    ev = torch.polar(torch.ones(32, dtype=torch.float64), torch.rand(32, generator=torch.Generator().manual_seed(3),
                                                                     dtype=torch.float64) * 2 * math.pi)
    _, dmin = choose_rotation(ev, 1.0, 32)
    assert dmin > 0.02  # ~ pi / m for m eigenvalues exactly on the circle


# -- the loss on real blocks -------------------------------------------------------------------

@pytest.mark.parametrize("family,no_norm", [("gpt2", False), ("llama", False), ("gpt2", True), ("llama", True)])
def test_kss_loss_gradients_reach_block_weights(family, no_norm):
    model = tiny_lm(family, no_norm).train()
    _, blocks = find_blocks(model)
    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    with SnapshotSampler(list(blocks), 128, torch.Generator().manual_seed(0)) as s:
        model(input_ids=ids)
    losses = [block_kss_loss(x, y, rank=32) for x, y in s.pairs()]
    torch.stack([r.loss for r in losses]).mean().backward()
    for b in blocks:
        grads = [p.grad for p in b.parameters() if p.requires_grad]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert sum(float(gr.abs().sum()) for gr in grads) > 0
    assert all(0 <= r.near_unit_mass <= 1 and r.rank == 32 for r in losses)


def test_no_norm_high_lr_training_stays_finite(tmp_path):
    from hf_rksp import KSSConfig, KSSTrainer

    model = tiny_lm("gpt2", no_norm=True)
    tr = KSSTrainer(model=model, args=targs(tmp_path, max_steps=8, learning_rate=3e-2, max_grad_norm=0.0),
                    train_dataset=Tokens(), kss_config=KSSConfig(weight=1.0, rank=32))
    tr.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    kss_logs = [h for h in tr.state.log_history if "kss/loss" in h]
    assert kss_logs and all(math.isfinite(h["kss/loss"]) for h in kss_logs)


# -- KSSTrainer --------------------------------------------------------------------------------

@pytest.mark.support("KSS")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kss_on_moves_spectrum_in_the_intended_direction(family, tmp_path):
    """Same seed, data and steps: with KSS on, the audit's model-level near-unit mass and spectral
    radius on a fixed batch end lower than with KSS off."""
    from hf_rksp import KSSConfig, KSSTrainer

    out = {}
    for mode in ("off", "on"):
        model = tiny_lm(family)
        tr = KSSTrainer(model=model, args=targs(tmp_path / mode, max_steps=20), train_dataset=Tokens(),
                        kss_config=KSSConfig(mode=mode, weight=1.0))
        tr.train()
        out[mode] = model_profile(model)
        keys = {k for h in tr.state.log_history for k in h}
        if mode == "on":
            assert {"kss/loss", "kss/near_unit_mass", "kss/spectral_radius", "kss/weight"} <= keys
            assert tr.kss_state.kss_steps == 20
        else:
            assert not any(k.startswith("kss/") for k in keys)
    assert out["on"][0] < out["off"][0], out
    assert out["on"][1] < out["off"][1], out


def test_checkpoint_resume_keeps_kss_state(tmp_path):
    from hf_rksp import KSSConfig, KSSTrainer
    from hf_rksp.trainer import KSS_STATE_NAME

    cfg = KSSConfig(weight=0.5, every_n_steps=2, warmup_steps=2, rank=32)
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
                    train_dataset=Tokens(), kss_config=KSSConfig(weight=1.0, rank=32))
    tr.train()
    assert tr.kss_state.kss_steps == 2 and tr.kss_state.evaluations == 4
    assert all(math.isfinite(h["kss/loss"]) for h in tr.state.log_history if "kss/loss" in h)


def test_config_validation_and_schedule():
    from hf_rksp import KSSConfig

    with pytest.raises(ValueError, match="'on', 'off' or 'auto'"):
        KSSConfig(mode="maybe")
    with pytest.raises(ValueError, match="auto_threshold"):
        KSSConfig(mode="auto", auto_threshold=1.5)
    with pytest.raises(ValueError):
        KSSConfig(decay="exp")
    c = KSSConfig(weight=2.0, warmup_steps=4, decay="linear", decay_steps=10)
    assert c.schedule(0, 100) == pytest.approx(0.5)
    assert c.schedule(3, 100) == pytest.approx(2.0)
    assert c.schedule(9, 100) == pytest.approx(2.0 * 0.5)
    assert c.schedule(20, 100) == 0.0
    cos = KSSConfig(weight=1.0, decay="cosine")
    assert cos.schedule(50, 100) == pytest.approx(0.5)
    assert KSSConfig.from_dict(c.to_dict()) == c


# -- RKSPMonitorCallback -----------------------------------------------------------------------

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
                    kss_config=KSSConfig(mode="on", weight=1.0))
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
    torch.stack([block_kss_loss(x, y, rank=32).loss for x, y in s.pairs()]).mean().backward()
    for b in blocks:
        grads = [p.grad for p in b.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("score,lr,expect_on", [(0.6, 1e-4, True), (0.2, 1.0, False), (0.4, 1e-4, False),
                                                (0.4, 2e-3, True)])
def test_auto_mode_follows_the_papers_decision_rule(tmp_path, monkeypatch, score, lr, expect_on):
    """mode="auto" profiles the model before step 1 and applies the paper's Fig. 7 rule (no v2 risk model
    ships yet): M > 0.5 -> on; M < 0.3 -> off; in between on above 2x the family's default lr (gpt2: 6e-4).
    The profile is stubbed to a given score, so every branch of the rule is exercised."""
    from hf_rksp import KSSConfig, KSSTrainer, trainer

    def fake_profile(model, ids, options):
        feats = {"spectral_radius": {"max": 1.5}}
        return {"score": score, "features": feats}, 2

    monkeypatch.setattr(trainer, "_profile_summary", fake_profile)
    tr = KSSTrainer(model=tiny_lm("gpt2"), args=targs(tmp_path, max_steps=2, learning_rate=lr, logging_steps=1),
                    train_dataset=Tokens(), kss_config=KSSConfig(mode="auto"))
    tr.train()
    auto = tr.kss_state.auto
    assert auto["enabled"] is expect_on and auto["lr"] == lr and auto["near_unit_mass"] == score
    assert (tr.kss_state.kss_steps > 0) is expect_on
    assert tr.kss_state_dict()["state"]["auto"] == auto  # saved with checkpoints, kept on resume
