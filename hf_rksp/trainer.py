"""KSSTrainer (a transformers.Trainer with the KSS loss), KSSConfig, and RKSPMonitorCallback.

Usage: replace ``Trainer(...)`` with ``KSSTrainer(..., kss_config=KSSConfig(...))``.
The loss is defined in :mod:`hf_rksp.kss`; this module schedules it, adds it
to the task loss, logs it and checkpoints its state.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from . import atomic
from .blocks import find_blocks
from .errors import RKSPError
from .risk import default_lr
from .kss import SnapshotSampler, block_kss_loss

logger = logging.getLogger("hf_rksp")

KSS_STATE_NAME = "kss_state.json"
_DTYPES = {"float64": torch.float64, "float32": torch.float32}

__all__ = ["KSSConfig", "KSSTrainer", "RKSPMonitorCallback", "KSS_STATE_NAME"]


@dataclass
class KSSConfig:
    """Settings of Koopman Spectral Shaping (saved with every checkpoint).

    The loss added to the task loss at optimizer step t is
    ``weight * schedule(t) * L_KSS`` on steps where ``t % every_n_steps == 0``
    (see :mod:`hf_rksp.kss` for L_KSS).
    """

    mode: str = "on"  # "on" | "off" | "auto" (RKSP audit before the first step decides)
    weight: float = 0.1  # lambda
    warmup_steps: int = 0  # linear ramp of lambda from 0 over these optimizer steps
    decay: str = "constant"  # "constant" | "linear" | "cosine" (to 0 after warm-up)
    decay_steps: int | None = None  # None: decay over the rest of training (max_steps)
    every_n_steps: int = 1
    blocks: list[int] | None = None  # block indices (negative allowed); None: all blocks
    subsample: int = 256  # token positions per step
    rank: int = 64  # rank of the randomized DMD (full when the subsample allows no more)
    delta: float = 0.05  # band half-width
    target_radius: float = 1.0
    nodes: int = 32  # contour nodes M (transition width ~ radius / M)
    near_weight: float = 1.0
    outside_weight: float = 1.0
    radius_weight: float = 1.0
    radius_power: int = 8
    dtype: str = "float64"  # algebra dtype under autograd: float64 | float32
    min_denominator: float = 1e-3
    seed: int = 0  # token subsample generator (seeded per step: resumable)
    auto_threshold: float = 0.5  # mode="auto": KSS on when the mean near-unit mass M exceeds this (paper Fig. 7)
    auto_low: float = 0.3  # mode="auto": KSS off below this M; in between on for lr > 2x the family default
    auto_tokens: int = 2048  # mode="auto": tokens of the first training batches audited

    def __post_init__(self):
        if self.mode not in ("on", "off", "auto"):
            raise ValueError(f"KSSConfig.mode must be 'on', 'off' or 'auto', got {self.mode!r}")
        if not 0 < self.auto_low <= self.auto_threshold < 1 or self.auto_tokens < 2:
            raise ValueError("KSSConfig: 0 < auto_low <= auto_threshold < 1 and auto_tokens >= 2 are required")
        if self.decay not in ("constant", "linear", "cosine"):
            raise ValueError(f"KSSConfig.decay must be constant, linear or cosine, got {self.decay!r}")
        if self.every_n_steps < 1:
            raise ValueError(f"KSSConfig.every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.subsample < 2 or self.rank < 1 or self.nodes < 2 or self.radius_power < 1:
            raise ValueError("KSSConfig: subsample >= 2, rank >= 1, nodes >= 2 and radius_power >= 1 are required")
        if not 0 < self.delta < self.target_radius:
            raise ValueError(f"KSSConfig.delta must be in (0, target_radius), got {self.delta}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"KSSConfig.dtype must be float64 or float32, got {self.dtype!r}")
        if self.weight < 0 or self.warmup_steps < 0:
            raise ValueError("KSSConfig.weight and warmup_steps must be non-negative")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KSSConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def schedule(self, step: int, max_steps: int | None) -> float:
        """lambda at optimizer step ``step`` (0-based), before every_n_steps."""
        w = self.weight
        if self.warmup_steps > 0:
            w *= min(1.0, (step + 1) / self.warmup_steps)
        if self.decay != "constant":
            span = self.decay_steps
            if span is None:
                span = (max_steps or 0) - self.warmup_steps
            if span and span > 0:
                p = min(1.0, max(0.0, (step - self.warmup_steps) / span))
                w *= (1.0 - p) if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return w


def _profile_summary(model, input_ids: torch.Tensor, options) -> tuple[dict, int]:
    """The audit's model-level summary at the current weights (no grad), and the block count.

    ``profile_model`` puts the model in eval mode for the forward; its training mode is restored here.
    """
    from .profiling import profile_model
    from .summary import summarize

    was_training = model.training
    try:
        blocks, _, _ = profile_model(model, input_ids, options, device=str(next(model.parameters()).device),
                                     progress=False)
    finally:
        model.train(was_training)
    return summarize(blocks), len(blocks)


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


@dataclass
class _KSSState:
    kss_steps: int = 0  # optimizer steps on which KSS ran
    evaluations: int = 0  # KSS loss evaluations (micro-batches)
    skipped_counts: int = 0  # soft counts detached because a pole was too close
    degenerate_blocks: int = 0  # block evaluations skipped: snapshots with nothing to whiten
    last_step: int = -1
    last: dict = field(default_factory=dict)  # last evaluation's metrics
    auto: dict | None = None  # mode="auto": the audit's risk and the decision (kept on resume)


class KSSTrainer(Trainer):
    """``transformers.Trainer`` that adds lambda * L_KSS to the task loss.

    Everything else (TrainingArguments, gradient accumulation, mixed precision,
    ``accelerate launch``, callbacks, save/resume) is the Trainer's own.  Logs
    ``kss/loss``, ``kss/near_unit_mass`` (mean over selected blocks),
    ``kss/spectral_radius`` (max over selected blocks), ``kss/outside_mass``
    and ``kss/weight`` with the training loss; writes ``kss_state.json`` into
    every checkpoint and restores it on ``train(resume_from_checkpoint=...)``.
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
        if self._kss_blocks is None:
            _, blocks = find_blocks(self.accelerator.unwrap_model(model))
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
        """mode="auto": audit the model as it is now on the first training batches, at the Trainer's lr.

        KSS is enabled for the whole run by the paper's rule (Fig. 7): M > auto_threshold, or
        auto_low <= M with a learning rate above 2x the family's default;
        the decision is logged, stored in the KSS state and kept on resume.
        """
        from .profiling import ProfileOptions

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
        opts = ProfileOptions(kreiss=False)
        s, _ = _profile_summary(model, ids, opts)
        m = s["score"]
        lr, lr_default = self.args.learning_rate, default_lr(getattr(model.config, "model_type", None))
        # The paper's decision rule (Fig. 7) until a v2 risk model ships: M > 0.5 -> on, M < 0.3 -> off,
        # in between on for learning rates above 2x the family's default.
        enabled = m > cfg.auto_threshold or (m >= cfg.auto_low and lr > 2 * lr_default)
        decision = {"near_unit_mass": m, "spectral_radius_max": s["features"]["spectral_radius"]["max"],
                    "lr": lr, "lr_default": lr_default, "enabled": enabled,
                    "rule": f"paper Fig. 7: M > {cfg.auto_threshold:g}, or M >= {cfg.auto_low:g} with lr > 2x default"}
        self.kss_state.auto = decision
        logger.warning("RKSP before training: M = %.3f at lr %g (family default %g) -> KSS %s", m, lr, lr_default,
                       "ON" if enabled else "off")
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
        lam = self.kss_weight_now() if model.training else 0.0
        if lam <= 0.0:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        cfg = self.kss_config
        blocks = self._kss_selected_blocks(model)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.state.global_step * 101
                                            + self.kss_state.evaluations % 101)
        mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None  # dict or BatchEncoding
        valid = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) else None
        with SnapshotSampler(blocks, cfg.subsample, gen, valid) as sampler:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        dev_type = loss.device.type
        with torch.autocast(device_type=dev_type, enabled=False):
            results = []
            for x, y in sampler.pairs():
                try:
                    results.append(block_kss_loss(
                        x, y, rank=cfg.rank, delta=cfg.delta, target_radius=cfg.target_radius, nodes=cfg.nodes,
                        near_weight=cfg.near_weight, outside_weight=cfg.outside_weight,
                        radius_weight=cfg.radius_weight, radius_power=cfg.radius_power,
                        dtype=_DTYPES[cfg.dtype], min_denominator=cfg.min_denominator,
                    ))
                except RKSPError as e:  # e.g. a collapsed (constant) residual stream: nothing to shape
                    if not self.kss_state.degenerate_blocks:
                        logger.warning("KSS skips a block this step: %s", e)
                    self.kss_state.degenerate_blocks += 1
            if not results:
                return (loss, outputs) if return_outputs else loss
            kss = torch.stack([r.loss for r in results]).mean()
        term = lam * kss
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            term = term / self.current_gradient_accumulation_steps
        loss = loss + term.to(loss.dtype)
        self._kss_record(float(kss.detach()), lam, results)
        return (loss, outputs) if return_outputs else loss

    def _kss_record(self, kss: float, lam: float, results) -> None:
        st = self.kss_state
        st.evaluations += 1
        if st.last_step != self.state.global_step:
            st.kss_steps += 1
            st.last_step = self.state.global_step
        st.skipped_counts += sum(r.skipped for r in results)
        m = {
            "kss/loss": kss,
            "kss/weight": lam,
            "kss/near_unit_mass": sum(r.near_unit_mass for r in results) / len(results),
            "kss/spectral_radius": max(r.spectral_radius for r in results),
            "kss/outside_mass": sum(r.outside_mass for r in results) / len(results),
            "kss/soft_near_unit_mass": sum(r.soft_near for r in results) / len(results),
        }
        st.last = {**m, "step": self.state.global_step}
        for k, v in m.items():
            self._kss_pending[k] = self._kss_pending.get(k, 0.0) + v
        self._kss_pending_n += 1

    # -- logging ----------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._kss_pending_n:
            vals = torch.tensor([self._kss_pending[k] / self._kss_pending_n for k in sorted(self._kss_pending)],
                                dtype=torch.float64, device=self.args.device)
            if self.accelerator.num_processes > 1:
                vals = self.accelerator.reduce(vals, reduction="mean")
            logs.update({k: float(v) for k, v in zip(sorted(self._kss_pending), vals.tolist())})
            logs["kss/steps"] = self.kss_state.kss_steps
        auto = self.kss_state.auto
        if auto is not None and "loss" in logs and not self._kss_auto_logged:
            logs["kss/auto_near_unit_mass"] = auto["near_unit_mass"]
            logs["kss/auto_enabled"] = float(auto["enabled"])
            self._kss_auto_logged = True
            self._kss_pending, self._kss_pending_n = {}, 0
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, RKSPMonitorCallback):
                logs.update(cb.pop_pending())
        super().log(logs, start_time)

    # -- checkpoints ------------------------------------------------------
    def kss_state_dict(self) -> dict:
        st = asdict(self.kss_state)
        st["last"] = {k: _finite(v) for k, v in st["last"].items()}
        return {"format": 1, "config": self.kss_config.to_dict(), "state": st}

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
        self.kss_state = _KSSState(
            kss_steps=int(st["kss_steps"]), evaluations=int(st["evaluations"]),
            skipped_counts=int(st["skipped_counts"]), degenerate_blocks=int(st.get("degenerate_blocks", 0)),
            last_step=int(st["last_step"]), last=dict(st["last"]), auto=st.get("auto"),
        )
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
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)


