"""One rank of the two-process (gloo, CPU) KSS runs of tests/test_kss_trainers.py::test_ddp_*.

    python -m torch.distributed.run --nproc_per_node 2 tests/kss_ddp_worker.py OUT_DIR MODE [lora] [sft|seq2seq]

A tiny GPT-2 (full fine-tune, or LoRA on c_attn with ``lora``), KSSTrainer (or, with ``sft``, TRL's
SFTTrainer with KSSMixin; with ``seq2seq``, a tiny T5, LoRA on q and v with ``lora``, and Seq2SeqTrainer with
KSSMixin) with KSS every step and the RKSP monitor every 2 steps, 4 steps.  For mode="auto" each rank profiles its own shard (its M differs from the
other's); the thresholds are put between the two ranks' M so that ranks deciding alone would disagree
(and, before the fix, hang).  Each rank writes rank<N>.json: the decision, the KSS state, its log history,
the monitor's history and a checksum of its weights.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_kss import Tokens, targs, tiny_lm

from hf_rksp import KSSConfig, KSSTrainer, RKSPMonitorCallback


def main() -> None:
    out, mode, flags = Path(sys.argv[1]), sys.argv[2], set(sys.argv[3:])
    lora, sft, seq2seq = "lora" in flags, "sft" in flags, "seq2seq" in flags
    torch.manual_seed(0)
    if seq2seq:
        from test_kss_trainers import tiny_t5

        model = tiny_t5(lora)
    else:
        model = tiny_lm("gpt2")
    if lora and not seq2seq:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                            lora_dropout=0.0, fan_in_fan_out=True))
    args = targs(out, max_steps=4, logging_steps=2, per_device_train_batch_size=4, ddp_backend="gloo")
    monitor = RKSPMonitorCallback(torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(9)),
                                  every_n_steps=2)
    kss = KSSConfig(mode=mode, every_n_steps=1, alpha=1.0, auto_tokens=256)
    if sft:
        from datasets import Dataset
        from test_kss_trainers import _sft_args, _tokenizer
        from trl import SFTTrainer

        from hf_rksp import kss_trainer

        data = Dataset.from_dict({"input_ids": Tokens(n=64, t=64).x.clamp(min=1).tolist()})
        tr = kss_trainer(SFTTrainer)(model=model, args=_sft_args(out, max_steps=4, logging_steps=2,
                                                                 ddp_backend="gloo"),
                                     train_dataset=data, processing_class=_tokenizer(), callbacks=[monitor],
                                     kss_config=kss)
    elif seq2seq:
        from test_kss_trainers import seq2seq_args
        from transformers import Seq2SeqTrainer

        from hf_rksp import kss_trainer

        tr = kss_trainer(Seq2SeqTrainer)(model=model, args=seq2seq_args(out, max_steps=4, logging_steps=2,
                                                                         ddp_backend="gloo"),
                                         train_dataset=Tokens(n=64, t=64), callbacks=[monitor], kss_config=kss)
    else:
        tr = KSSTrainer(model=model, args=args, train_dataset=Tokens(n=64, t=64), callbacks=[monitor],
                        kss_config=kss)
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "auto":
        m_local = tr.kss_auto_statistics()[0]
        ms = [None] * world
        dist.all_gather_object(ms, m_local)
        lo, hi = min(ms), max(ms)
        thr = 0.7 * lo + 0.3 * hi  # the rank with lo alone: off (lo < thr); the other alone: on; their mean: on
        tr.kss_config = dataclasses.replace(tr.kss_config, auto_low=thr, auto_threshold=thr)
    tr.train()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": world, "auto": tr.kss_state.auto, "kss_steps": tr.kss_state.kss_steps,
        "log_history": tr.state.log_history, "checksum": checksum,
        "monitor_steps": [h["step"] for h in monitor.history], "wrapped": type(tr.model_wrapped).__name__}))


if __name__ == "__main__":
    main()
