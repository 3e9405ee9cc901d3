"""One rank of tests/test_kss_trainers.py::test_ddp_kss_gradient_equals_the_one_process_reference.

    python -m torch.distributed.run --nproc_per_node 2 tests/kss_ddp_grad_worker.py OUT_DIR [lora] [sft | seq2seq]

A tiny GPT-2 (dropout 0, so that two runs from the same weights see the same forward), one optimizer step of
KSSTrainer under DDP (gloo), twice from the same initial weights: KSS off, then KSS on (alpha 1, every step,
100 token positions per micro-batch).  Done for a global batch of 8 sequences of 64 tokens split as 4 per rank
(gradient accumulation 1), and as 2 micro-batches of 2 per rank (gradient accumulation 2).  A callback keeps
the gradient of every block parameter just before the optimizer step (after DDP's all-reduce; no clipping),
so grad_on - grad_off is the gradient of the KSS term as DDP applies it.  Each rank writes rank<N>.pt: per
accumulation setting, the input_ids of each micro-batch its compute_loss saw (its shard of the global batch)
and both gradients.  With ``lora``, the model is wrapped in a LoRA adapter (PEFT) and the gradients are those of
the trainable (LoRA) parameters of the blocks.  With ``sft``, the trainer is TRL's ``SFTTrainer`` through the
mixin (``kss_trainer(SFTTrainer)``) on the same token ids as a ``datasets.Dataset`` (TRL's collator, its
``compute_loss`` and fused LM head, SFTConfig's default gradient checkpointing).  Both trainers run in
float32 (``bf16=False``; SFTConfig defaults to ``bf16=True``, whose check is the test's
``test_sft_kss_gradient_under_bf16_is_that_of_the_autocast_forward``, which calls :func:`one_step` in one
plain process).  With ``seq2seq``, a tiny T5 (dropout 0; LoRA on q and v with ``lora``) through
``kss_trainer(Seq2SeqTrainer)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_kss import Tokens, targs, tiny_lm

from hf_rksp import KSSConfig, KSSTrainer, kss_trainer
from hf_rksp.models.blocks import find_blocks

#: the KSS settings of the check (the test builds its reference with the same)
KSS = {"mode": "on", "alpha": 1.0, "every_n_steps": 1, "subsample": 100, "seed": 3}


def model_without_dropout(lora: bool = False, seq2seq: bool = False):
    """The tiny GPT-2 (or, with ``seq2seq``, the tiny T5 of test_kss_trainers.py, LoRA on q and v), dropout 0."""
    if seq2seq:
        from test_kss_trainers import tiny_t5

        model = tiny_t5(lora)  # seeded inside
    else:
        model = tiny_lm("gpt2")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):  # T5's attention drops with a float rate
            m.dropout = 0.0
    if lora and not seq2seq:  # seeded: the worker's ranks and the test's reference build the same adapter
        import peft

        torch.manual_seed(5)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                           lora_dropout=0.0, fan_in_fan_out=True))
    return model


def block_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters of every block (all of them, or the LoRA ones)."""
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": p for i, b in enumerate(blocks) for n, p in b.named_parameters() if p.requires_grad}


class KeepGrads(TrainerCallback):
    def __init__(self, params: dict):
        self.params, self.grads = params, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in self.params.items()}


def recording(base):
    class Recording(base):
        """The trainer, keeping the input_ids of every compute_loss (this rank's micro-batches)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen, self.masks, self.keys = [], [], set()

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.seen.append(inputs["input_ids"].detach().cpu().clone())
            mask = inputs.get("attention_mask")
            self.masks.append(None if mask is None else mask.detach().cpu().clone())
            self.keys |= set(inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Recording


def one_step(out: Path, mode: str, accumulation: int, lora: bool, sft: bool = False, seq2seq: bool = False,
             **args):
    """One optimizer step (KSS ``mode`` "on" or "off"); ``args`` override the training arguments."""
    model = model_without_dropout(lora, seq2seq)
    keep = KeepGrads(block_parameters(model))
    kw = dict(max_steps=1, logging_steps=1, max_grad_norm=0.0,
              per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation, **args)
    kss = KSSConfig(**{**KSS, "mode": mode})
    if sft:
        import trl
        from datasets import Dataset
        from test_kss_trainers import _sft_args, _tokenizer

        # token id 0 is the tokenizer's pad/eos: kept out so that TRL's collator masks nothing
        data = Dataset.from_dict({"input_ids": Tokens(n=32, t=64).x.clamp(min=1).tolist()})
        tr = recording(kss_trainer(trl.SFTTrainer))(
            model=model, args=_sft_args(out / f"{mode}{accumulation}", **kw), train_dataset=data,
            processing_class=_tokenizer(), callbacks=[keep], kss_config=kss)
    elif seq2seq:
        from test_kss_trainers import seq2seq_args
        from transformers import Seq2SeqTrainer

        tr = recording(kss_trainer(Seq2SeqTrainer))(
            model=model, args=seq2seq_args(out / f"{mode}{accumulation}", **kw),
            train_dataset=Tokens(n=32, t=64), callbacks=[keep], kss_config=kss)
    else:
        tr = recording(KSSTrainer)(model=model, args=targs(out / f"{mode}{accumulation}", **kw),
                                   train_dataset=Tokens(n=32, t=64), callbacks=[keep], kss_config=kss)
    tr.train()
    return tr, keep.grads


def main() -> None:
    out, runs = Path(sys.argv[1]), {}
    lora, sft, seq2seq = ("lora" in sys.argv[2:], "sft" in sys.argv[2:], "seq2seq" in sys.argv[2:])
    for accumulation in (1, 2):
        # float32 for every trainer (SFTConfig's own default is bf16=True)
        off, grad_off = one_step(out, "off", accumulation, lora, sft, seq2seq, ddp_backend="gloo", bf16=False)
        on, grad_on = one_step(out, "on", accumulation, lora, sft, seq2seq, ddp_backend="gloo", bf16=False)
        assert len(on.seen) == accumulation and all(torch.equal(a, b) for a, b in zip(off.seen, on.seen))
        runs[accumulation] = {"ids": on.seen, "masks": on.masks, "keys": sorted(on.keys), "grad_off": grad_off, "grad_on": grad_on,
                              "kss_evaluations": on.kss_state.evaluations, "wrapped": type(on.model_wrapped).__name__}
    torch.save({"world": dist.get_world_size(), "runs": runs}, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main()
