"""KSS in the trainers users fine-tune with: TRL's SFTTrainer (KSSMixin), PEFT/LoRA, DDP with mode="auto",
and the logs that keep the task loss apart from the KSS term.  KSS is never silently inert."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import peft  # the test extra installs trl and peft: a missing one fails here, it is never skipped
import pytest
import torch
import trl

from hf_rksp.errors import ConfigError, InertKSSError
from hf_rksp.models.blocks import find_blocks
from hf_rksp.training.kss import KSSConfig, KSSStep
from tests.test_kss import VOCAB, Tokens, targs, tiny_lm


def _block_grad_norms(model, loss) -> list[float]:
    """Norm of d loss / d (trainable parameters of each residual block)."""
    _, blocks = find_blocks(model)
    per_block = [[p for p in b.parameters() if p.requires_grad] for b in blocks]
    flat = [p for ps in per_block for p in ps]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    out, i = [], 0
    for ps in per_block:
        gs = grads[i:i + len(ps)]
        i += len(ps)
        out.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs if g is not None)))
    return out


# -- TRL -----------------------------------------------------------------------------------------

def _sft_data():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(1, VOCAB, (24, 64), generator=g).tolist()})


def _tokenizer():
    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token = tok.convert_ids_to_tokens(0)
    return tok


def _sft_args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True, "per_device_train_batch_size": 4,
            "max_steps": 3, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "seed": 0,
            "learning_rate": 1e-3, "max_length": 64}
    base.update(kw)
    return trl.SFTConfig(**base)


@pytest.mark.parametrize("lora,mode", [
    pytest.param(False, "on", marks=pytest.mark.trainers("SFTTrainer|full|1|KSS on", "SFTTrainer|full|1|monitor")),
    pytest.param(True, "on", marks=pytest.mark.trainers("SFTTrainer|LoRA|1|KSS on", "SFTTrainer|LoRA|1|monitor")),
    pytest.param(False, "auto", marks=pytest.mark.trainers("SFTTrainer|full|1|auto")),
    pytest.param(True, "auto", marks=pytest.mark.trainers("SFTTrainer|LoRA|1|auto")),
])
def test_sft_trainer_with_kss_mixin_adds_a_live_term(tmp_path, lora, mode):
    """kss_trainer(SFTTrainer) (= class KSSSFTTrainer(KSSMixin, SFTTrainer)) runs KSS on every step: the
    term is logged non-zero, no drawn block lost its gradient, and the logged loss is the task loss plus the
    term; the monitor profiles through TRL (and LoRA).  mode="auto" decides from TRL's own batches (the
    threshold set low so that it turns KSS on).  Before the fix every layer was counted as skipped and the
    loss equalled plain SFT's."""
    from hf_rksp import RKSPMonitorCallback
    from hf_rksp.training.trainer import KSSMixin, kss_trainer

    cls = kss_trainer(trl.SFTTrainer)
    assert issubclass(cls, KSSMixin) and kss_trainer(trl.SFTTrainer) is cls
    model = _lora(tiny_lm("llama")) if lora else tiny_lm("llama")
    mon = RKSPMonitorCallback(torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(9)),
                              every_n_steps=3)
    cfg = KSSConfig(mode=mode, alpha=1.0, every_n_steps=1, auto_low=0.01, auto_threshold=0.01, auto_tokens=256)
    tr = cls(model=model, args=_sft_args(tmp_path), train_dataset=_sft_data(), processing_class=_tokenizer(),
             callbacks=[mon], kss_config=cfg)
    tr.train()
    st = tr.kss_state
    assert st.kss_steps == 3 and st.layers_evaluated == 3 and st.layers_no_grad == 0 and st.layers_skipped == 0
    if mode == "auto":
        assert st.auto["enabled"] and st.auto["near_unit_mass"] > 0.01
    logs = [h for h in tr.state.log_history if "kss/term" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["kss/term"] > 0 and h["kss/task_loss"] > 0
        # loss is float32 on device, term float64: 1e-5 relative covers the float32 sum
        assert h["loss"] == pytest.approx(h["kss/task_loss"] + h["kss/term"], rel=1e-5)
    assert [h["step"] for h in mon.history] == [0, 3]
    assert any("rksp/baseline_near_unit_mass" in h for h in tr.state.log_history)


@pytest.mark.parametrize("path", ["return_outputs", "compute_loss_func"])
def test_kss_term_reaches_the_blocks_through_trl_extra_no_grad_forward(tmp_path, path):
    """TRL's SFTTrainer.compute_loss runs a second forward without grad (for return_outputs=True, and after
    a compute_loss_func); the hooks keep the first forward's snapshots, the one with grad.  The KSS term of
    one step, taken around TRL's own compute_loss, has a non-zero gradient at every drawn block."""
    kw = {}
    if path == "compute_loss_func":
        kw["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: \
            torch.nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    model = tiny_lm("llama")
    tr = trl.SFTTrainer(model=model, args=_sft_args(tmp_path), train_dataset=_sft_data(),
                        processing_class=_tokenizer(), **kw)
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    model.train()
    _, blocks = find_blocks(model)
    cfg = KSSConfig(layer_fraction=1.0)
    with KSSStep(list(blocks), cfg, step=0) as k:
        got = tr.compute_loss(model, inputs, return_outputs=path == "return_outputs")
    assert k.sampler.forwards_with_grad == 1 and k.sampler.forwards_without_grad == 1  # TRL's two forwards
    loss = got[0] if isinstance(got, tuple) else got
    out = k.result(loss, 1.0)
    assert out.term is not None and out.term.requires_grad and float(out.term.detach()) > 0
    assert all(g > 0 for g in _block_grad_norms(model, out.term))


def test_mixin_after_the_trainer_is_refused_where_the_class_is_defined():
    """class Bad(SFTTrainer, KSSMixin): SFTTrainer.compute_loss would shadow KSS's, and KSS would never run."""
    from hf_rksp.training.trainer import KSSMixin

    with pytest.raises(TypeError, match="put KSSMixin first"):
        class Bad(trl.SFTTrainer, KSSMixin):
            pass

    class Good(KSSMixin, trl.SFTTrainer):  # a subclass with its own compute_loss, calling super(), is fine
        def compute_loss(self, *args, **kwargs):
            return super().compute_loss(*args, **kwargs)


def tiny_t5(lora: bool):
    """A tiny T5 (2 encoder + 2 decoder blocks), with LoRA on q and v when ``lora``."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0))
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                            lora_dropout=0.0))
    return model


def seq2seq_args(tmp_path, **kw):
    from transformers import Seq2SeqTrainingArguments

    base = {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True, "per_device_train_batch_size": 4,
            "save_strategy": "no", "disable_tqdm": True, "seed": 0, "learning_rate": 1e-3}
    return Seq2SeqTrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("lora,mode", [
    pytest.param(False, "on", marks=pytest.mark.trainers("Seq2SeqTrainer|full|1|KSS on",
                                                         "Seq2SeqTrainer|full|1|monitor")),
    pytest.param(True, "on", marks=pytest.mark.trainers("Seq2SeqTrainer|LoRA|1|KSS on",
                                                        "Seq2SeqTrainer|LoRA|1|monitor")),
    pytest.param(False, "auto", marks=pytest.mark.trainers("Seq2SeqTrainer|full|1|auto")),
    pytest.param(True, "auto", marks=pytest.mark.trainers("Seq2SeqTrainer|LoRA|1|auto")),
])
def test_seq2seq_trainer_with_kss_mixin_reaches_encoder_and_decoder_blocks(tmp_path, lora, mode):
    """kss_trainer(Seq2SeqTrainer) on a tiny T5 (full, or LoRA on q and v): KSS draws from both stacks
    (encoder.block+decoder.block), the term is live, and the term of one step reaches every block of both
    stacks."""
    from transformers import Seq2SeqTrainer

    from hf_rksp.training.trainer import kss_trainer

    model = tiny_t5(lora)
    args = seq2seq_args(tmp_path, max_steps=2, logging_steps=1)
    from hf_rksp import RKSPMonitorCallback

    mon = RKSPMonitorCallback(torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(9)),
                              every_n_steps=2)
    tr = kss_trainer(Seq2SeqTrainer)(model=model, args=args, train_dataset=Tokens(n=16, t=32), callbacks=[mon],
                                     kss_config=KSSConfig(mode=mode, alpha=1.0, every_n_steps=1, subsample=100,
                                                          auto_low=0.01, auto_threshold=0.01, auto_tokens=128))
    tr.train()
    assert tr.kss_state.kss_steps == 2 and tr.kss_state.layers_no_grad == 0
    if mode == "auto":
        assert tr.kss_state.auto["enabled"] and tr.kss_state.auto["near_unit_mass"] > 0.01
    assert [h["step"] for h in mon.history] == [0, 2]
    assert all(h["kss/term"] > 0 for h in tr.state.log_history if "kss/term" in h)
    _, blocks = find_blocks(model)
    assert len(blocks) == 4
    ids = torch.stack([Tokens(n=4, t=32)[i]["input_ids"] for i in range(4)])
    with KSSStep(list(blocks), KSSConfig(layer_fraction=1.0, subsample=100), step=0) as k:
        loss = model(input_ids=ids, labels=ids).loss
    out = k.result(loss, 1.0)
    assert out.skips == {} and all(g > 0 for g in _block_grad_norms(model, out.term))


# -- never silently inert -------------------------------------------------------------------------

def test_kss_step_without_gradient_raises_with_the_reason():
    """A KSS step whose forward ran without grad, or whose blocks (and everything upstream) are frozen,
    raises InertKSSError saying which; it is never a silent zero."""
    model = tiny_lm("gpt2").train()
    _, blocks = find_blocks(model)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    with KSSStep(list(blocks), KSSConfig(), step=0) as k, torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(InertKSSError, match="ran without grad") as e:
        k.result(loss, 0.15)
    assert e.value.reason == "no_grad_forward"

    for p in model.transformer.parameters():
        p.requires_grad_(False)  # only lm_head trains: nothing at or upstream of any block
    with KSSStep(list(blocks), KSSConfig(), step=0) as k:
        loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(InertKSSError, match="`blocks`") as e:
        k.result(loss, 0.15)
    assert e.value.reason == "nothing_trains"


def test_every_block_skipped_for_three_kss_steps_warns_once(tmp_path, caplog):
    """max_condition just above 1 makes every layer ill-conditioned: the term is zero, each skip is counted
    under kss/layers_skipped (not kss/layers_no_grad), and after 3 KSS evaluations in a row the trainer
    warns, once."""
    import logging

    from hf_rksp import KSSTrainer

    tr = KSSTrainer(model=tiny_lm("gpt2"), args=targs(tmp_path, max_steps=5, logging_steps=5),
                    train_dataset=Tokens(), kss_config=KSSConfig(every_n_steps=1, max_condition=1.0 + 1e-9))
    with caplog.at_level(logging.WARNING, logger="hf_rksp"):
        tr.train()
    warned = [r for r in caplog.records if "KSS shaped nothing" in r.getMessage()]
    assert len(warned) == 1 and "ill_conditioned" in warned[0].getMessage()
    (log,) = [h for h in tr.state.log_history if "kss/term" in h]
    assert log["kss/term"] == 0 and log["kss/layers_skipped"] == 5 and log["kss/layers_no_grad"] == 0


# -- PEFT --------------------------------------------------------------------------------------------

def _lora(model):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("mode", [
    pytest.param("on", marks=pytest.mark.trainers("Trainer|LoRA|1|KSS on", "Trainer|LoRA|1|monitor")),
    pytest.param("auto", marks=pytest.mark.trainers("Trainer|LoRA|1|auto")),
])
def test_lora_training_with_kss_and_the_monitor(tmp_path, mode):
    """KSSTrainer and RKSPMonitorCallback on a LoRA-wrapped model find the blocks through the PeftModel (no
    block_path); the KSS term is live (non-zero, no block without gradient), it reaches the LoRA weights of
    every block, and the monitor logs its baseline and its profiles.  mode="auto" profiles through the
    wrapper (threshold set low so that it turns KSS on)."""
    from hf_rksp import KSSTrainer, RKSPMonitorCallback

    torch.manual_seed(0)
    model = _lora(tiny_lm("llama"))
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(9))
    mon = RKSPMonitorCallback(ids, every_n_steps=2)
    tr = KSSTrainer(model=model, args=targs(tmp_path, max_steps=4, logging_steps=2), train_dataset=Tokens(n=32),
                    callbacks=[mon], kss_config=KSSConfig(mode=mode, alpha=1.0, every_n_steps=1, auto_low=0.01,
                                                          auto_threshold=0.01, auto_tokens=256))
    tr.train()
    assert tr.kss_state.kss_steps == 4 and tr.kss_state.layers_no_grad == 0
    if mode == "auto":
        assert tr.kss_state.auto["enabled"] and tr.kss_state.auto["near_unit_mass"] > 0.01
    logs = tr.state.log_history
    assert all(h["kss/term"] > 0 for h in logs if "kss/term" in h) and any("kss/term" in h for h in logs)
    assert [h["step"] for h in mon.history] == [0, 2, 4]
    assert any("rksp/baseline_near_unit_mass" in h for h in logs)
    assert sum("rksp/near_unit_mass" in h for h in logs) == 2

    # the term of one step reaches every block's LoRA weights (all blocks drawn)
    _, blocks = find_blocks(model)
    batch = torch.stack([Tokens(n=4)[i]["input_ids"] for i in range(4)])
    with KSSStep(list(blocks), KSSConfig(layer_fraction=1.0), step=0) as k:
        loss = model(input_ids=batch, labels=batch).loss
    out = k.result(loss, 1.0)
    assert out.skips == {}
    lora = [[p for n, p in b.named_parameters() if "lora_" in n] for b in blocks]
    grads = torch.autograd.grad(out.term, [p for ps in lora for p in ps])
    assert len(grads) == 4 * len(blocks)  # A and B of q_proj and v_proj
    assert all(float(g.abs().sum()) > 0 for g in grads[1::2])  # the B matrices (A's gradient is 0 while B = 0)


def test_blocks_not_found_is_one_error_naming_block_path(tmp_path):
    from hf_rksp import KSSTrainer, RKSPMonitorCallback

    model = _lora(tiny_lm("llama"))
    tr = KSSTrainer(model=model, args=targs(tmp_path, max_steps=1), train_dataset=Tokens(n=8),
                    kss_config=KSSConfig(block_path="model.nowhere", every_n_steps=1))
    with pytest.raises(ConfigError) as e:
        tr.train()
    assert e.value.param == "block_path" and "`block_path`" in str(e.value)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(9))
    mon = RKSPMonitorCallback(ids, block_path="model.nowhere")
    with pytest.raises(ConfigError) as e:
        mon.profile(model)
    assert e.value.param == "block_path"


# -- logging: the task loss apart from the term --------------------------------------------------

@pytest.mark.trainers("Trainer|full|1|KSS on")
def test_task_loss_is_the_loss_without_kss(tmp_path):
    """kss/task_loss is what `loss` would be without the term: at the first log (step 1: one KSS step on the
    initial weights, gradient accumulation 2) it equals the logged loss of the same run with KSS off (1e-6
    relative: the same float32 forward, the term subtracted in float64); loss = task_loss + term at every
    log, and on a window without a KSS step the term is 0."""
    from hf_rksp import KSSTrainer

    logs = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        tr = KSSTrainer(model=tiny_lm("llama"), args=targs(tmp_path / mode, max_steps=4, logging_steps=1,
                                                            gradient_accumulation_steps=2,
                                                            per_device_train_batch_size=4),
                        train_dataset=Tokens(), kss_config=KSSConfig(mode=mode, alpha=1.0, every_n_steps=2))
        tr.train()
        logs[mode] = [h for h in tr.state.log_history if "loss" in h]
    off, on = logs["off"], logs["on"]
    assert on[0]["kss/task_loss"] == pytest.approx(off[0]["loss"], rel=1e-6)
    assert on[0]["kss/term"] > 0 and on[0]["loss"] > off[0]["loss"]
    for h in on:
        assert h["loss"] == pytest.approx(h["kss/task_loss"] + h["kss/term"], rel=1e-6)
    assert [h["kss/term"] == 0 for h in on] == [False, True, False, True]  # KSS on steps 0 and 2
    assert not any(k.startswith("kss/") for h in off for k in h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_kss_gradient(tmp_path, reentrant):
    """With gradient checkpointing (either torch implementation) the first step's KSS term and total
    gradient norm (task + KSS, before clipping) equal those without it (1e-5 relative: the same float32 math,
    recomputed)."""
    from hf_rksp import KSSTrainer

    logs = {}
    for gc in (False, True):
        torch.manual_seed(0)
        kw = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": reentrant}} \
            if gc else {}
        tr = KSSTrainer(model=tiny_lm("llama"), args=targs(tmp_path / str(gc), max_steps=1, logging_steps=1, **kw),
                        train_dataset=Tokens(n=8), kss_config=KSSConfig(alpha=1.0, every_n_steps=1))
        tr.train()
        (logs[gc],) = [h for h in tr.state.log_history if "kss/term" in h]
    assert logs[True]["kss/term"] > 0 and logs[True]["kss/layers_no_grad"] == 0
    assert logs[True]["kss/term"] == pytest.approx(logs[False]["kss/term"], rel=1e-5)
    assert logs[True]["grad_norm"] == pytest.approx(logs[False]["grad_norm"], rel=1e-5)


# -- DDP ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode,flags", [
    pytest.param("auto", [], marks=pytest.mark.trainers("Trainer|full|2|auto", "Trainer|full|2|KSS on",
                                                        "Trainer|full|2|monitor")),
    pytest.param("on", ["lora"], marks=pytest.mark.trainers("Trainer|LoRA|2|KSS on", "Trainer|LoRA|2|monitor")),
    pytest.param("auto", ["lora", "sft"], marks=pytest.mark.trainers(
        "SFTTrainer|LoRA|2|auto", "SFTTrainer|LoRA|2|KSS on", "SFTTrainer|LoRA|2|monitor")),
    pytest.param("auto", ["sft"], marks=pytest.mark.trainers(
        "SFTTrainer|full|2|auto", "SFTTrainer|full|2|KSS on", "SFTTrainer|full|2|monitor")),
    pytest.param("auto", ["lora"], marks=pytest.mark.trainers("Trainer|LoRA|2|auto")),
    pytest.param("auto", ["seq2seq"], marks=pytest.mark.trainers(
        "Seq2SeqTrainer|full|2|auto", "Seq2SeqTrainer|full|2|KSS on", "Seq2SeqTrainer|full|2|monitor")),
    pytest.param("auto", ["seq2seq", "lora"], marks=pytest.mark.trainers(
        "Seq2SeqTrainer|LoRA|2|auto", "Seq2SeqTrainer|LoRA|2|KSS on", "Seq2SeqTrainer|LoRA|2|monitor")),
])
def test_ddp_two_processes_decide_once_and_train_with_kss(tmp_path, mode, flags):
    """Two CPU processes (gloo) through torchrun, KSS every step and the RKSP monitor: a full fine-tune with
    mode="auto" and the threshold put between the two ranks' own M (ranks deciding alone would disagree, and
    the job hung), LoRA with KSS on, and TRL's SFTTrainer with LoRA and mode="auto".  Both ranks take the same decision from the gathered statistics,
    train with KSS, log the reduced term, run the monitor, and end with the same weights.  A hang fails the
    test (240 s timeout; a run takes ~25-40 s on the 2-core machine)."""
    _run_torchrun("kss_ddp_worker.py", str(tmp_path), mode, *flags)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    if mode == "auto":
        a0, a1 = ranks[0]["auto"], ranks[1]["auto"]
        m0, m1 = a0["near_unit_mass_per_rank"]
        assert m0 != m1  # the ranks saw different shards
        assert a0 == a1 and a0["enabled"] and a0["near_unit_mass"] == pytest.approx((m0 + m1) / 2, rel=1e-12)
    assert ranks[0]["wrapped"] == ranks[1]["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["kss_steps"] == ranks[1]["kss_steps"] == 4
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the replicas equal
    logs = ranks[0]["log_history"]
    terms = [h["kss/term"] for h in logs if "kss/term" in h]
    assert len(terms) == 2 and all(t > 0 for t in terms)
    assert all(h["kss/layers_no_grad"] == 0 for h in logs if "kss/term" in h)
    assert ranks[0]["monitor_steps"] == ranks[1]["monitor_steps"] == [0, 2, 4]
    assert sum("rksp/near_unit_mass" in h for h in logs) == 2



def _run_torchrun(worker: str, *argv: str, timeout: int = 240) -> None:
    """``torchrun --nproc_per_node 2 tests/<worker> ARGV`` on CPU (gloo), one thread per rank; a hang fails."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(Path(__file__).with_name(worker)), *argv]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"two-process run of {worker} hung (killed after {timeout} s): {e.stderr}")
    assert run.returncode == 0, run.stderr[-3000:]


def _kss_block_gradient(ids: torch.Tensor, micro: int, lora: bool = False, mask: torch.Tensor | None = None,
                        bf16: bool = False, seq2seq: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One process: the gradient of the KSS term (alpha 1, the worker's settings, step 0, micro-batch ``micro``)
    on every trainable block parameter of the worker's model, for the forward of ``ids`` (with the trainer's
    ``attention_mask``, when its collator gave one), in float32 or, with ``bf16``, under the bfloat16 autocast
    a trainer with ``bf16=True`` runs its forward in (on CPU); and the drawn blocks.  The forward is the plain
    ``model(input_ids, attention_mask, labels)``: TRL's ``model(..., use_cache=False, fused_lm_head=True)``
    differs from it after the last block only (the LM head), which the term does not see.  ``seq2seq``: the
    worker's tiny T5 (the decoder's input is the labels shifted, as Seq2SeqTrainer's forward makes it)."""
    from tests.kss_ddp_grad_worker import KSS, block_parameters, model_without_dropout

    model = model_without_dropout(lora, seq2seq).train()
    params = block_parameters(model)
    _, blocks = find_blocks(model)
    with (torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
          KSSStep(list(blocks), KSSConfig(**KSS), step=0, micro=micro, attention_mask=mask) as k):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    out = k.result(loss, 1.0)
    assert out.skips == {} and out.term is not None
    grads = torch.autograd.grad(out.term, list(params.values()), allow_unused=True)
    return ({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)},
            torch.tensor(out.chosen))


@pytest.mark.parametrize("flags", [
    pytest.param([], marks=pytest.mark.trainers("Trainer|full|2|KSS on"), id="trainer"),
    pytest.param(["lora"], marks=pytest.mark.trainers("Trainer|LoRA|2|KSS on"), id="trainer-lora"),
    pytest.param(["sft"], marks=pytest.mark.trainers("SFTTrainer|full|2|KSS on"), id="sft"),
    pytest.param(["seq2seq"], marks=pytest.mark.trainers("Seq2SeqTrainer|full|2|KSS on"), id="seq2seq"),
    pytest.param(["seq2seq", "lora"], marks=pytest.mark.trainers("Seq2SeqTrainer|LoRA|2|KSS on"),
                 id="seq2seq-lora"),
    pytest.param(["sft", "lora"], marks=pytest.mark.trainers("SFTTrainer|LoRA|2|KSS on"), id="sft-lora"),
])
def test_ddp_kss_gradient_equals_the_one_process_reference(tmp_path, flags):
    """What DDP does with the KSS term, checked against a one-process reference (docs/guides/training.md, DDP).

    Each rank evaluates the term on its own micro-batch (the same drawn blocks, token positions and DMD bases
    on every rank: they are seeded by step and micro-batch, not rank), and DDP averages the gradients, so the
    KSS gradient reaching the blocks is the mean over ranks (and micro-batches, with gradient accumulation)
    of the one-process gradient of the term on each shard.  It is not the gradient of the term on the whole
    global batch in one process: the term is a non-linear function of the snapshots (whitening, eigenvalues),
    like a per-device batch statistic; that gradient differs at O(1), and the test checks that it does.

    DDP's KSS gradient is grad(KSS on) - grad(KSS off) of one optimizer step from the same weights (dropout 0,
    no clipping), read before the optimizer step.  Tolerance: relative 1e-5 in norm per block.  Both sides
    are float32 forwards/backwards summed in a different order (DDP's buckets and all-reduce, and the
    subtraction, which cancels a task gradient of norm ~0.7 against a KSS gradient of norm ~90); observed
    3e-7 to 5e-7.  The KSS numerics themselves are checked against float64 references in tests/test_kss.py.
    With LoRA the same holds for the adapter's weights (the only trainable ones in the blocks).

    With TRL's ``SFTTrainer`` through the mixin (``sft``) the same holds to the same tolerance: its collator,
    ``compute_loss`` (fused LM head, loss over ``num_items_in_batch``, scaled across devices) and gradient
    checkpointing change the task loss, not the blocks' forward the term is computed from.  Both trainers run
    in float32 here; SFTConfig's own default, ``bf16=True``, is checked in one process by
    test_sft_kss_gradient_under_bf16_is_that_of_the_autocast_forward.  With ``Seq2SeqTrainer`` (a tiny T5,
    its 2 encoder and 2 decoder blocks; dropout 0, T5's attention dropout included) the same holds."""
    lora, sft, seq2seq = "lora" in flags, "sft" in flags, "seq2seq" in flags
    _run_torchrun("kss_ddp_grad_worker.py", str(tmp_path), *flags)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2
    for accumulation in (1, 2):
        r0, r1 = ranks[0]["runs"][accumulation], ranks[1]["runs"][accumulation]
        assert r0["wrapped"] == "DistributedDataParallel" and r0["kss_evaluations"] == accumulation
        if sft:  # TRL's collator built the batches (with its all-ones attention mask)
            assert r0["keys"] == ["attention_mask", "input_ids", "labels"]
            assert all(m is not None and bool(m.all()) for m in r0["masks"])
        for name in r0["grad_on"]:  # after the all-reduce every rank holds the same gradient
            assert torch.equal(r0["grad_on"][name], r1["grad_on"][name])
        shards = [ids for r in (r0, r1) for ids in r["ids"]]
        assert len({tuple(x.flatten().tolist()) for x in torch.cat(shards)}) == 8  # 8 distinct sequences
        ddp = {n: r0["grad_on"][n] - r0["grad_off"][n] for n in r0["grad_on"]}
        assert ddp and all(("lora_" in n) == lora for n in ddp)  # LoRA: the adapter's weights only are trained
        ref = {n: torch.zeros_like(g) for n, g in ddp.items()}
        drawn = set()
        for r in (r0, r1):
            for micro, (ids, mask) in enumerate(zip(r["ids"], r["masks"])):
                g, chosen = _kss_block_gradient(ids, micro, lora, mask, seq2seq=seq2seq)
                drawn.add(tuple(chosen.tolist()))
                for n in ref:
                    ref[n] += g[n] / (2 * accumulation)
        assert len(drawn) == 1  # one draw of blocks for the optimizer step, on every rank and micro-batch
        masks = [m for r in (r0, r1) for m in r["masks"]]
        whole, _ = _kss_block_gradient(torch.cat(shards), 0, lora, None if masks[0] is None else torch.cat(masks),
                                       seq2seq=seq2seq)
        blocks = sorted({re.match(r"(.*?\.\d+)\.", n).group(1) for n in ddp})  # "<block list path>.<index>"
        assert len(blocks) == (4 if seq2seq else 2)  # T5: 2 encoder + 2 decoder blocks
        for b in blocks:
            names = [n for n in ddp if n.startswith(b + ".")]
            norm = math.sqrt(sum(float(ref[n].double().pow(2).sum()) for n in names))
            diff = math.sqrt(sum(float((ddp[n] - ref[n]).double().pow(2).sum()) for n in names))
            off_whole = math.sqrt(sum(float((whole[n] - ref[n]).double().pow(2).sum()) for n in names))
            assert norm > 0, f"no KSS gradient reaches block {b}"
            assert diff <= 1e-5 * norm, (accumulation, b, diff / norm)
            assert off_whole > 0.1 * norm  # the whole-batch term is another quantity


@pytest.mark.trainers("SFTTrainer|full|1|KSS on")
def test_sft_kss_gradient_under_bf16_is_that_of_the_autocast_forward(tmp_path):
    """SFTConfig defaults to ``bf16=True``, on CPU too, so SFTTrainer's forward runs under bfloat16 autocast and
    the KSS term is computed from snapshots of that forward.  That is the whole difference from the float32
    reference: against it, the KSS gradient of one SFT step with SFTConfig's defaults (KSS on minus off, same
    weights and batch, one process) is off at O(1) (observed norm ratio 1.04, cosine 0.74, relative 0.73, and
    the same for the plain KSSTrainer with ``bf16=True``); against the reference whose forward runs under the
    same autocast (its block outputs are then bit-identical to SFT's) it agrees to bfloat16's rounding.

    Tolerance: relative 2e-2 in norm (observed 4.6e-3).  The on-minus-off subtraction is exact to float32 only
    without autocast: with it, the backward of each linear layer rounds the summed (task + KSS) output
    gradient to bfloat16 (2^-8 = 3.9e-3 relative), so grad(task + term) - grad(task) is grad(term) to about
    that (4.3e-3 measured on the plain model alone).  The float32 case is the DDP test's (1e-5)."""
    from tests.kss_ddp_grad_worker import one_step

    off, grad_off = one_step(tmp_path, "off", 1, False, sft=True)  # SFTConfig's defaults, one process
    on, grad_on = one_step(tmp_path, "on", 1, False, sft=True)
    assert on.args.bf16 and on.accelerator.mixed_precision == "bf16" and on.kss_state.evaluations == 1
    assert len(on.seen) == 1 and torch.equal(off.seen[0], on.seen[0])
    got = torch.cat([(grad_on[n] - grad_off[n]).flatten() for n in grad_on])
    rel = {}
    for bf16 in (True, False):
        ref, _ = _kss_block_gradient(on.seen[0], 0, False, on.masks[0], bf16=bf16)
        want = torch.cat([ref[n].flatten() for n in grad_on])
        assert want.norm() > 0
        rel[bf16] = float((got - want).double().norm() / want.double().norm())
    assert rel[True] <= 2e-2, rel
    assert rel[False] > 0.1, rel  # the float32 forward's term is another quantity


def test_fsdp_kss_gradient_equals_the_one_process_reference(tmp_path):
    """KSS under FSDP's sharded parameters (torch FSDP2 ``fully_shard``, two gloo processes on CPU; the
    Trainer itself runs DDP on CPU, see docs/guides/training.md): the KSS step driven by hand around the
    sharded model's forward; the term's gradient, gathered from the shards, equals the mean over ranks of the
    one-process gradient of the term on each rank's shard (FSDP averages like DDP).  Tolerance: relative 1e-5
    in norm per block (float32 sums in another order: FSDP's all-gather, reduce-scatter)."""
    _run_torchrun("kss_fsdp_worker.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["param_type"] == "DTensor"  # the parameters were sharded
    assert not torch.equal(ranks[0]["ids"], ranks[1]["ids"])
    assert torch.equal(ranks[0]["chosen"], ranks[1]["chosen"])
    for name in ranks[0]["grads"]:
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])
    fsdp = ranks[0]["grads"]
    ref = {n: torch.zeros_like(g) for n, g in fsdp.items()}
    for r in ranks:
        g, chosen = _kss_block_gradient(r["ids"], 0)
        assert torch.equal(chosen, r["chosen"])
        for n in ref:
            ref[n] += g[n] / 2
    for b in ("h.0.", "h.1."):
        names = [n for n in fsdp if f".{b}" in f".{n}"]
        norm = math.sqrt(sum(float(ref[n].double().pow(2).sum()) for n in names))
        diff = math.sqrt(sum(float((fsdp[n] - ref[n]).double().pow(2).sum()) for n in names))
        assert norm > 0, f"no KSS gradient reaches block {b}"
        assert diff <= 1e-5 * norm, (b, diff / norm)


# -- the shipped example, at smoke size ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["sft"])
def test_example_fine_tunes_smollm2_with_lora_and_kss(tmp_path, smollm2_gguf, trainer):
    """examples/finetune_kss.py on the real SmolLM2-135M weights, LoRA + KSS through TRL, 2 steps of 2 x 32
    tokens with KSS on both: the term is live on every drawn block and logged apart from the task loss."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "finetune_kss.py"
    spec = importlib.util.spec_from_file_location("finetune_kss", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--trainer", trainer, "--lora", "--steps", "2", "--seq-len", "32", "--batch", "2",
                        "--kss-every", "1", "--threads", "1", "--out", str(tmp_path)])
    st = out["kss_state"]
    assert st["kss_steps"] == 2 and st["layers_evaluated"] == 30 and st["layers_no_grad"] == 0  # 15 of 30 blocks
    logs = [h for h in out["log_history"] if "kss/term" in h]  # the monitor (every step here) logs each step
    assert [h["step"] for h in logs] == [1, 2]
    for h in logs:
        assert h["kss/term"] > 0 and h["loss"] == pytest.approx(h["kss/task_loss"] + h["kss/term"], rel=1e-5)
