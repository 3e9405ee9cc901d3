"""One run of the divergence sweep: features at init, then training to a divergence label.

At initialization, before any optimizer step, a run records the RKSP v1
features (through the audit's own ``profile_model``) and the baselines on the
same model; then it trains with :class:`hf_rksp.KSSTrainer` (KSS ``off`` or
``on``: the same code path either way) and labels the run.

**Divergence label** (:func:`label`): a run diverged if its training loss is
ever non-finite, or if after warm-up the mean loss over any ``WINDOW``
consecutive steps exceeds the initial loss (step 0) by more than ``MARGIN``
nats, within the fixed budget of ``spec.steps`` optimizer steps.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from ..audit import AuditOptions, profile_model
from ..calibration import default_text
from ..report import summarize
from ..risk import SUMMARY_KEY
from .model import SweepLM, SweepLMConfig

WINDOW = 10
MARGIN = 0.5
CALIBRATION_TOKENS = 2048
SEQ_LEN = 64
BATCH = 16

#: init-time predictors recorded per run (name -> higher value means ...: the fitted sign decides)
RKSP_FEATURES = ("rksp_near_unit_mass", "rksp_spectral_radius_max", "rksp_outside_mass_mean")
BASELINES = ("grad_norm_global", "grad_norm_block_max", "activation_growth", "attn_max_logit",
             "attn_min_entropy")


@dataclass(frozen=True)
class RunSpec:
    style: str = "gpt"
    norm: str = "pre"
    lr: float = 1e-3
    init_std: float = 0.02
    n_layers: int = 4
    d_model: int = 64
    warmup: int = 0
    seed: int = 0
    kss: bool = False
    steps: int = 200

    @property
    def config_id(self) -> str:
        """Everything but the seed: the unit of grouped cross-validation."""
        return (f"{self.style}-{self.norm}-lr{self.lr:.3g}-std{self.init_std:g}-L{self.n_layers}-d{self.d_model}"
                f"-wu{self.warmup}-kss{int(self.kss)}-T{self.steps}")

    @property
    def run_id(self) -> str:
        return f"{self.config_id}-s{self.seed}"

    @property
    def arch_id(self) -> str:
        """What the init features depend on (not lr, warm-up, KSS or the budget)."""
        return f"{self.style}-{self.norm}-std{self.init_std:g}-L{self.n_layers}-d{self.d_model}-s{self.seed}"


@lru_cache(maxsize=1)
def corpus() -> torch.Tensor:
    """Byte ids of the embedded calibration text (byte-level vocabulary of 256: no tokenizer needed)."""
    return torch.frombuffer(bytearray(default_text().encode("utf-8")), dtype=torch.uint8).long()


def calibration_ids(tokens: int = CALIBRATION_TOKENS, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """The first ``tokens`` bytes of the corpus, as the audit takes its first tokens."""
    return corpus()[:tokens].view(tokens // seq_len, seq_len)


def training_batches(seed: int, steps: int, batch: int = BATCH, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """(steps * batch, seq_len) random windows of the corpus, seeded (data order is part of a seed)."""
    ids = corpus()
    g = torch.Generator().manual_seed(10_007 + seed)
    starts = torch.randint(0, ids.numel() - seq_len, (steps * batch,), generator=g)
    return ids[starts[:, None] + torch.arange(seq_len)]


def build_model(spec: RunSpec) -> SweepLM:
    torch.manual_seed(spec.seed)
    cfg = SweepLMConfig(d_model=spec.d_model, n_layers=spec.n_layers, n_heads=max(1, spec.d_model // 32),
                        max_len=SEQ_LEN, norm=spec.norm, style=spec.style, init_std=spec.init_std)
    return SweepLM(cfg)


def rksp_features(model: SweepLM) -> dict[str, float]:
    """RKSP v1 model-level features at the current weights (the audit's defaults, byte-level calibration)."""
    model.eval()
    blocks, _, _ = profile_model(model, calibration_ids(), AuditOptions(seq_len=SEQ_LEN), progress=False)
    s = summarize(blocks)
    return {**{name: s[key] for name, key in SUMMARY_KEY.items()}, "rksp_fit_r2_mean": s["fit_r2_mean"]}


def baselines(model: SweepLM, batch: torch.Tensor) -> dict[str, float]:
    """Gradient and activation baselines on the first training batch, at init."""
    model.train()
    model.zero_grad(set_to_none=True)
    norms: list[float] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: norms.append(float(a[0].detach().norm(dim=-1).mean())))]
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, a, o: norms.append(float(o.detach().norm(dim=-1).mean()))))
    try:
        model(batch, labels=batch).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    sq = {n: float(p.grad.pow(2).sum()) for n, p in model.named_parameters() if p.grad is not None}
    per_block = [sum(v for n, v in sq.items() if n.startswith(f"blocks.{i}.")) for i in range(len(model.blocks))]
    model.zero_grad(set_to_none=True)
    for b in model.blocks:
        b.stats = []
    try:
        with torch.no_grad():
            model(batch)
        stats = [s for b in model.blocks for s in b.stats]
    finally:
        for b in model.blocks:
            b.stats = None
    return {
        "grad_norm_global": math.sqrt(sum(sq.values())),
        "grad_norm_block_max": math.sqrt(max(per_block)),
        "activation_growth": norms[1] / max(norms[0], 1e-30),
        "attn_max_logit": max(s["max_logit"] for s in stats),
        "attn_min_entropy": min(s["min_entropy"] for s in stats),
    }


