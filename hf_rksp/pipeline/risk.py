"""Risk of divergence: a calibrated logistic model on RKSP at init, fitted on the reproduction of the paper's sweep.

The paper fits no model: it uses the layer-mean near-unit mass M_~1 itself as
the score (AUROC 0.995, ECE 0.283 when read as a probability).  Our risk model
is a logistic regression on M_~1 (plus log10 kappa(V) and log10 lr where they
help under grouped cross-validation), fitted by ``benchmarks/paper_repro.py
analyze --ship`` on the runs of that sweep and shipped as
``hf_rksp/data/risk_model.json`` with the sweep data's sha256, its grouped-CV
calibration and the ranges it was fitted on.  Outside those ranges the
audit gives no probability: ``risk: null`` with ``risk_unavailable_reason``
naming what is out of range.  Nor does it give one from a model whose held-out
(grouped-CV) AUROC is below ``MIN_AUROC`` (the shipped model's is 0.49: M_~1 at
init does not see the learning rate); the reason then gives the measured AUROC
and points to ``hf-rksp preflight``, which predicts from the planned settings.
Until a model file exists, every audit has ``risk: null`` and ``UNAVAILABLE``.

The logistic fit (Newton steps with a ridge on standardized features, the
intercept unpenalized) lives here so that the sweep analysis and the audit
share one model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib.resources import files

import numpy as np

from hf_rksp.errors import RKSPError
from hf_rksp.models.families import default_lr
from hf_rksp.record.records import RiskEntry, SummaryRecord

UNAVAILABLE = ("the shipped risk model was fitted on RKSP v1 features and does not apply to v2; "
               "a v2 model comes with the reproduction of the paper's sweep")
#: the audit gives a probability only from a model whose held-out (grouped-CV) AUROC is at least this
MIN_AUROC = 0.8
PREFLIGHT_HINT = ("`hf-rksp preflight` (or `hf_rksp.preflight`) probes the planned training run and gives one "
                  "where its fitted model covers the model and settings")
FORMAT = 2
CEILING_P = 0.1  # the learning-rate ceiling is the largest lr with P(divergence) below this
BANDS = ((0.1, "low"), (0.5, "medium"), (1.01, "high"))
#: feature name -> transform; a model uses a subset, in this order
FEATURES = {"near_unit_mass": "id", "eigvec_condition": "log10", "lr": "log10"}
#: kappa(V) above this (or null: a singular eigenvector matrix) is read as this
KAPPA_CAP = 1e16


class RiskModelError(RKSPError):
    """The shipped risk model file is unreadable or invalid."""


def band(p: float) -> str:
    return next(name for bound, name in BANDS if p < bound)


def transform(name: str, value: float | None) -> float:
    """A feature's value on the model's scale (log10 for kappa and lr; kappa capped at KAPPA_CAP)."""
    if name == "eigvec_condition":
        value = KAPPA_CAP if value is None or not math.isfinite(value) else min(float(value), KAPPA_CAP)
    if value is None or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return math.log10(max(value, 1e-300)) if FEATURES[name] == "log10" else float(value)


# --- the logistic fit -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogisticFit:
    """P(y = 1 | x) = sigmoid(intercept + coef . (x - mean) / std), x already transformed."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    intercept: float
    coef: tuple[float, ...]
    l2: float

    def logit(self, x: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(x) - np.asarray(self.mean)) / np.asarray(self.std)
        return self.intercept + z @ np.asarray(self.coef)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(self.logit(x), -40.0, 40.0)))


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-2, max_iter: int = 100) -> LogisticFit:
    """Ridge-penalized logistic regression by Newton's method (IRLS) on standardized columns.

    Minimizes mean log-loss + ``l2 / 2 * ||coef||^2`` (intercept free, coefficients of
    standardized columns); the penalty keeps the fit finite when a feature separates the
    classes perfectly, as M_~1 can.
    """
    x = np.asarray(x, dtype=float).reshape(len(y), -1)
    y = np.asarray(y, dtype=float)
    if y.min() == y.max():
        raise ValueError("fit_logistic needs both classes in y")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-12] = 1.0
    a = np.hstack([np.ones((len(y), 1)), (x - mean) / std])
    w = np.zeros(a.shape[1])
    pen = np.full(a.shape[1], l2 * len(y))  # l2 on the mean log-loss scale
    pen[0] = 0.0
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -40.0, 40.0)))
        grad = a.T @ (p - y) + pen * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(pen) + 1e-10 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return LogisticFit(tuple(mean.tolist()), tuple(std.tolist()), float(w[0]), tuple(w[1:].tolist()), float(l2))