class RKSPMonitorCallback(TrainerCallback):
    """Profile the model with the RKSP audit every N steps on a fixed calibration batch.

    Works with the plain ``Trainer``.  At train begin it records a baseline;
    every ``every_n_steps`` optimizer steps it runs
    :func:`hf_rksp.profiling.profile_model` (no grad) on ``input_ids`` and logs
    ``rksp/near_unit_mass`` (model-level M), ``rksp/spectral_radius`` (max
    over blocks) and ``rksp/outside_mass``, and warns (logger ``hf_rksp``)
    when M or the radius passes an absolute threshold or moves from the
    baseline by more than the allowed change.

    Logging: with KSSTrainer the metrics go through ``Trainer.log`` before any
    integration sees the logs.  With the plain Trainer they are added in
    ``on_log`` (to the logs dict and ``state.log_history``), so integrations
    placed *after* this callback see them: use
    ``trainer.callback_handler.callbacks.insert(0, monitor)`` (or
    :meth:`attach`) if TensorBoard / W&B must receive them.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        every_n_steps: int = 50,
        options=None,
        *,
        max_near_unit_mass: float | None = None,
        max_spectral_radius: float | None = None,
        max_near_unit_change: float | None = 0.1,
        max_radius_change: float | None = 0.25,
    ):
        from .profiling import ProfileOptions

        if input_ids.ndim != 2:
            raise ValueError("input_ids must be (B, T) token ids")
        self.input_ids = input_ids
        self.every_n_steps = int(every_n_steps)
        self.options = options or ProfileOptions(batch_size=int(input_ids.shape[0]))
        self.max_near_unit_mass = max_near_unit_mass
        self.max_spectral_radius = max_spectral_radius
        self.max_near_unit_change = max_near_unit_change
        self.max_radius_change = max_radius_change
        self.baseline: dict | None = None
        self.history: list[dict] = []
        self.warnings: list[str] = []
        self._pending: dict[str, float] = {}

    def attach(self, trainer) -> "RKSPMonitorCallback":
        """Put this callback first so every integration sees its metrics."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def profile(self, model) -> dict:
        from .spectral import FEATURES

        s, _ = _profile_summary(model, self.input_ids, self.options)
        out = {"rksp/near_unit_mass": s["score"], "rksp/spectral_radius": s["features"]["spectral_radius"]["max"]}
        out.update({f"rksp/{f.name}_mean": s["features"][f.name]["mean"] for f in FEATURES
                    if s["features"][f.name]["mean"] is not None})
        return out

    def _check(self, m: dict, step: int, is_zero: bool) -> None:
        msgs = []
        M, rho = m["rksp/near_unit_mass"], m["rksp/spectral_radius"]
        if self.max_near_unit_mass is not None and M > self.max_near_unit_mass:
            msgs.append(f"near-unit mass {M:.3f} > {self.max_near_unit_mass}")
        if self.max_spectral_radius is not None and rho > self.max_spectral_radius:
            msgs.append(f"spectral radius {rho:.3f} > {self.max_spectral_radius}")
        if self.baseline is not None:
            M0, rho0 = self.baseline["rksp/near_unit_mass"], self.baseline["rksp/spectral_radius"]
            if self.max_near_unit_change is not None and abs(M - M0) > self.max_near_unit_change:
                msgs.append(f"near-unit mass moved {M0:.3f} -> {M:.3f}")
            if self.max_radius_change is not None and rho0 > 0 and abs(rho / rho0 - 1) > self.max_radius_change:
                msgs.append(f"spectral radius moved {rho0:.3f} -> {rho:.3f}")
        for msg in msgs:
            text = f"RKSP monitor, step {step}: {msg}"
            self.warnings.append(text)
            if is_zero:
                logger.warning(text)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.baseline is None:
            self.baseline = self.profile(model)
            self.history.append({"step": state.global_step, **self.baseline})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps:
            return control
        m = self.profile(model)
        self.history.append({"step": state.global_step, **m})
        self._check(m, state.global_step, state.is_world_process_zero)
        self._pending = dict(m)
        control.should_log = True
        return control

    def pop_pending(self) -> dict:
        p, self._pending = self._pending, {}
        return p

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            p = self.pop_pending()
            logs.update(p)
            if state.log_history:
                state.log_history[-1].update(p)
        return control
