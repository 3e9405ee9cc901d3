"""One run: build the paper's model, RKSP at init, train with ``KSSTrainer`` under the paper's divergence
label, RKSP and accuracy at the end, the gradient baselines; returns the run's record."""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

from .protocol import (ACC_SEQUENCES, BIG, BLOCKS, GRAD_LIMIT, GRAD_STEP, GRAD_VAR_STEPS, HELDOUT_ACC,
                       HELDOUT_PROFILE, LOSS_LIMIT, ALL_METHODS, OLD_MARGIN, OLD_WINDOW, PROFILE_TOKENS, RECALL,
                       SPIKE_FACTOR, SPIKE_STEPS, SPIKE_WINDOW, RunSpec)

# --- one run ----------------------------------------------------------------------------------------------------

#: RunSpec.deepnorm == "pre": the DeepNorm variant whose init matches the paper's Table 1 row
DEEPNORM_PRE = {"deepnorm_placement": "pre", "scaled_weights": ("o", "proj")}

def build_model(spec: RunSpec):
    from benchmarks.paper_models import GPTConfig, LMModel, RecallModel

    cfg = GPTConfig(vocab_size=spec.vocab, d_model=spec.d_model, n_layers=spec.n_layers, n_heads=spec.n_heads,
                    seq_len=spec.seq_len, norm=spec.norm, final_norm=spec.final_norm,
                    **(DEEPNORM_PRE if spec.deepnorm == "pre" else {}))
    torch.manual_seed(spec.seed)
    return (RecallModel if spec.task == "recall" else LMModel)(cfg)


