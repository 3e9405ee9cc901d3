"""Statistics of the analysis: AUROC and its bootstrap CI, calibration (ECE, reliability), log-loss,
Fisher's exact test and Wilson intervals, in numpy."""

from __future__ import annotations

import math

import numpy as np

# --- statistics -------------------------------------------------------------------------------------------------

def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    r = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def auroc(score, y) -> float | None:
    """P(score of a diverged run > score of a stable one), ties counting 1/2 (Mann-Whitney U / n1 n0)."""
    s, y = np.asarray(score, dtype=float), np.asarray(y, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return None
    r = ranks(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_ci(score, y, stat=auroc, n: int = 1000, seed: int = 0) -> list[float] | None:
    """Percentile 95% CI of ``stat`` over ``n`` resamples of the runs (resamples with one class redrawn)."""
    s, y = np.asarray(score, dtype=float), np.asarray(y, dtype=bool)
    if stat(s, y) is None:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    while len(vals) < n:
        idx = rng.integers(0, len(y), len(y))
        v = stat(s[idx], y[idx])
        if v is not None:
            vals.append(v)
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def reliability(p, y, bins: int = 10) -> list[dict]:
    """Equal-width bins of predicted probability: count, mean prediction, observed rate."""
    p, y = np.clip(np.asarray(p, dtype=float), 0, 1), np.asarray(y, dtype=float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "n": int((idx == b).sum()),
             "mean_p": float(p[idx == b].mean()) if (idx == b).any() else None,
             "rate": float(y[idx == b].mean()) if (idx == b).any() else None} for b in range(bins)]


def ece(p, y, bins: int = 10) -> float | None:
    """Expected calibration error: sum over equal-width bins of (n_b / n) |mean p - observed rate|."""
    if len(y) == 0:
        return None
    return float(sum(b["n"] / len(y) * abs(b["mean_p"] - b["rate"]) for b in reliability(p, y, bins) if b["n"]))


def log_loss(p, y) -> float:
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    y = np.asarray(y, dtype=float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided Fisher exact p of the 2x2 table [[a, b], [c, d]] (tables no likelier than the observed)."""
    n1, n2, k = a + b, c + d, a + c
    total = math.comb(n1 + n2, k)

    def prob(x):
        return math.comb(n1, x) * math.comb(n2, k - x) / total

    p0 = prob(a)
    return float(min(1.0, sum(prob(x) for x in range(max(0, k - n2), min(k, n1) + 1) if prob(x) <= p0 * (1 + 1e-9))))


def wilson(k: int, n: int) -> list[float] | None:
    if n == 0:
        return None
    z, p = 1.959964, k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, c - h), min(1.0, c + h)]
