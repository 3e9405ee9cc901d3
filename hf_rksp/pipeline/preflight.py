"""Pre-flight check: the probability that a planned training run diverges, from a short probe of its first steps.

``preflight(model, data, lr=..., warmup_steps=..., total_steps=..., max_grad_norm=...)`` trains a deep copy
of the model for K = ceil(5% of ``total_steps``) AdamW steps at the planned settings (weight decay, clipping,
batch), with an *accelerated* warm-up: the lr ramps linearly to the planned peak over the first half of the
probe and holds there for the second half, so the probe sees the peak lr the run will reach (the planned
warm-up would show the probe only K / warmup_steps of it; ``benchmarks/preflight.py`` measured both).  It
records the loss and the gradient norm of every probe step and every block's whitened DMD spectral radius
(the audit's spectral core, ``hf_rksp.capture.profile.profile_model``) before and after the probe, and
reads a logistic model (``PreflightModel``) fitted by ``benchmarks/preflight.py`` on the reproduction's
runs and shipped as ``hf_rksp/data/preflight_model.json`` with its provenance, its held-out figures and the
ranges it was fitted on.  Outside those ranges, or where its held-out AUROC is below ``MIN_AUROC``, the
result carries no probability (``probability: None``) and says why.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib.resources import files
from itertools import cycle, islice

import numpy as np
import torch

from hf_rksp.errors import ConfigError, RKSPError
from hf_rksp.pipeline.risk import LogisticFit, band
from hf_rksp.record.records import PreflightResult
from hf_rksp.utils.options import option

PROBE_FRACTION = 0.05  # the probe's steps: at most this share of the planned run's
MIN_AUROC = 0.8  # a model whose held-out AUROC is below this gives no probability
#: lr_ceiling is given only by a model whose ceiling fell within 1.5x of the measured largest stable lr on at
#: least this share of the held-out configurations
MIN_CEILING_SHARE = 0.8
FORMAT = 1
FEATURE_CAP = 6.0  # a non-finite or runaway log-ratio feature reads as this (1e6 x)
#: feature name -> what it is (all computed by ``probe_features`` from a ``ProbeTrace``)
FEATURES = {
    "log10_lr": "log10 of the planned peak learning rate",
    "clipped": "1 if max_grad_norm > 0 (gradient clipping on), else 0",
    "grad_growth": "log10(mean gradient norm of the probe's last 3 steps / of its first 3)",
    "grad_max": "log10(largest gradient norm in the probe / the first step's)",
    "loss_rise": "(largest loss in the probe's second half - first loss) / first loss",
    "rho_growth": "log10 of the largest per-block ratio of whitened spectral radius after / before the probe",
    "rho_end": "log10 of the largest per-block whitened spectral radius after the probe",
}


def probe_steps(total_steps: int) -> int:
    """K = ceil(PROBE_FRACTION x total_steps), at least 4."""
    return max(4, math.ceil(PROBE_FRACTION * total_steps))


def probe_lr(step: int, k: int, lr: float) -> float:
    """The probe's lr at step ``step`` (0-based) of ``k``: linear to ``lr`` over the first half, then ``lr``."""
    ramp = max(1, k // 2)
    return lr * min(1.0, (step + 1) / ramp)


@dataclass(frozen=True)
class ProbeTrace:
    """What one probe measured: per-step loss and gradient norm, per-block spectral radius before and after."""

    loss: list[float]
    grad_norm: list[float]
    rho_before: list[float]
    rho_after: list[float]
    steps: int
    seconds: float
    diverged: bool  # a non-finite loss or gradient stopped the probe


def _loss_of(model, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(input_ids=batch, labels=batch)
    loss = out["loss"] if isinstance(out, dict) or hasattr(out, "__getitem__") else getattr(out, "loss", None)
    if loss is None:
        raise RKSPError("the model returned no loss: give batches with `labels` (or `input_ids` for a causal LM)")
    return loss


def _spectral_radii(model, ids: torch.Tensor, blocks: str | None) -> list[float]:
    from hf_rksp.capture.profile import ProfileOptions, profile_model

    was = model.training
    try:
        recs, _, _ = profile_model(model, ids, ProfileOptions(rank="full", kreiss=False, blocks=blocks, batch_size=32),
                                   device=str(next(model.parameters()).device), progress=False)
    except (RKSPError, RuntimeError, ValueError):  # a non-finite or collapsed stream after a runaway probe
        return []
    finally:
        model.train(was)
    return [float(b.spectral_radius) for b in recs]


def run_probe(model: torch.nn.Module, batches, profile_ids: torch.Tensor, *, lr: float, total_steps: int,
              max_grad_norm: float = 0.0, weight_decay: float = 0.0, blocks: str | None = None,
              steps: int | None = None, seed: int = 0) -> ProbeTrace:
    """Train a deep copy of ``model`` for K steps (``probe_steps(total_steps)`` unless ``steps``) on ``batches``
    (cycled) with AdamW (weight decay on tensors of 2+ dims, as transformers' Trainer) and the probe's
    accelerated warm-up; the spectral radius of every block on ``profile_ids`` before and after."""
    k = steps or probe_steps(total_steps)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    m.train()
    decay = [p for p in m.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in m.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    rho0 = _spectral_radii(m, profile_ids, blocks)
    loss_t, grad_t, diverged = [], [], False
    params = decay + rest
    for step, batch in enumerate(islice(cycle(batches), k)):
        for g in opt.param_groups:
            g["lr"] = probe_lr(step, k, lr)
        opt.zero_grad(set_to_none=True)
        loss = _loss_of(m, batch)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
        lv = float(loss.detach())
        loss_t.append(lv)
        grad_t.append(gn)
        if not (math.isfinite(lv) and math.isfinite(gn)):
            diverged = True
            break
        opt.step()
    rho1 = _spectral_radii(m, profile_ids, blocks) if not diverged else []
    del m, opt
    return ProbeTrace(loss=loss_t, grad_norm=grad_t, rho_before=rho0, rho_after=rho1, steps=len(loss_t),
                      seconds=time.perf_counter() - t0, diverged=diverged)


def _log_ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return FEATURE_CAP
    return float(min(FEATURE_CAP, max(-FEATURE_CAP, math.log10(a / b))))


def probe_features(trace: ProbeTrace, *, lr: float, max_grad_norm: float) -> dict[str, float]:
    """Every feature of ``FEATURES`` from one probe (a runaway probe reads as FEATURE_CAP)."""
    g, lo = trace.grad_norm, trace.loss
    n = len(g)
    second = lo[n // 2:] or lo
    fin = [v for v in second if math.isfinite(v)]
    loss_rise = FEATURE_CAP if trace.diverged or len(fin) < len(second) else \
        min(FEATURE_CAP, (max(fin) - lo[0]) / max(abs(lo[0]), 1e-12))
    if trace.rho_before and len(trace.rho_after) == len(trace.rho_before):
        rho_growth = max(_log_ratio(a, b) for a, b in zip(trace.rho_after, trace.rho_before))
        rho_end = max(_log_ratio(a, 1.0) for a in trace.rho_after)
    else:
        rho_growth = rho_end = FEATURE_CAP
    return {
        "log10_lr": math.log10(lr),
        "clipped": float(max_grad_norm > 0),
        "grad_growth": FEATURE_CAP if trace.diverged else _log_ratio(float(np.mean(g[-3:])), float(np.mean(g[:3]))),
        "grad_max": FEATURE_CAP if trace.diverged else _log_ratio(max(g), g[0]),
        "loss_rise": float(loss_rise),
        "rho_growth": rho_growth,
        "rho_end": rho_end,
    }


def _pct(v) -> str:
    return "an unmeasured share" if v is None else f"{v:.0%}"


def driving_blocks(trace: ProbeTrace, top: int = 1) -> list[int]:
    """The block(s) whose whitened spectral radius grew most over the probe (by log ratio)."""
    if not trace.rho_before or len(trace.rho_after) != len(trace.rho_before):
        return []
    growth = [_log_ratio(a, b) for a, b in zip(trace.rho_after, trace.rho_before)]
    return [int(i) for i in np.argsort(growth)[::-1][:top]]


# --- the fitted model -------------------------------------------------------------------------------------------

class PreflightModelError(RKSPError):
    """The shipped pre-flight model file is unreadable or invalid."""


@dataclass(frozen=True)
class PreflightModel:
    """The shipped pre-flight model: its features, the logistic fit, its validity range and provenance."""

    features: tuple[str, ...]
    fit: LogisticFit
    ceiling_probability: float  # lr_ceiling: the lr where P(divergence) reaches this
    valid: dict  # name -> [lo, hi]: d_model, n_layers, warmup_fraction, and every feature
    heldout: dict  # the held-out figures: heldout_auroc, heldout_ece, ... and which configurations
    cv: dict  # grouped CV on the fitting runs
    provenance: dict  # runs file sha256, n_runs, n_diverged, divergence definition, script, sweep description
    #: feature -> d feature / d log10 lr within a configuration (pooled least squares on the fitting runs)
    lr_response: dict = field(default_factory=dict)
    #: the ceiling's measured bias divided out: the median of (largest stable lr / first-order ceiling) over
    #: the fitting configurations
    ceiling_scale: float = 1.0
    format: int = FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> PreflightModel:
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT}")
            names = tuple(d["features"])
            if not names or any(n not in FEATURES for n in names):
                raise ValueError(f"unknown features {names}")
            fit = LogisticFit(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d["fit"].items()})
            if not len(fit.mean) == len(fit.std) == len(fit.coef) == len(names):
                raise ValueError("fit arrays do not match the features")
            if not all(math.isfinite(v) for v in (*fit.mean, *fit.std, *fit.coef, fit.intercept)):
                raise ValueError("non-finite coefficients")
            if not 0 < float(d["ceiling_probability"]) < 1:
                raise ValueError("ceiling_probability must be in (0, 1)")
            float(d["heldout"]["heldout_auroc"])
            return cls(features=names, fit=fit, ceiling_probability=float(d["ceiling_probability"]),
                       valid=dict(d["valid"]), heldout=dict(d["heldout"]), cv=dict(d["cv"]),
                       provenance=dict(d["provenance"]), lr_response=dict(d.get("lr_response", {})),
                       ceiling_scale=float(d.get("ceiling_scale", 1.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise PreflightModelError(f"invalid pre-flight model: {e}") from None

    def vector(self, feats: dict) -> np.ndarray:
        return np.array([float(feats[f]) for f in self.features])

    def probability(self, feats: dict) -> float:
        return float(self.fit.predict(self.vector(feats))[0])

    def lr_ceiling(self, feats: dict) -> float | None:
        """The lr where P(divergence) = ceiling_probability (times ``ceiling_scale``), to first order in log10 lr: the logit's total
        slope in log10 lr is the lr term's plus each probe feature's coefficient times how that feature moves
        with log10 lr within a configuration (``lr_response``, fitted on the same runs). None when the model
        has no lr term or P does not grow with lr."""
        if "log10_lr" not in self.features:
            return None
        slope = sum(c / sd * (1.0 if f == "log10_lr" else float(self.lr_response.get(f, 0.0)))
                    for f, c, sd in zip(self.features, self.fit.coef, self.fit.std))
        if slope <= 0:
            return None
        p = self.ceiling_probability
        logit = float(self.fit.logit(self.vector(feats))[0])
        return float(self.ceiling_scale * 10 ** (feats["log10_lr"] + (math.log(p / (1 - p)) - logit) / slope))

    def warnings(self, feats: dict, *, d_model: int | None, n_layers: int | None,
                 warmup_fraction: float | None) -> list[str]:
        """Every way these inputs fall outside what the model was fitted on."""
        out = []
        checks = {"d_model": d_model, "n_layers": n_layers, "warmup_fraction": warmup_fraction,
                  **{f: feats[f] for f in self.features}}
        for name, v in checks.items():
            if name not in self.valid:
                continue
            lo, hi = self.valid[name]
            if v is None:
                out.append(f"{name} is unknown (the model was fitted on [{lo:.4g}, {hi:.4g}])")
            elif not lo <= v <= hi:
                out.append(f"{name} = {v:.4g} is outside the fitted range [{lo:.4g}, {hi:.4g}]")
        return out


def preflight_model_path():
    return files("hf_rksp") / "data" / "preflight_model.json"


@lru_cache(maxsize=1)
def load_preflight_model() -> PreflightModel | None:
    """The shipped pre-flight model, or None when this build has none."""
    path = preflight_model_path()
    if not path.is_file():
        return None
    try:
        return PreflightModel.from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise PreflightModelError(f"cannot read {path}: {e}") from None


# --- the options (defined once: the Python API's keywords and `hf-rksp preflight`'s flags) ----------------------

@dataclass
class PreflightOptions:
    """The planned run a pre-flight check probes (``preflight``'s keywords; `hf-rksp preflight`'s flags)."""

    lr: float = option(None, group="plan", parse=float, positive=True, recorded="always",
                       help="the planned peak learning rate (required)")
    warmup_steps: int = option(0, group="plan", parse=int, bounds=(0, 10**9), help="planned linear warm-up steps")
    total_steps: int = option(None, group="plan", parse=int, bounds=(1, 10**9),
                              help="planned optimizer steps (required); the probe runs 1/20 of them")
    max_grad_norm: float = option(1.0, group="plan", parse=float,
                                  help="planned gradient clipping (0: none; transformers' default 1.0)")
    weight_decay: float = option(0.0, group="plan", parse=float, help="planned AdamW weight decay")
    batch_size: int = option(8, group="plan", parse=int, bounds=(1, 10**6), help="planned batch size")
    optimizer: str = option("adamw", group="plan", choices=("adamw",), help="planned optimizer")
    seq_len: int = option(128, group="data", parse=int, bounds=(2, 10**6),
                          help="tokens per training sequence cut from the text")
    text: str | None = option(None, group="data", metavar="FILE",
                              help="UTF-8 training text (default: the English text embedded in the package)")
    seed: int = option(0, group="data", parse=int, bounds=(0, 2**31 - 1), help="seed of the probe and of --init")


PLAN_GROUPS = {"source": "what to check", "plan": "the planned training run", "data": "the probe's data"}


def load_for_preflight(model_id: str | None, *, init: bool = False, config: str | None = None,
                       options: PreflightOptions) -> tuple[torch.nn.Module, list]:
    """A causal LM (with its head) and batches of the text, for `hf-rksp preflight`: any Hugging Face
    checkpoint directory or cached hub id the audit takes, or its architecture at random init (``init``,
    ``config``); GGUF files are not supported here (no head is loaded from them)."""
    from transformers import AutoModelForCausalLM

    from hf_rksp.capture.calibration import default_text
    from hf_rksp.models.loading import load_config, load_tokenizer, resolve_source

    src = resolve_source(model_id, init=init, config_path=config)
    if src.kind == "gguf":
        raise ConfigError("a GGUF file has no training head here: pass a checkpoint directory, hub id or `init`",
                          param="model")
    cfg = load_config(src)
    tok = load_tokenizer(src)
    try:
        if src.init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(options.seed)
                model = AutoModelForCausalLM.from_config(cfg)
        else:
            model = AutoModelForCausalLM.from_pretrained(src.path or src.id, local_files_only=True)
    except ValueError as e:
        raise ConfigError(f"{src.id} is not a causal LM: {str(e).splitlines()[0]}", param="model") from None
    if tok is None and options.text is not None:
        raise ConfigError(f"{src.id} has no tokenizer offline to read the text with", param="text")
    if tok is None:  # no tokenizer (a bare config): uniform random ids, as the audit calibrates then
        g = torch.Generator().manual_seed(options.seed)
        n_seq = 4 * options.batch_size
        ids = torch.randint(0, int(cfg.vocab_size), (n_seq * options.seq_len,), generator=g)
    else:
        if options.text is not None:
            try:
                with open(options.text, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read {options.text}: {e}", param="text") from None
        else:
            text = default_text()
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = len(ids) // options.seq_len
    if n < 2:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than 2 sequences of {options.seq_len}",
                          param="seq_len")
    seqs = ids[:n * options.seq_len].view(n, options.seq_len)
    b = options.batch_size
    batches = [{"input_ids": seqs[i:i + b], "labels": seqs[i:i + b]} for i in range(0, n, b) if i + b <= n]
    if len(batches) < 2:
        batches = [{"input_ids": seqs[:1], "labels": seqs[:1]}, {"input_ids": seqs[1:], "labels": seqs[1:]}]
    return model, batches


# --- the check --------------------------------------------------------------------------------------------------

def _batches(data, batch_size: int) -> list:
    """The probe's batches: an iterable of batches (dicts or input_ids tensors) as given, or a map-style
    dataset (``datasets.Dataset``, a torch Dataset of dict rows) collated into batches of ``batch_size``."""
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple)):
        rows = [data[i] for i in range(len(data))]
        out = []
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            chunk = rows[i:i + batch_size]
            out.append({k: torch.stack([torch.as_tensor(r[k]) for r in chunk]) for k in chunk[0]
                        if k in ("input_ids", "labels", "attention_mask")})
        if not out:
            raise RKSPError(f"`data` has {len(rows)} rows, fewer than `batch_size` {batch_size}")
        return out
    out = list(data)
    if not out:
        raise RKSPError("`data` is empty")
    return out


def _dims(model) -> tuple[int | None, int | None]:
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    d = getattr(cfg, "d_model", None) or getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    L = getattr(cfg, "n_layers", None) or getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if d is None and hasattr(model, "gpt"):  # the reproduction's models keep their config one level down
        return _dims(model.gpt)
    return d, L


def preflight(model: torch.nn.Module, data, *, lr: float, warmup_steps: int, total_steps: int,
              max_grad_norm: float = 1.0, weight_decay: float = 0.0, batch_size: int = 8,
              optimizer: str = "adamw", blocks: str | None = None, profile_ids: torch.Tensor | None = None,
              seed: int = 0, model_file: PreflightModel | None = None) -> PreflightResult:
    """Will this planned run diverge, and what lr is safe?  A probe of K = 5% of ``total_steps`` on a copy.

    ``data``: an iterable of batches (dicts with ``input_ids`` and ``labels``, or ``input_ids`` tensors for a
    causal LM) or a map-style dataset of such rows (``datasets.Dataset`` with ``input_ids``/``labels``
    columns), batched by ``batch_size``.  The first batch is kept out of training: the blocks' spectra are
    measured on it (unless ``profile_ids``).  ``model`` is not changed.
    """
    if optimizer != "adamw":
        raise ConfigError(f"{optimizer!r} is not supported: the pre-flight models AdamW", param="optimizer")
    for name, v in (("lr", lr), ("total_steps", total_steps)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"must be a positive number, got {v!r}", param=name)
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"must be in [0, `total_steps`], got {warmup_steps}", param="warmup_steps")
    for name, v in (("max_grad_norm", max_grad_norm), ("weight_decay", weight_decay)):
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"must be >= 0, got {v!r}", param=name)
    batches = _batches(data, batch_size)
    if profile_ids is None:
        first = batches[0]
        profile_ids = first["input_ids"] if isinstance(first, dict) else first
        batches = batches[1:] or batches
    trace = run_probe(model, batches, profile_ids, lr=lr, total_steps=total_steps, max_grad_norm=max_grad_norm,
                      weight_decay=weight_decay, blocks=blocks, seed=seed)
    feats = probe_features(trace, lr=lr, max_grad_norm=max_grad_norm)
    pm = model_file if model_file is not None else load_preflight_model()
    d, L = _dims(model)
    if L is None and trace.rho_before:  # the blocks the probe found
        L = len(trace.rho_before)
    prob, ceiling, warnings, reason, provenance = None, None, [], None, None
    if pm is None:
        reason = "this build ships no pre-flight model (hf_rksp/data/preflight_model.json)"
    else:
        provenance = {**pm.provenance, "features": list(pm.features), **pm.heldout}
        warnings = pm.warnings(feats, d_model=d, n_layers=L, warmup_fraction=warmup_steps / total_steps)
        if pm.heldout["heldout_auroc"] < MIN_AUROC:
            reason = (f"the pre-flight model's held-out AUROC is {pm.heldout['heldout_auroc']:.2f} (< {MIN_AUROC:g}):"
                      " no informative estimate")
        elif warnings:
            reason = "these settings are outside what the pre-flight model was fitted on: " + "; ".join(warnings)
        else:
            prob = 1.0 if trace.diverged else pm.probability(feats)
            share = pm.heldout.get("lr_ceiling_within_1_5x")
            if share is not None and share >= MIN_CEILING_SHARE:
                ceiling = pm.lr_ceiling(feats)
            else:  # measured and not good enough: withheld, not guessed
                warnings = [*warnings, ("lr_ceiling withheld: on held-out configurations the model's ceiling fell "
                            f"within 1.5x of the measured largest stable lr for {_pct(share)} of them "
                            f"(needs {MIN_CEILING_SHARE:.0%})")]
    return PreflightResult(
        probability=prob, band=None if prob is None else band(prob), unavailable_reason=reason,
        lr=float(lr), lr_ceiling=ceiling,
        lr_ceiling_probability=None if pm is None else pm.ceiling_probability,
        driving_blocks=driving_blocks(trace), rho_before=trace.rho_before, rho_after=trace.rho_after,
        features=feats, probe_steps=trace.steps, probe_seconds=trace.seconds,
        probe_fraction=trace.steps / total_steps, probe_diverged=trace.diverged,
        settings={"lr": float(lr), "warmup_steps": int(warmup_steps), "total_steps": int(total_steps),
                  "max_grad_norm": float(max_grad_norm), "weight_decay": float(weight_decay),
                  "batch_size": int(batch_size), "optimizer": optimizer, "d_model": d, "n_layers": L},
        warnings=warnings, model=provenance)