def task_batch(spec: RunSpec, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of n sequences of the run's task from stream ``seed``."""
    from benchmarks.paper_models import associative_recall, synthetic_lm

    if spec.task == "recall":
        return associative_recall(n, seed=seed, n_pairs=RECALL["n_pairs"], length=spec.seq_len,
                                  vocab_size=spec.vocab)
    ids = synthetic_lm(n, seed=seed, length=spec.seq_len, vocab_size=spec.vocab)
    return ids, ids


def train_data(spec: RunSpec):
    from benchmarks.paper_models import LMDataset, RecallDataset

    n = spec.batch * spec.steps
    if spec.task == "recall":
        return RecallDataset(n, seed=spec.seed, n_pairs=RECALL["n_pairs"], length=spec.seq_len,
                             vocab_size=spec.vocab)
    return LMDataset(n, seed=spec.seed, length=spec.seq_len, vocab_size=spec.vocab)


def _device_of(model) -> str:
    return str(next(model.parameters()).device)


def profile_ids(spec: RunSpec) -> torch.Tensor:
    """The held-out sequences RKSP is measured on (at init, at the end, and by the monitor study)."""
    return task_batch(spec, max(1, PROFILE_TOKENS // spec.seq_len), spec.seed + HELDOUT_PROFILE)[0]


def profile_options():
    from hf_rksp.capture.profile import ProfileOptions

    return ProfileOptions(rank="full", kreiss=False, blocks=BLOCKS, batch_size=32)


def rksp(model, spec: RunSpec) -> dict:
    """RKSP v2 (full DMD, no Kreiss) on held-out sequences: the audit's summary (layer means) plus per-layer M."""
    from hf_rksp.capture.profile import profile_model
    from hf_rksp.record.summary import summarize

    was = model.training
    try:
        blocks, _, _ = profile_model(model, profile_ids(spec), profile_options(), device=_device_of(model),
                                     progress=False)
    finally:
        model.train(was)
    s = summarize(blocks).features
    out = {k: s[k].mean for k in ("near_unit_mass", "expansive_mass", "contractive_mass", "spectral_radius",
                                  "eigvec_condition", "nonlinearity_ratio")}
    out["spectral_radius_max"] = s["spectral_radius"].max
    out["near_unit_mass_layers"] = [b.near_unit_mass for b in blocks]
    return out


@torch.no_grad()
def accuracy(model, spec: RunSpec) -> float:
    """Held-out accuracy: the recalled value (recall) or the next token over positions 1..T-1 (lm)."""
    was = model.training
    model.eval()
    ids, labels = task_batch(spec, ACC_SEQUENCES[spec.task], spec.seed + HELDOUT_ACC)
    dev = _device_of(model)
    hits = total = 0
    for i in range(0, len(ids), 64):
        logits = model(ids[i:i + 64].to(dev))["logits"]
        if spec.task == "recall":
            pred, gold = logits.argmax(-1), labels[i:i + 64].to(dev)
        else:
            pred, gold = logits[:, :-1].argmax(-1), ids[i:i + 64, 1:].to(dev)
        hits += int((pred == gold).sum())
        total += gold.numel()
    model.train(was)
    return hits / total


def divergence_reason(loss: float, grad: float | None) -> str | None:
    """The paper's label at one step: loss > 50, gradient norm > 500, or a non-finite value."""
    if not math.isfinite(loss) or (grad is not None and not math.isfinite(grad)):
        return "non-finite"
    if loss > LOSS_LIMIT:
        return f"loss > {LOSS_LIMIT:g}"
    if grad is not None and grad > GRAD_LIMIT:
        return f"grad norm > {GRAD_LIMIT:g}"
    return None


def _monitor_class():
    from transformers import TrainerCallback

    class Monitor(TrainerCallback):
        """Records the task loss (a forward hook: the KSS term is not in it) and the task gradient's norm of
        every step (on KSS steps KSSTrainer measures it apart from the KSS term's), and stops training at
        the paper's divergence label (unless ``stop`` is False: the label is still recorded)."""

        def __init__(self, model, stop: bool = True):
            self.stop = stop
            self.loss: list[float] = []
            self.grad: list[float] = []  # the task gradient's norm (the Trainer's total off KSS steps)
            self.total_grad: list[float] = []  # the Trainer's norm of the total gradient, every step
            self.diverged_at: int | None = None
            self.reason: str | None = None
            self._last = math.nan
            model.register_forward_hook(self._hook)

        def _hook(self, module, args, output):
            if module.training and isinstance(output, dict) and "loss" in output:
                self._last = float(output["loss"].detach())

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return control
            grad = logs.get("grad_norm")
            grad = math.nan if grad is None else float(grad)
            # on a KSS step the label reads the task gradient alone (measured separately by KSSTrainer),
            # not the regularizer's own gradient; the total is kept in the trace beside it
            task_grad = logs.get("kss/task_grad_norm")
            self.total_grad.append(grad)
            if task_grad is not None:
                grad = float(task_grad)
            self.loss.append(self._last)
            self.grad.append(grad)
            reason = divergence_reason(self._last, grad)
            if reason is not None and self.diverged_at is None:
                self.diverged_at, self.reason = state.global_step, reason
                control.should_training_stop = self.stop
            return control

    return Monitor


def _finite(v: float) -> float:
    return v if math.isfinite(v) else BIG


def gradient_baselines(loss: list[float], grad: list[float], *, carried: bool = True) -> dict:
    """The paper's four gradient baselines from one run's per-step traces (step t = index t - 1).

    - ``grad_norm_step1``: gradient norm at step 1;
    - ``grad_norm_step100``: at step 100;
    - ``grad_var_1_100``: variance (ddof 1) of the gradient norm over steps 1-100;
    - ``loss_spikes_1_500``: steps t in 21..500 with loss_t > 1.5 x the median loss of steps t-20..t-1
      (a non-finite loss counts as a spike).
    A run stopped before the step reads its last observed value (``carried``, the default: what a monitor
    has seen by then) or None (``carried=False``: the baseline is read only on runs alive at that step).
    Non-finite values become ``BIG``.
    """
    n = len(grad)
    alive100 = n >= GRAD_STEP
    g = [_finite(v) for v in grad]
    out = {"grad_norm_step1": g[0] if n else None,
           "grad_norm_step100": g[GRAD_STEP - 1] if alive100 else (g[-1] if carried and n else None)}
    window = g[:GRAD_VAR_STEPS]
    var = BIG if max(window, default=0.0) >= BIG else (float(np.var(window, ddof=1)) if len(window) >= 2 else 0.0)
    out["grad_var_1_100"] = var if (alive100 or carried) else None
    spikes = 0
    for t in range(SPIKE_WINDOW, min(SPIKE_STEPS, len(loss))):
        prev = [v for v in loss[t - SPIKE_WINDOW:t] if math.isfinite(v)]
        if not math.isfinite(loss[t]) or (prev and loss[t] > SPIKE_FACTOR * float(np.median(prev))):
            spikes += 1
    out["loss_spikes_1_500"] = spikes if (len(loss) >= SPIKE_STEPS or carried) else None
    return out


def old_label(loss: list[float], warmup: int) -> bool:
    """Our old (v1 sweep) label: a non-finite loss, or after warm-up a 10-step mean loss > step-1 loss + 0.5.

    On a run the paper's label stopped before the end of warm-up, the last window counts (what the old
    label sees by the time training stops); a run shorter than the window uses its mean loss.
    """
    if not loss or not all(math.isfinite(v) for v in loss):
        return bool(loss)
    l0, n = loss[0], len(loss)
    if n < OLD_WINDOW:
        return sum(loss) / n > l0 + OLD_MARGIN
    for t in range(min(max(warmup, OLD_WINDOW - 1), n - 1), n):
        if sum(loss[t - OLD_WINDOW + 1:t + 1]) / OLD_WINDOW > l0 + OLD_MARGIN:
            return True
    return False


def _round(v: float, digits: int = 6):
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None


def training_args(spec: RunSpec, out_dir: str, device: str):
    from transformers import TrainingArguments

    clip = ALL_METHODS[spec.method].clip
    return TrainingArguments(
        output_dir=out_dir, report_to=[], use_cpu=device == "cpu", max_steps=spec.steps,
        per_device_train_batch_size=spec.batch, learning_rate=spec.lr, warmup_steps=spec.warmup,
        lr_scheduler_type=spec.schedule, weight_decay=spec.weight_decay, max_grad_norm=clip,
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", disable_tqdm=True,
        seed=spec.seed, data_seed=spec.seed, dataloader_num_workers=0)


def kss_config(spec: RunSpec):
    from hf_rksp.training.kss import KSSConfig

    m = ALL_METHODS[spec.method]
    if not m.kss:
        return KSSConfig(mode="off", block_path=BLOCKS, seed=spec.seed)
    extra = {} if m.snapshots is None else {"subsample": min(m.snapshots, spec.batch * spec.seq_len)}
    return KSSConfig(mode="on", alpha=m.alpha, terms=m.terms, every_n_steps=m.every, rank=m.rank,
                     layer_fraction=m.layers, beta=m.beta, gamma=m.gamma, max_grad_ratio=m.grad_ratio,
                     block_path=BLOCKS, seed=spec.seed, measure_grad_norms=True, sketch=m.sketch, **extra)


KSS_LOG_KEYS = ("step", "kss/loss", "kss/near_unit_mass", "kss/soft_near_unit_mass", "kss/expansive_mass",
                "kss/spectral_radius", "kss/layers_skipped", "kss/task_grad_norm", "kss/grad_norm")


def run_one(spec: RunSpec, device: str = "cpu") -> dict:
    """Train one run and return its record (settings, labels, RKSP at init and end, baselines, traces, timing)."""
    from transformers import PrinterCallback

    from hf_rksp.errors import RKSPError
    from hf_rksp.training.trainer import KSSTrainer

    t_start = time.perf_counter()
    model = build_model(spec)
    init = rksp(model, spec)
    profile_s = time.perf_counter() - t_start
    monitor = _monitor_class()(model, stop=spec.stop_at_label)
    callbacks = [monitor]
    if spec.monitor_every:  # the library's monitor, no thresholds: the per-block traces of the monitor study
        from hf_rksp.training.monitor import RKSPMonitorCallback

        spectral = RKSPMonitorCallback(profile_ids(spec), every_n_steps=spec.monitor_every,
                                       options=profile_options(), max_near_unit_change=None, max_radius_change=None)
        callbacks.insert(0, spectral)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = KSSTrainer(model=model, args=training_args(spec, tmp, device), train_dataset=train_data(spec),
                             kss_config=kss_config(spec), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    steps_done = trainer.state.global_step
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    end, end_error = None, None
    if monitor.diverged_at is None and finite:
        try:
            end = rksp(model, spec)
        except (RKSPError, RuntimeError) as e:  # a collapsed or non-finite stream after training
            end_error = str(e)
    diverged = monitor.diverged_at is not None
    kss_every = trainer.kss_config.every_n_steps
    return {
        "key": spec.key, "spec": asdict(spec), "diverged": diverged, "diverged_step": monitor.diverged_at,
        "diverged_reason": monitor.reason, "diverged_old": old_label(monitor.loss, spec.warmup),
        "steps_done": steps_done, "initial_loss": _round(monitor.loss[0]) if monitor.loss else None,
        "final_loss": _round(monitor.loss[-1]) if monitor.loss else None,
        "init": init, "baselines": gradient_baselines(monitor.loss, monitor.grad),
        "end": end, "end_error": end_error, "accuracy": accuracy(model, spec) if finite else None,
        "kss_steps": trainer.kss_state.kss_steps, "kss_layers_skipped": trainer.kss_state.layers_skipped,
        # logged step t ran the KSS term when (t - 1) % every_n_steps == 0: a gradient-norm stop there may be
        # the KSS term's own gradient (the task loss is in the trace)
        "diverged_on_kss_step": bool(diverged and ALL_METHODS[spec.method].kss
                                     and (monitor.diverged_at - 1) % kss_every == 0),
        "kss_trace": [{k: _round(h[k]) if isinstance(h[k], float) else h[k] for k in KSS_LOG_KEYS if k in h}
                      for h in trainer.state.log_history if "kss/loss" in h],
        "train_s": train_s, "step_s": train_s / max(1, steps_done), "profile_s": profile_s,
        "wall_s": time.perf_counter() - t_start,
        "trace": {"loss": [_round(v) for v in monitor.loss], "grad_norm": [_round(v) for v in monitor.grad],
                  "total_grad_norm": [_round(v) for v in monitor.total_grad]},
        **({"rho_trace": [{"step": h["step"], "rho": [None if v is None else _round(v) for v in h["block_spectral_radius"]]}
                          for h in spectral.history]} if spec.monitor_every else {}),
        "machine": machine(device),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def machine(device: str) -> dict:
    m = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        m["gpu"] = torch.cuda.get_device_name(0)
    return m