def label(losses: list[float], warmup: int) -> tuple[bool, str, int | None]:
    """(diverged, reason, step) by the sweep's divergence definition (module docstring)."""
    for t, v in enumerate(losses):
        if not math.isfinite(v):
            return True, "non-finite loss", t
    if not losses:
        return False, "", None
    l0 = losses[0]
    for t in range(max(warmup, WINDOW - 1), len(losses)):
        if sum(losses[t - WINDOW + 1: t + 1]) / WINDOW > l0 + MARGIN:
            return True, f"loss {MARGIN:g} nats above its initial value", t
    return False, "", None


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(model: SweepLM, spec: RunSpec, data: torch.Tensor, kss_config=None) -> dict:
    """AdamW with KSSTrainer for ``spec.steps`` steps; stops early once the label is decided as diverged."""
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    from ..trainer import KSSConfig, KSSTrainer

    losses: list[float] = []
    hook = model.register_forward_hook(
        lambda m, a, kw, out: losses.append(float(out.loss.detach())) if m.training and out.loss is not None else None,
        with_kwargs=True)

    class StopOnDivergence(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if label(losses, spec.warmup)[0]:
                control.should_training_stop = True

    cfg = kss_config if kss_config is not None else KSSConfig(mode="on" if spec.kss else "off")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=spec.steps, per_device_train_batch_size=BATCH, learning_rate=spec.lr,
            warmup_steps=spec.warmup, lr_scheduler_type="constant_with_warmup", weight_decay=0.01,
            max_grad_norm=0.0, logging_steps=spec.steps, logging_nan_inf_filter=False, report_to=[],
            save_strategy="no", disable_tqdm=True, use_cpu=True, seed=spec.seed, dataloader_num_workers=0,
        )
        trainer = KSSTrainer(model=model, args=args, train_dataset=_Windows(data), kss_config=cfg,
                             callbacks=[StopOnDivergence()])
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        try:
            trainer.train()
        except (RuntimeError, ValueError):  # KSS's linear algebra on non-finite activations
            if not losses or math.isfinite(losses[-1]):
                raise
        finally:
            hook.remove()
    diverged, reason, step = label(losses, spec.warmup)
    finite = [v for v in losses if math.isfinite(v)]
    tail = finite[-WINDOW:]
    return {"diverged": diverged, "reason": reason, "diverged_step": step, "steps_run": len(losses),
            "loss_initial": losses[0] if losses else None, "loss_final": sum(tail) / len(tail) if tail else None,
            "train_seconds": time.perf_counter() - t0}


def run(spec: RunSpec) -> dict:
    """One sweep row: the spec, init features, baselines, and the training outcome."""
    torch.set_num_threads(int(os.environ.get("HF_RKSP_SWEEP_THREADS", "1")))
    model = build_model(spec)
    data = training_batches(spec.seed, spec.steps)
    t0 = time.perf_counter()
    feats = rksp_features(model)
    t1 = time.perf_counter()
    base = baselines(model, data[:BATCH])
    outcome = train(model, spec, data)
    return {**asdict(spec), "config_id": spec.config_id, "run_id": spec.run_id, **feats, **base,
            "rksp_seconds": t1 - t0, **outcome}
