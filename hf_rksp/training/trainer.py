"""KSSTrainer (a transformers.Trainer with the paper's KSS loss), and RKSPMonitorCallback.

Usage: replace ``Trainer(...)`` with ``KSSTrainer(..., kss_config=KSSConfig(...))``.
The loss and its settings are defined in :mod:`hf_rksp.kss`; this module
schedules it, adds it to the task loss, logs it and checkpoints its state.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from hf_rksp.capture.profile import ProfileOptions
from hf_rksp.models.blocks import find_blocks
from hf_rksp.models.families import default_lr
from hf_rksp.training.kss import KSSConfig, KSSStep
from hf_rksp.training.monitor import RKSPMonitorCallback, profile_summary
from hf_rksp.utils import atomic

logger = logging.getLogger("hf_rksp")

KSS_STATE_NAME = "kss_state.json"

__all__ = ["KSSConfig", "KSSTrainer", "RKSPMonitorCallback", "KSS_STATE_NAME", "has_normalization"]


def has_normalization(model) -> bool:
    """True if any submodule is a normalization layer (LayerNorm, RMSNorm, ... by class name)."""
    return any(isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm))
               or type(m).__name__.endswith("Norm") for m in model.modules())


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


@dataclass
class _KSSState:
    kss_steps: int = 0  # optimizer steps on which KSS ran
    evaluations: int = 0  # KSS loss evaluations (micro-batches)
    layers_evaluated: int = 0  # layer losses computed
    layers_skipped: int = 0  # of those, dropped: ill-conditioned eigenvalues (or a non-finite value)
    degenerate_layers: int = 0  # layers with snapshots that cannot be whitened (constant stream)
    last_step: int = -1
    last: dict = field(default_factory=dict)  # last evaluation's metrics
    auto: dict | None = None  # mode="auto": the profile and the decision (kept on resume)


class KSSTrainer(Trainer):
    """``transformers.Trainer`` that adds alpha * mean_l L_l (the paper's KSS) to the task loss.

    Everything else (TrainingArguments, gradient accumulation, mixed precision,
    ``accelerate launch``, callbacks, save/resume) is the Trainer's own.  With
    each training log: ``kss/loss`` (mean L_l), ``kss/alpha``,
    ``kss/soft_near_unit_mass`` and ``kss/near_unit_mass`` (soft and hard,
    mean over the drawn layers), ``kss/expansive_mass``,
    ``kss/spectral_radius`` (max), ``kss/layers_skipped`` (running total)
    and ``kss/steps`` (with ``measure_grad_norms`` or ``max_grad_ratio``, also
    ``kss/task_grad_norm``, ``kss/grad_norm`` and ``kss/grad_scale``); writes ``kss_state.json`` into every checkpoint and
    restores it on ``train(resume_from_checkpoint=...)``.
    """

    def __init__(self, *args, kss_config: KSSConfig | None = None, **kwargs):
        self._kss_config_given = kss_config is not None
        self.kss_config = kss_config if kss_config is not None else KSSConfig()
        self.kss_state = _KSSState()
        self._kss_pending: dict[str, float] = {}
        self._kss_pending_n = 0
        self._kss_blocks: list | None = None
        self._kss_auto_logged = False
        super().__init__(*args, **kwargs)

    # -- the loss ---------------------------------------------------------
    def _kss_selected_blocks(self, model) -> list:
        """The blocks KSS draws from (KSSConfig.blocks of the model's residual blocks)."""
        if self._kss_blocks is None:
            _, blocks = find_blocks(self.accelerator.unwrap_model(model), self.kss_config.block_path)
            n = len(blocks)
            idx = list(range(n)) if self.kss_config.blocks is None else self.kss_config.blocks
            sel = []
            for i in idx:
                if not -n <= i < n:
                    raise ValueError(f"KSSConfig.blocks: index {i} out of range for {n} blocks")
                sel.append(blocks[i % n])
            self._kss_blocks = sel
        return self._kss_blocks

    @property
    def kss_enabled(self) -> bool:
        mode = self.kss_config.mode
        return mode == "on" or (mode == "auto" and bool((self.kss_state.auto or {}).get("enabled")))

    def kss_auto_decide(self) -> dict:
        """mode="auto": profile the model as it is now on the first training batches (RKSP v2, no Kreiss).

        The paper's decision flow (Fig. 7), until a v2 risk model ships: KSS on when
        M > auto_threshold or the layer-mean kappa(V) > auto_kappa; off when M < auto_low (kappa modest);
        in between, on for a model without normalization or a learning rate above 2x the family's default.
        The decision is logged, stored in the KSS state and kept on resume.
        """
        cfg = self.kss_config
        rows, n = [], 0
        for batch in self.get_train_dataloader():
            ids = batch["input_ids"]
            rows.append(ids.reshape(-1, ids.shape[-1]).cpu())
            n += rows[-1].numel()
            if n >= cfg.auto_tokens:
                break
        ids = torch.cat(rows)
        ids = ids[: max(1, cfg.auto_tokens // ids.shape[1])]
        model = self.accelerator.unwrap_model(self.model)
        s, _ = profile_summary(model, ids, ProfileOptions(kreiss=False, blocks=cfg.block_path))
        m = s.score
        kappa = s.features["eigvec_condition"].mean
        kappa = math.inf if kappa is None else kappa  # null: some block's V is singular
        lr, lr_default = self.args.learning_rate, default_lr(getattr(getattr(model, "config", None),
                                                                     "model_type", None))
        normed = has_normalization(model)
        if m > cfg.auto_threshold or kappa > cfg.auto_kappa:
            enabled, why = True, f"M > {cfg.auto_threshold:g}" if m > cfg.auto_threshold else \
                f"kappa > {cfg.auto_kappa:g}"
        elif m < cfg.auto_low:
            enabled, why = False, f"M < {cfg.auto_low:g} with modest kappa"
        else:
            enabled = (not normed) or lr > 2 * lr_default
            why = ("no normalization" if not normed else f"lr > 2x default {lr_default:g}") if enabled else \
                f"M in [{cfg.auto_low:g}, {cfg.auto_threshold:g}], normalized, lr <= 2x default"
        decision = {"near_unit_mass": m, "eigvec_condition_mean": _finite(kappa),
                    "spectral_radius_max": s.features["spectral_radius"].max, "lr": lr,
                    "lr_default": lr_default, "normalized": normed, "enabled": enabled, "reason": why}
        self.kss_state.auto = decision
        logger.warning("RKSP before training: M = %.3f, mean kappa %.3g, lr %g (family default %g) -> KSS %s (%s)",
                       m, kappa, lr, lr_default, "ON" if enabled else "off", why)
        return decision

    def kss_weight_now(self) -> float:
        cfg = self.kss_config
        step = self.state.global_step
        if not self.kss_enabled or step % cfg.every_n_steps:
            return 0.0
        return cfg.schedule(step, self.state.max_steps)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror of Trainer.training_step: True if the Trainer will NOT divide the loss by the GA steps."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        alpha = self.kss_weight_now() if model.training else 0.0
        if alpha <= 0.0:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        pool = self._kss_selected_blocks(model)
        mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None  # dict or BatchEncoding
        # one layer draw per optimizer step (all its micro-batches); tokens drawn per micro-batch
        with KSSStep(pool, self.kss_config, step=self.state.global_step, micro=self.kss_state.evaluations,
                     attention_mask=mask) as kss:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        out = kss.result(loss, alpha, [p for p in model.parameters() if p.requires_grad])
        if out.degenerate and not self.kss_state.degenerate_layers:
            logger.warning("KSS skips a block this step: %s", out.degenerate_reason)
        if out.term is not None:
            term = out.term
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                term = term / self.current_gradient_accumulation_steps
            loss = loss + term.to(loss.dtype)
        self._kss_record(alpha, out.layers, out.degenerate, out.grad_norms)
        return (loss, outputs) if return_outputs else loss

    def _kss_record(self, alpha: float, results, degenerate: int, norms: dict[str, float] | None = None) -> None:
        st = self.kss_state
        st.evaluations += 1
        if st.last_step != self.state.global_step:
            st.kss_steps += 1
            st.last_step = self.state.global_step
        st.layers_evaluated += len(results)
        st.layers_skipped += sum(r.skipped for r in results)
        st.degenerate_layers += degenerate
        if not results:
            return
        used = [r for r in results if not r.skipped]

        def mean(values):
            values = [v for v in values if math.isfinite(v)]
            return sum(values) / len(values) if values else math.nan

        m = {
            "kss/loss": mean([float(r.loss.detach()) for r in used]) if used else math.nan,
            "kss/alpha": alpha,
            "kss/soft_near_unit_mass": mean([r.soft_near_unit_mass for r in results]),
            "kss/near_unit_mass": mean([r.near_unit_mass for r in results]),
            "kss/expansive_mass": mean([r.expansive_mass for r in results]),
            "kss/spectral_radius": max((r.spectral_radius for r in results if math.isfinite(r.spectral_radius)),
                                       default=math.nan),
            **(norms or {}),
        }
        st.last = {**m, "step": self.state.global_step}
        for k, v in m.items():
            if math.isfinite(v):
                self._kss_pending[k] = self._kss_pending.get(k, 0.0) + v
                self._kss_pending[k + "#n"] = self._kss_pending.get(k + "#n", 0) + 1
        self._kss_pending_n += 1

    # -- logging ----------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._kss_pending_n:
            keys = sorted(k for k in self._kss_pending if not k.endswith("#n"))
            vals = torch.tensor([self._kss_pending[k] / self._kss_pending[k + "#n"] for k in keys],
                                dtype=torch.float64, device=self.args.device)
            if self.accelerator.num_processes > 1:
                vals = self.accelerator.reduce(vals, reduction="mean")
            logs.update({k: float(v) for k, v in zip(keys, vals.tolist())})
            logs["kss/steps"] = self.kss_state.kss_steps
            logs["kss/layers_skipped"] = self.kss_state.layers_skipped
            self._kss_pending, self._kss_pending_n = {}, 0
        auto = self.kss_state.auto
        if auto is not None and "loss" in logs and not self._kss_auto_logged:
            logs["kss/auto_near_unit_mass"] = auto["near_unit_mass"]
            logs["kss/auto_enabled"] = float(auto["enabled"])
            self._kss_auto_logged = True
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, RKSPMonitorCallback):
                logs.update(cb.pop_pending())
        super().log(logs, start_time)

    # -- checkpoints ------------------------------------------------------
    def kss_state_dict(self) -> dict:
        st = asdict(self.kss_state)
        st["last"] = {k: _finite(v) for k, v in st["last"].items()}
        return {"format": 2, "config": self.kss_config.to_dict(), "state": st}

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            out = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            atomic.write_json(os.path.join(out, KSS_STATE_NAME), self.kss_state_dict())

    def load_kss_state(self, checkpoint_dir: str) -> bool:
        """Restore KSS counters (and the config, unless one was passed) from a checkpoint."""
        path = os.path.join(checkpoint_dir, KSS_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning("no %s in %s: KSS state starts fresh", KSS_STATE_NAME, checkpoint_dir)
            return False
        with open(path) as f:
            d = json.load(f)
        saved = KSSConfig.from_dict(d["config"])
        if not self._kss_config_given:
            self.kss_config = saved
            self._kss_blocks = None
        elif saved != self.kss_config:
            logger.warning("resuming with a KSSConfig that differs from the checkpoint's; using the one passed")
        st = d["state"]
        known = {f for f in _KSSState.__dataclass_fields__}
        self.kss_state = _KSSState(**{k: v for k, v in st.items() if k in known})
        return True

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self.load_kss_state(resume_from_checkpoint)
        if self.kss_config.mode == "auto" and self.kss_state.auto is None:
            self.kss_auto_decide()
        if self.kss_enabled and not (self.args.max_grad_norm or 0) > 0 and self.kss_config.max_grad_ratio is None:
            # measured in the reproduction (docs/results/kss.md): after a loss spike
            # the unstable penalty's gradient is 10-1e7x the task's, and unclipped it finished runs that
            # plain AdamW recovered from
            logger.warning("KSS is on without gradient clipping (max_grad_norm=%s) or max_grad_ratio: after a "
                           "loss spike its gradient is unbounded; keep max_grad_norm (the Trainer's default 1.0)",
                           self.args.max_grad_norm)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)


