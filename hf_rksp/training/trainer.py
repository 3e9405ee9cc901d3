"""KSSMixin (the paper's KSS loss for any transformers.Trainer subclass), KSSTrainer, RKSPMonitorCallback.

Usage: replace ``Trainer(...)`` with ``KSSTrainer(..., kss_config=KSSConfig(...))``; for another trainer
(TRL's ``SFTTrainer``, ``Seq2SeqTrainer``...) put the mixin first: ``class KSSSFT(KSSMixin, SFTTrainer)``,
or ``kss_trainer(SFTTrainer)``.  The loss and its settings are defined in :mod:`hf_rksp.training.kss`
(``KSSStep``, the one KSS step); this module schedules it, adds it to the task loss, logs it and checkpoints
its state.
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
from hf_rksp.errors import ConfigError, RKSPError
from hf_rksp.models.blocks import find_blocks, unwrap_model
from hf_rksp.models.families import default_lr
from hf_rksp.training.kss import KSSConfig, KSSStep
from hf_rksp.training.monitor import RKSPMonitorCallback, profile_summary
from hf_rksp.utils import atomic

logger = logging.getLogger("hf_rksp")

KSS_STATE_NAME = "kss_state.json"

__all__ = ["KSS_STATE_NAME", "KSSConfig", "KSSMixin", "KSSTrainer", "RKSPMonitorCallback", "has_normalization",
           "kss_trainer"]

#: per-evaluation metrics, averaged over the KSS evaluations of a logging window (and over ranks); a fixed
#: list, so every rank reduces the same tensor whatever it measured
_METRICS = ("kss/loss", "kss/alpha", "kss/soft_near_unit_mass", "kss/near_unit_mass", "kss/expansive_mass",
            "kss/spectral_radius", "kss/task_grad_norm", "kss/grad_norm", "kss/grad_scale")
#: KSS evaluations in a row where every drawn block was skipped (ill-conditioned / non-finite / degenerate)
#: before the trainer warns: the term then shapes nothing
ALL_SKIPPED_WARN = 3


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
    layers_no_grad: int = 0  # of those, dropped: neither snapshot carried gradient (the block and its inputs frozen)
    degenerate_layers: int = 0  # layers with snapshots that cannot be whitened (constant stream)
    all_skipped_streak: int = 0  # KSS evaluations in a row whose drawn blocks were all skipped
    last_step: int = -1
    last: dict = field(default_factory=dict)  # last evaluation's metrics
    auto: dict | None = None  # mode="auto": the profile and the decision (kept on resume)


def _check_mixin_order(cls: type) -> None:
    """KSSMixin's compute_loss must wrap the trainer's: no class before it in the MRO may define its own
    compute_loss (unless it derives from KSSMixin, and so calls it through super())."""
    for c in cls.__mro__:
        if c is KSSMixin:
            return
        if "compute_loss" in c.__dict__ and not issubclass(c, KSSMixin):
            raise TypeError(f"{c.__name__} defines compute_loss before KSSMixin in {cls.__name__}'s bases, so "
                            f"KSS would never run; put KSSMixin first: class {cls.__name__}(KSSMixin, {c.__name__})")


class KSSMixin:
    """Adds alpha * mean_l L_l (the paper's KSS, :class:`hf_rksp.training.kss.KSSStep`) to the loss of any
    ``transformers.Trainer`` subclass.  Put it first in the bases, and pass ``kss_config``::

        class KSSSFTTrainer(KSSMixin, SFTTrainer):   # or kss_trainer(SFTTrainer)
            pass

        KSSSFTTrainer(model=..., args=SFTConfig(...), train_dataset=ds, kss_config=KSSConfig())

    It wraps the parent's ``compute_loss`` (whatever forward that runs: the hooks keep the snapshots of the
    first forward with grad), adds the term, and raises :class:`hf_rksp.errors.InertKSSError` when a KSS
    step captures no snapshot with gradient.  Everything else (arguments, gradient accumulation, mixed
    precision, ``accelerate launch`` / ``torchrun``, callbacks, save/resume) is the trainer's own.
    Logs (at every training log while KSS is enabled): ``kss/task_loss`` and ``kss/term`` (``loss`` =
    ``kss/task_loss`` + ``kss/term``: the task loss alone, and the weighted KSS term's share, over the same
    steps), ``kss/loss`` (mean L_l), ``kss/alpha``, ``kss/soft_near_unit_mass`` and ``kss/near_unit_mass``
    (soft and hard, mean over the drawn layers), ``kss/expansive_mass``, ``kss/spectral_radius`` (max),
    ``kss/layers_skipped`` (ill-conditioned or non-finite), ``kss/layers_no_grad``,
    ``kss/layers_degenerate`` (running totals) and ``kss/steps`` (with ``measure_grad_norms`` or
    ``max_grad_ratio``, also ``kss/task_grad_norm``, ``kss/grad_norm`` and ``kss/grad_scale``); writes
    ``kss_state.json`` into every checkpoint and restores it on ``train(resume_from_checkpoint=...)``.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _check_mixin_order(cls)  # when the class is defined: class X(SFTTrainer, KSSMixin) would never run KSS

    def __init__(self, *args, kss_config: KSSConfig | None = None, **kwargs):
        if not isinstance(self, Trainer):
            raise TypeError(f"KSSMixin needs a transformers.Trainer subclass after it: {type(self).__name__}")
        self._kss_config_given = kss_config is not None
        self.kss_config = kss_config if kss_config is not None else KSSConfig()
        self.kss_state = _KSSState()
        self._kss_pending: dict[str, float] = {}
        self._kss_term_sum = 0.0  # the term's share of the Trainer's summed loss since the last log
        self._kss_log_from = 0  # global step of the last log
        self._kss_blocks: list | None = None
        self._kss_auto_logged = False
        self._kss_all_skipped_warned = False
        super().__init__(*args, **kwargs)

    # -- the loss ---------------------------------------------------------
    def _kss_selected_blocks(self, model) -> list:
        """The blocks KSS draws from (KSSConfig.blocks of the model's residual blocks)."""
        if self._kss_blocks is None:
            inner = unwrap_model(self.accelerator.unwrap_model(model))
            try:
                _, blocks = find_blocks(inner, self.kss_config.block_path)
            except RKSPError as e:
                raise ConfigError(f"KSS cannot find the residual blocks of {type(inner).__name__} ({e}); point "
                                  "at the block list with `block_path` (e.g. KSSConfig(block_path=\"model.layers\"))",
                                  param="block_path") from e
            n = len(blocks)
            idx = list(range(n)) if self.kss_config.blocks is None else self.kss_config.blocks
            sel = []
            for i in idx:
                if not -n <= i < n:
                    raise ConfigError(f"index {i} out of range for {n} blocks (KSSConfig)", param="blocks")
                sel.append(blocks[i % n])
            self._kss_blocks = sel
        return self._kss_blocks

    @property
    def kss_enabled(self) -> bool:
        mode = self.kss_config.mode
        return mode == "on" or (mode == "auto" and bool((self.kss_state.auto or {}).get("enabled")))

    def kss_auto_statistics(self) -> tuple[float, float, float]:
        """This rank's (M, layer-mean kappa(V), max spectral radius) on the first ``auto_tokens`` tokens of its
        training batches, at the current weights (RKSP v2, no Kreiss; kappa inf when some block's V is
        singular)."""
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
        model = unwrap_model(self.accelerator.unwrap_model(self.model))
        s, _ = profile_summary(model, ids, ProfileOptions(kreiss=False, blocks=cfg.block_path))
        kappa = s.features["eigvec_condition"].mean
        return s.score, math.inf if kappa is None else kappa, s.features["spectral_radius"].max

    def kss_auto_preflight(self):
        """This rank's pre-flight check of the planned run (``auto_rule="preflight"``): ``hf_rksp.preflight``
        on a copy of the model, with its training batches and the TrainingArguments' lr, warm-up, steps,
        clipping, weight decay and batch size."""
        from hf_rksp.pipeline.preflight import preflight

        args = self.args
        loader = self.get_train_dataloader()
        total = args.max_steps if args.max_steps > 0 else \
            max(1, math.ceil(len(loader) / args.gradient_accumulation_steps) * math.ceil(args.num_train_epochs))
        batches = ({k: v for k, v in b.items() if k in ("input_ids", "labels", "attention_mask")} for b in loader)
        model = unwrap_model(self.accelerator.unwrap_model(self.model))
        return preflight(model, batches, lr=args.learning_rate, warmup_steps=args.get_warmup_steps(total),
                         total_steps=total, max_grad_norm=args.max_grad_norm or 0.0, weight_decay=args.weight_decay,
                         batch_size=args.per_device_train_batch_size, blocks=self.kss_config.block_path,
                         seed=self.kss_config.seed)

    def kss_auto_decide(self) -> dict:
        """mode="auto": profile the model as it is now on the first training batches (RKSP v2, no Kreiss).

        The paper's decision flow (Fig. 7), until a v2 risk model ships: KSS on when
        M > auto_threshold or the layer-mean kappa(V) > auto_kappa; off when M < auto_low (kappa modest);
        in between, on for a model without normalization or a learning rate above 2x the family's default.
        The decision is logged, stored in the KSS state and kept on resume.  Under DDP each rank profiles its
        own batches (:meth:`kss_auto_statistics`) and the decision is taken once from all of them (M and
        kappa averaged over ranks, the radius maxed), so it is the same on every rank.

        ``auto_rule="preflight"`` [ours]: each rank runs the pre-flight check on its own batches; KSS is on when
        the ranks' mean P(divergence) >= 0.5, and the paper's rule decides where the pre-flight gives no
        probability (outside what its model was fitted on: the reason is logged and kept).
        """
        cfg = self.kss_config
        m, kappa, rho = self.kss_auto_statistics()
        check = self.kss_auto_preflight() if cfg.auto_rule == "preflight" else None
        p = math.nan if check is None or check.probability is None else float(check.probability)
        per_rank = [m]
        if self.accelerator.num_processes > 1:
            # one unconditional gather: a rank deciding alone can turn KSS on where another has it off, and
            # the job then hangs in the first collective only one of them reaches
            local = torch.tensor([[m, kappa, rho, p]], dtype=torch.float64, device=self.args.device)
            every = self.accelerator.gather(local).cpu()
            per_rank = every[:, 0].tolist()
            m, kappa, rho = float(every[:, 0].mean()), float(every[:, 1].mean()), float(every[:, 2].max())
            p = float(every[:, 3].mean())  # nan when any rank had no probability: the paper's rule decides
        model = unwrap_model(self.accelerator.unwrap_model(self.model))
        lr, lr_default = self.args.learning_rate, default_lr(getattr(getattr(model, "config", None),
                                                                     "model_type", None))
        normed = has_normalization(model)
        if math.isfinite(p):
            enabled, why = p >= 0.5, f"pre-flight P(divergence) = {p:.2f} {'>=' if p >= 0.5 else '<'} 0.5"
        elif m > cfg.auto_threshold or kappa > cfg.auto_kappa:
            enabled, why = True, f"M > {cfg.auto_threshold:g}" if m > cfg.auto_threshold else \
                f"kappa > {cfg.auto_kappa:g}"
        elif m < cfg.auto_low:
            enabled, why = False, f"M < {cfg.auto_low:g} with modest kappa"
        else:
            enabled = (not normed) or lr > 2 * lr_default
            why = ("no normalization" if not normed else f"lr > 2x default {lr_default:g}") if enabled else \
                f"M in [{cfg.auto_low:g}, {cfg.auto_threshold:g}], normalized, lr <= 2x default"
        if cfg.auto_rule == "preflight" and not math.isfinite(p):
            none = check.unavailable_reason if check.probability is None else "not on every rank"
            why = f"the pre-flight gave no probability ({none}); the paper's rule: {why}"
        decision = {"near_unit_mass": m, "eigvec_condition_mean": _finite(kappa),
                    "spectral_radius_max": rho, "lr": lr, "lr_default": lr_default, "normalized": normed,
                    "enabled": enabled, "reason": why, "near_unit_mass_per_rank": per_rank, "rule": cfg.auto_rule,
                    "preflight_probability": p if math.isfinite(p) else None}
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
        # one layer draw per optimizer step (all its micro-batches); tokens drawn per micro-batch.  The
        # parent is asked for what our caller asked for, no more: TRL's SFTTrainer answers return_outputs=True
        # with a second, no-grad forward
        with KSSStep(pool, self.kss_config, step=self.state.global_step, micro=self.kss_state.evaluations,
                     attention_mask=mask) as kss:
            got = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        loss, outputs = got if return_outputs else (got, None)
        out = kss.result(loss, alpha, [p for p in model.parameters() if p.requires_grad])
        if out.degenerate and not self.kss_state.degenerate_layers:
            logger.warning("KSS skips a block this step: %s", out.degenerate_reason)
        if out.term is not None:
            term = out.term
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                term = term / self.current_gradient_accumulation_steps
            loss = loss + term.to(loss.dtype)
            # its share of the Trainer's summed (GA-divided) loss
            self._kss_term_sum += float(out.term.detach()) / self.current_gradient_accumulation_steps
        self._kss_record(alpha, out)
        return (loss, outputs) if return_outputs else loss

    def _kss_record(self, alpha: float, out) -> None:
        st, results = self.kss_state, out.layers
        st.evaluations += 1
        if st.last_step != self.state.global_step:
            st.kss_steps += 1
            st.last_step = self.state.global_step
        st.layers_evaluated += len(results)
        st.layers_skipped += out.skips.get("ill_conditioned", 0) + out.skips.get("non_finite", 0)
        st.layers_no_grad += out.skips.get("no_grad", 0)
        st.degenerate_layers += out.degenerate
        if out.term is None:
            st.all_skipped_streak += 1
            if st.all_skipped_streak >= ALL_SKIPPED_WARN and not self._kss_all_skipped_warned:
                self._kss_all_skipped_warned = True
                logger.warning("KSS shaped nothing for %d evaluations in a row: every drawn block was skipped "
                               "(this one: %s; %d degenerate). The term is zero while this lasts; see "
                               "kss/layers_skipped, kss/layers_no_grad, kss/layers_degenerate",
                               st.all_skipped_streak, out.skips or "none", out.degenerate)
        else:
            st.all_skipped_streak = 0
        norms = out.grad_norms
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

    # -- logging ----------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.kss_enabled:
            # one fixed-size reduction on every rank at every training log (log runs on all ranks at the same
            # steps): the term's share, then the sum and count of each metric
            packed = [self._kss_term_sum]
            packed += [self._kss_pending.get(k, 0.0) for k in _METRICS]
            packed += [float(self._kss_pending.get(k + "#n", 0)) for k in _METRICS]
            vals = torch.tensor(packed, dtype=torch.float64, device=self.args.device)
            if self.accelerator.num_processes > 1:
                vals = self.accelerator.reduce(vals, reduction="sum")
            vals = vals.tolist()
            n_metrics = len(_METRICS)
            sums, counts = vals[1:1 + n_metrics], vals[1 + n_metrics:]
            logs.update({k: s / c for k, s, c in zip(_METRICS, sums, counts) if c > 0})
            # `loss` is the Trainer's: the mean over ranks of the summed loss, per optimizer step since the last
            # log; the term's share is taken the same way, so loss = kss/task_loss + kss/term
            steps = max(1, self.state.global_step - self._kss_log_from)
            term = vals[0] / self.accelerator.num_processes / steps
            logs["kss/term"] = term
            logs["kss/task_loss"] = logs["loss"] - term
            logs["kss/steps"] = self.kss_state.kss_steps
            logs["kss/layers_skipped"] = self.kss_state.layers_skipped
            logs["kss/layers_no_grad"] = self.kss_state.layers_no_grad
            logs["kss/layers_degenerate"] = self.kss_state.degenerate_layers
            self._kss_pending, self._kss_term_sum = {}, 0.0
        if "loss" in logs:
            self._kss_log_from = self.state.global_step
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
        self._kss_log_from = self.state.global_step if not resume_from_checkpoint else \
            _checkpoint_step(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)


def _checkpoint_step(checkpoint_dir: str) -> int:
    """The global step a checkpoint was saved at (its trainer_state.json), 0 if unknown."""
    try:
        with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
            return int(json.load(f).get("global_step", 0))
    except (OSError, ValueError):
        return 0


class KSSTrainer(KSSMixin, Trainer):
    """``transformers.Trainer`` that adds alpha * mean_l L_l (the paper's KSS) to the task loss:
    :class:`KSSMixin` on the plain Trainer (its docstring lists the logs)."""


_KSS_CLASSES: dict[type, type] = {}


def kss_trainer(base: type) -> type:
    """``KSSMixin`` put before a ``transformers.Trainer`` subclass: ``kss_trainer(SFTTrainer)(..., kss_config=)``.

    One class per base (cached), named ``KSS<base name>``.
    """
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise TypeError(f"kss_trainer needs a transformers.Trainer subclass, got {base!r}")
    if issubclass(base, KSSMixin):
        return base
    if base not in _KSS_CLASSES:
        _KSS_CLASSES[base] = type(f"KSS{base.__name__}", (KSSMixin, base), {"__module__": base.__module__})
    return _KSS_CLASSES[base]