# --- the shipped model ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RiskModel:
    """The shipped risk model: which features, the fit, where it is valid, and where it came from."""

    features: tuple[str, ...]
    fit: LogisticFit
    n_runs: int
    n_diverged: int
    divergence_definition: str
    sweep_data_sha256: str
    #: name -> [lo, hi] of what the sweep covered: lr, d_model, n_layers, and every feature
    valid: dict
    #: grouped cross-validation of this feature set: groups, ece, auroc, log_loss, n_folds
    cv: dict
    #: the RKSP settings of the sweep's profiles (rank, tokens, eps, bands)
    rksp: dict
    #: what the sweep trained: task, architecture, norms, optimizer, steps
    sweep: dict = field(default_factory=dict)
    format: int = FORMAT

    def to_json(self) -> dict:
        d = asdict(self)
        d["features"] = [{"name": f, "transform": FEATURES[f]} for f in self.features]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RiskModel":
        """Validated reading; raises RiskModelError on anything missing, unknown or non-finite."""
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT}")
            names = tuple(f["name"] for f in d["features"])
            for f in d["features"]:
                if FEATURES.get(f["name"]) != f["transform"]:
                    raise ValueError(f"unknown feature or transform {f}")
            if "near_unit_mass" not in names:
                raise ValueError("the model must use near_unit_mass")
            fit = LogisticFit(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d["fit"].items()})
            k = len(names)
            if not (len(fit.mean) == len(fit.std) == len(fit.coef) == k):
                raise ValueError(f"{k} features but fit arrays of other lengths")
            numbers = [*fit.mean, *fit.std, *fit.coef, fit.intercept, fit.l2]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers) or min(fit.std) <= 0:
                raise ValueError("non-finite coefficients or non-positive std")
            for name in ("lr", *names):
                lo, hi = d["valid"][name]
                if not lo <= hi:
                    raise ValueError(f"valid range of {name} is empty")
            if len(d["sweep_data_sha256"]) != 64:
                raise ValueError("sweep_data_sha256 is not a sha256")
            return cls(features=names, fit=fit, n_runs=int(d["n_runs"]), n_diverged=int(d["n_diverged"]),
                       divergence_definition=str(d["divergence_definition"]),
                       sweep_data_sha256=d["sweep_data_sha256"], valid=dict(d["valid"]), cv=dict(d["cv"]),
                       rksp=dict(d["rksp"]), sweep=dict(d.get("sweep", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise RiskModelError(f"invalid risk model: {e}") from None

    def vector(self, values: dict) -> np.ndarray:
        return np.array([transform(f, values.get(f)) for f in self.features])

    def probability(self, values: dict) -> float:
        """P(divergence) for feature values by name (near_unit_mass, eigvec_condition, lr)."""
        return float(self.fit.predict(self.vector(values))[0])

    def lr_ceiling(self, values: dict, p: float = CEILING_P) -> float | None:
        """The learning rate where P(divergence) = p, or None when the model has no lr term or P falls with lr."""
        if "lr" not in self.features:
            return None
        i = self.features.index("lr")
        slope = self.fit.coef[i] / self.fit.std[i]
        if slope <= 0:
            return None
        rest = float(self.fit.logit(self.vector({**values, "lr": 1.0}))[0])  # log10(1) = 0: the lr term drops
        return 10 ** ((math.log(p / (1 - p)) - rest) / slope)

    def assess(self, *, near_unit_mass: float, eigvec_condition: float | None, lr: float, lr_source: str,
               d_model: int | None = None, n_layers: int | None = None, init: bool = True,
               method: dict | None = None) -> RiskEntry:
        """The audit's ``risk`` entry: probability, band, ceiling, and every way the input is out of range."""
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        values = {"near_unit_mass": near_unit_mass, "eigvec_condition": eigvec_condition, "lr": float(lr)}
        p = self.probability(values)
        warnings = [] if init else ["the model has trained weights; the risk model was fitted at random init"]
        checks = {"lr": lr, "d_model": d_model, "n_layers": n_layers,
                  **{f: values[f] for f in self.features if f != "lr"}}
        for name, v in checks.items():
            if v is None or name not in self.valid:
                continue
            lo, hi = self.valid[name]
            if not lo <= v <= hi:
                warnings.append(f"{name} = {v:.4g} is outside the fitted range [{lo:.4g}, {hi:.4g}]")
        for k, want in self.rksp.items():
            if method is not None and k in method and method[k] != want:
                warnings.append(f"the audit's {k} {method[k]!r} differs from the sweep's {want!r}")
        return RiskEntry(
            probability=p,
            band=band(p),
            lr=float(lr),
            lr_source=lr_source,
            lr_ceiling=self.lr_ceiling(values),
            lr_ceiling_probability=CEILING_P,
            in_range=not warnings,
            warnings=warnings,
            model={"sweep_data_sha256": self.sweep_data_sha256, "n_runs": self.n_runs,
                   "features": list(self.features), "divergence_definition": self.divergence_definition,
                   "cv_ece": self.cv.get("ece"), "cv_auroc": self.cv.get("auroc"),
                   "heldout_auroc": self.heldout_auroc},
        )

    @property
    def heldout_auroc(self) -> float | None:
        """The AUROC measured on runs the fit did not see: the grouped cross-validation's (one (norm, d, L)
        group left out at a time)."""
        v = self.cv.get("auroc")
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    def informative(self) -> bool:
        return self.heldout_auroc is not None and self.heldout_auroc >= MIN_AUROC


def model_path():
    return files("hf_rksp") / "data" / "risk_model.json"


@lru_cache(maxsize=1)
def load_risk_model() -> RiskModel | None:
    """The shipped risk model, or None when this build has none (raises RiskModelError when it is invalid)."""
    path = model_path()
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RiskModelError(f"cannot read {path}: {e}") from None
    return RiskModel.from_json(d)


def assess_summary(summary: SummaryRecord | dict, *, lr: float | None, family: str | None,
                   d_model: int | None = None, n_layers: int | None = None, init: bool = True,
                   method: dict | None = None, model: RiskModel | None = None) -> tuple[RiskEntry | None, str | None]:
    """(risk entry, None) from an audit's summary (``SummaryRecord`` or its dict), or (None, reason).

    A probability comes only where it means something: from a model whose held-out AUROC is at least
    ``MIN_AUROC`` and whose fitted ranges cover this model and these settings (no warning); otherwise the
    reason says there is no informative estimate, why (the model's measured held-out AUROC, or what is out
    of range), and which command gives one.
    ``lr`` None: the family's default learning rate (DEFAULT_LR), said so in ``lr_source``.
    """
    model = model if model is not None else load_risk_model()
    if model is None:
        return None, UNAVAILABLE
    if not model.informative():
        auc = "unmeasured" if model.heldout_auroc is None else f"{model.heldout_auroc:.2f}"
        return None, (f"no informative estimate: the shipped risk model (RKSP at init) has held-out AUROC {auc} "
                      f"(grouped cross-validation on {model.n_runs} runs of the reproduction's sweep; a probability "
                      f"needs >= {MIN_AUROC:g}); {PREFLIGHT_HINT}")
    s = SummaryRecord.from_dict(summary) if isinstance(summary, dict) else summary
    lr_source = "given" if lr is not None else f"default for family {family!r}"
    lr = float(lr) if lr is not None else default_lr(family)
    entry = model.assess(near_unit_mass=s.score, eigvec_condition=s.features["eigvec_condition"].mean,
                         lr=lr, lr_source=lr_source, d_model=d_model, n_layers=n_layers, init=init, method=method)
    if not entry.in_range:
        return None, (f"no informative estimate: the risk model (held-out AUROC {model.heldout_auroc:.2f}) does not "
                      f"cover this model and these settings ({'; '.join(entry.warnings)}); {PREFLIGHT_HINT}")
    return entry, None
