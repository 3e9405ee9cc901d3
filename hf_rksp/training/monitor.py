"""RKSPMonitorCallback: the audit's spectral profile of the model every N steps, logged, with warnings."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from importlib.resources import files

import torch
from transformers import TrainerCallback

from hf_rksp.capture.profile import ProfileOptions, profile_model
from hf_rksp.errors import ConfigError, NonFiniteActivationError, RKSPError
from hf_rksp.models.blocks import find_blocks, unwrap_model
from hf_rksp.record.records import BlockRecord, MonitorAlarm, SummaryRecord
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


RULES = ("ratio", "jump", "absolute")


@dataclasses.dataclass(frozen=True)
class EarlyWarning:
    """The monitor's early-warning rule: alarm at the first profiled step where one block's whitened DMD
    spectral radius passes ``threshold``: as a multiple of its own value at train begin (``rule="ratio"``), of
    its value at the previous profile (``rule="jump"``), or in absolute terms (``rule="absolute"``).  A
    non-finite radius always passes; an unknown one (None: the profile stopped before that block) never does.

    :meth:`fitted` is the rule shipped with hf-rksp, fitted by ``benchmarks/monitor_warning.py`` on the
    reproduction's runs (the threshold with at most 5% false alarms on the fitting runs that did not diverge),
    or None when no rule flagged enough of the fitting runs' divergences in time (:meth:`shipped` says why);
    its provenance and held-out figures are in ``provenance``.
    """

    rule: str = "ratio"
    threshold: float = 2.0
    provenance: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(f"`rule` must be one of {', '.join(RULES)}, not {self.rule!r}", param="rule")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            raise ConfigError(f"`threshold` must be a finite number > 0, not {self.threshold!r}", param="threshold")

    def statistics(self, rho: list[float], baseline: list[float],
                   previous: list[float] | None = None) -> list[float]:
        """Per block, what the rule compares with ``threshold`` (inf where the radius is not finite).
        ``baseline``: the radii at train begin; ``previous``: at the previous profile (rule "jump"; the baseline
        when None)."""
        if self.rule == "jump" and previous is not None:
            baseline = previous
        if len(rho) != len(baseline):
            raise ValueError(f"{len(rho)} radii against a baseline of {len(baseline)} blocks")
        out = []
        for r, r0 in zip(rho, baseline):
            if r is None:
                out.append(0.0)
            elif not math.isfinite(r):
                out.append(math.inf)
            elif self.rule == "absolute":
                out.append(float(r))
            else:
                out.append(float(r) / r0 if r0 is not None and math.isfinite(r0) and r0 > 0 else math.inf)
        return out

    def check(self, step: int, rho: list[float], baseline: list[float],
              previous: list[float] | None = None) -> MonitorAlarm | None:
        """The alarm at ``step`` (naming the block with the largest statistic), or None."""
        stats = self.statistics(rho, baseline, previous)
        b = max(range(len(stats)), key=stats.__getitem__)
        if stats[b] <= self.threshold:
            return None
        return MonitorAlarm(step=int(step), block=b, spectral_radius=float(rho[b]),
                            baseline=float(baseline[b]), statistic=stats[b], rule=self.rule,
                            threshold=float(self.threshold))

    def first_alarm(self, trace: list[tuple[int, list[float]]]) -> MonitorAlarm | None:
        """The first alarm over a recorded trace [(step, per-block radii), ...] whose first entry is the
        baseline (train begin)."""
        if not trace:
            return None
        baseline = previous = trace[0][1]
        for step, rho in trace[1:]:
            alarm = self.check(step, rho, baseline, previous)
            if alarm is not None:
                return alarm
            previous = rho
        return None

    @staticmethod
    def shipped() -> dict | None:
        """``hf_rksp/data/monitor_warning.json``: the fitting's record (its rule may be null, with the reason),
        or None when this build has none."""
        path = files("hf_rksp") / "data" / "monitor_warning.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @classmethod
    def fitted(cls) -> "EarlyWarning | None":
        """The shipped rule, or None when the fitting shipped none (``shipped()["reason"]`` says why)."""
        d = cls.shipped()
        if d is None or d.get("rule") is None:
            return None
        return cls(rule=d["rule"], threshold=float(d["threshold"]), provenance=d)


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

    Early warning (``early_warning``, default: :meth:`EarlyWarning.fitted`, the rule fitted on the
    reproduction's runs, None while none is shipped): at the first profiled step where a block's whitened spectral radius passes the rule,
    it logs ``rksp/alarm_block`` and ``rksp/alarm_step``, warns once naming the block, and keeps the
    :class:`~hf_rksp.record.records.MonitorAlarm` in :attr:`alarm`.  ``early_warning=None`` turns it off.

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
        max_near_unit_change: float | None = None,
        max_radius_change: float | None = None,
        block_path: str | None = None,
        early_warning: EarlyWarning | None | str = "fitted",
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
        if isinstance(early_warning, str):
            if early_warning != "fitted":
                raise ConfigError(f"`early_warning` must be an EarlyWarning, None or \"fitted\", not "
                                  f"{early_warning!r}", param="early_warning")
            early_warning = EarlyWarning.fitted()
            if early_warning is None:  # said once, where the default would otherwise be silently off
                why = (EarlyWarning.shipped() or {}).get("reason", "this build ships no fitted rule")
                logger.info("RKSP monitor: no early-warning rule is on (%s); pass early_warning=EarlyWarning(...) "
                            "to set one", why)
        self.early_warning: EarlyWarning | None = early_warning
        self.alarm: MonitorAlarm | None = None
        self.baseline: dict | None = None
        self.history: list[dict] = []
        self.warnings: list[str] = []
        self._pending: dict[str, float] = {}

    def attach(self, trainer) -> "RKSPMonitorCallback":
        """Put this callback first so every integration sees its metrics."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def profile(self, model) -> tuple[dict, list[float]]:
        """The logged metrics (scalars, ``rksp/...``) and, kept in :attr:`history` only, every block's
        whitened spectral radius (``block_spectral_radius``, in block order)."""
        s, blocks = profile_summary(model, self.input_ids, self.options)
        out = {"rksp/near_unit_mass": s.score, "rksp/spectral_radius": s.features["spectral_radius"].max}
        out.update({f"rksp/{f.name}_mean": s.features[f.name].mean for f in FEATURES
                    if s.features[f.name].mean is not None})
        return out, [b.spectral_radius for b in blocks]

    def _check(self, m: dict, step: int, is_zero: bool) -> None:
        if "rksp/near_unit_mass" not in m:  # a non-finite stream: the early warning reports it
            return
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
        # the radii at train begin (history[0] once on_train_begin took the baseline) and at the previous profile
        baseline, previous = ((self.history[0]["block_spectral_radius"], self.history[-1]["block_spectral_radius"])
                              if self.baseline is not None else (None, None))
        try:
            m, rho = self.profile(model)
        except NonFiniteActivationError as e:  # the stream ran away: an alarm, not a crash of the user's run
            if baseline is None:
                raise
            n = len(baseline)
            m, rho = {"rksp/non_finite_block": e.block}, [None] * e.block + [math.inf] * (n - e.block)
        self.history.append({"step": state.global_step, **m, "block_spectral_radius": rho})
        self._check(m, state.global_step, state.is_world_process_zero)
        if self.early_warning is not None and self.alarm is None and baseline is not None:
            self.alarm = self.early_warning.check(state.global_step, rho, baseline, previous)
            if self.alarm is not None:
                a = self.alarm
                m = {**m, "rksp/alarm_block": a.block, "rksp/alarm_step": a.step}
                text = (f"RKSP monitor, step {a.step}: early warning: block {a.block}'s whitened spectral radius "
                        f"{a.baseline:.3g} -> {a.spectral_radius:.3g} passed the {a.rule} threshold "
                        f"{a.threshold:g}; runs like this one diverged soon after in our sweeps")
                self.warnings.append(text)
                if state.is_world_process_zero:
                    logger.warning(text)
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

