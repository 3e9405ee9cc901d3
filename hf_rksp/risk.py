"""Calibrated probability of divergence from RKSP features (DESIGN.md, RKSP v1 step 8).

The model is the logistic regression fitted by ``benchmarks/divergence_sweep.py``
on the project's own sweep and shipped as ``hf_rksp/data/risk_model.json``
(coefficients, the sweep data's sha256, the ranges it was fitted on).  It
takes the model-level RKSP features and the learning rate; everything outside
the fitted ranges is reported, not hidden: the probability is still computed,
with ``in_range: false`` and the reasons under ``warnings``.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib.resources import files

#: learning rate assumed when --lr is not given: the family's published pretraining peak
#: (GPT-2/-3 small 6e-4, LLaMA-2 3e-4, BERT 1e-4); everything else 3e-4.
DEFAULT_LR = {"gpt2": 6e-4, "llama": 3e-4, "mistral": 3e-4, "qwen2": 3e-4, "qwen3": 3e-4,
              "bert": 1e-4, "roberta": 1e-4, "rksp_sweep_lm": 1e-3}
FALLBACK_LR = 3e-4
CEILING_P = 0.1  # the learning-rate ceiling is the largest lr with P(divergence) below this
BANDS = ((0.1, "low"), (0.5, "medium"), (1.01, "high"))

#: risk-model feature name -> key of the audit's model-level summary
SUMMARY_KEY = {"rksp_near_unit_mass": "near_unit_mass", "rksp_spectral_radius_max": "spectral_radius_max",
                "rksp_outside_mass_mean": "outside_mass_mean"}


@lru_cache(maxsize=1)
def load_risk_model() -> dict | None:
    """The shipped risk model, or None when this build of the package has none."""
    path = files("hf_rksp") / "data" / "risk_model.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _x(value: float, transform: str) -> float:
    return math.log10(max(value, 1e-12)) if transform == "log" else value


def _logit(model: dict, values: dict[str, float]) -> tuple[float, float, float]:
    """(logit without the lr term, lr coefficient, lr column mean) with the lr term separated."""
    rest, c_lr, mu_lr, sd_lr = model["intercept"], 0.0, 0.0, 1.0
    for f, c, mu, sd in zip(model["features"], model["coef"], model["mean"], model["std"]):
        if f["name"] == "lr":
            c_lr, mu_lr, sd_lr = c, mu, sd
        else:
            rest += c * (_x(values[f["name"]], f["transform"]) - mu) / sd
    return rest, c_lr / sd_lr, mu_lr


def band(p: float) -> str:
    return next(name for bound, name in BANDS if p < bound)


def default_lr(family: str | None) -> float:
    return DEFAULT_LR.get(family or "", FALLBACK_LR)


def assess(summary: dict, *, lr: float | None, family: str | None, init: bool, n_blocks: int, d_model: int,
           method: dict | None = None, model: dict | None = None) -> dict | None:
    """The audit's ``risk`` entry, or None when no risk model is available."""
    model = model if model is not None else load_risk_model()
    if model is None:
        return None
    lr_source = "given" if lr is not None else f"default for family {family!r}"
    lr = float(lr) if lr is not None else default_lr(family)
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    values = {name: float(summary[key]) for name, key in SUMMARY_KEY.items()}
    rest, slope, mu = _logit(model, values)
    z = rest + slope * (math.log10(lr) - mu)
    p = 1.0 / (1.0 + math.exp(-max(-40.0, min(40.0, z))))
    ceiling = None
    if slope > 0:  # log10(lr*) solves logit = logit(CEILING_P)
        ceiling = 10 ** (mu + (math.log(CEILING_P / (1 - CEILING_P)) - rest) / slope)
    valid = model["valid"]
    warnings = []
    if not init:
        warnings.append("the model has trained weights; the risk model was fitted on models at random init")
    if family not in ("rksp_sweep_lm", "gpt2"):
        warnings.append(f"family {family!r} is outside the sweep ({valid['architecture']})")
    checks = {"lr": lr, "d_model": d_model, "n_blocks": n_blocks, **values}
    for name, v in checks.items():
        lo, hi = valid[name]
        if not lo <= v <= hi:
            warnings.append(f"{name} = {v:.4g} is outside the fitted range [{lo:.4g}, {hi:.4g}]")
    if method is not None:
        for k in ("delta", "tokens"):
            if method.get(k) != model["rksp"][k]:
                warnings.append(f"the audit's {k} {method.get(k)} differs from the sweep's {model['rksp'][k]}")
    return {
        "probability": p,
        "band": band(p),
        "lr": lr,
        "lr_source": lr_source,
        "lr_ceiling": ceiling,
        "lr_ceiling_probability": CEILING_P,
        "in_range": not warnings,
        "warnings": warnings,
        "model": {"sweep_data_sha256": model["sweep_data_sha256"], "n_runs": model["n_runs"],
                  "features": [f["name"] for f in model["features"]],
                  "divergence_definition": model["divergence_definition"]},
    }
