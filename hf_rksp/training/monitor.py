"""RKSPMonitorCallback: the audit's spectral profile of the model every N steps, logged, with warnings."""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import TrainerCallback

from hf_rksp.capture.profile import ProfileOptions, profile_model
from hf_rksp.errors import ConfigError, RKSPError
from hf_rksp.models.blocks import find_blocks, unwrap_model
from hf_rksp.record.records import BlockRecord, SummaryRecord
from hf_rksp.record.summary import summarize
from hf_rksp.spectral import FEATURES

logger = logging.getLogger("hf_rksp")


def profile_summary(model, input_ids: torch.Tensor, options) -> tuple[SummaryRecord, list[BlockRecord]]:
    """The audit's model-level summary at the current weights (no grad), and the per-block records.

    ``profile_model`` puts the model in eval mode for the forward; its training mode is restored here.
    Training wrappers (PEFT, DDP, FSDP, ``torch.compile``) are looked through for the blocks; the forward is
    the wrapped model's own (a LoRA adapter is applied).
    """
    try:
        find_blocks(model, options.blocks)
    except RKSPError as e:
        raise ConfigError(f"cannot find the residual blocks of {type(unwrap_model(model)).__name__} to profile "
                          f"({e}); point at the block list with `block_path` (e.g. block_path=\"model.layers\")",
                          param="block_path") from e
    was_training = model.training
    try:
        blocks, _, _ = profile_model(model, input_ids, options, device=str(next(model.parameters()).device),
                                     progress=False)
    finally:
        model.train(was_training)
    return summarize(blocks), blocks


class RKSPMonitorCallback(TrainerCallback):
    """Profile the model with the RKSP audit every N steps on a fixed calibration batch.

    Works with the plain ``Trainer`` and any subclass (TRL's, KSSTrainer), and with PEFT models (the blocks
    are found through the adapter wrapper; ``block_path`` points at them for a family hf-rksp does not
    know).  At train begin it records a baseline, logged (``rksp/baseline_near_unit_mass``,
    ``rksp/baseline_spectral_radius``) with the first training log;
    every ``every_n_steps`` optimizer steps it runs
    :func:`hf_rksp.capture.profile.profile_model` (no grad) on ``input_ids`` and logs
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
        block_path: str | None = None,
    ):
        if input_ids.ndim != 2:
            raise ValueError("input_ids must be (B, T) token ids")
        self.input_ids = input_ids
        self.every_n_steps = int(every_n_steps)
        self.options = options or ProfileOptions(batch_size=int(input_ids.shape[0]))
        if block_path is not None:
            self.options = dataclasses.replace(self.options, blocks=block_path)
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
        """The logged metrics (scalars, ``rksp/...``) and, kept in :attr:`history` only, every block's
        whitened spectral radius (``block_spectral_radius``, in block order)."""
        s, blocks = profile_summary(model, self.input_ids, self.options)
        out = {"rksp/near_unit_mass": s.score, "rksp/spectral_radius": s.features["spectral_radius"].max}
        out.update({f"rksp/{f.name}_mean": s.features[f.name].mean for f in FEATURES
                    if s.features[f.name].mean is not None})
        return out, [b.spectral_radius for b in blocks]

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
            self.baseline, rho = self.profile(model)
            self.history.append({"step": state.global_step, **self.baseline, "block_spectral_radius": rho})
            self._pending.update({"rksp/baseline_near_unit_mass": self.baseline["rksp/near_unit_mass"],
                                  "rksp/baseline_spectral_radius": self.baseline["rksp/spectral_radius"]})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps:
            return control
        m, rho = self.profile(model)
        self.history.append({"step": state.global_step, **m, "block_spectral_radius": rho})
        self._check(m, state.global_step, state.is_world_process_zero)
        self._pending.update(m)
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

