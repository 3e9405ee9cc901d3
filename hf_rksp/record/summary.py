"""Model-level RKSP v2 aggregates (Algorithm 1, line 11; Tables 10 and 15): pure, on JSON-ready block dicts.

Every feature of the registry gets mean, max, min and std over blocks, and the
means of the early / middle / late thirds of depth (np.array_split's thirds:
the first blocks take the remainder).  Blocks whose value is null (infinite or
undefined) are left out of that feature's aggregates; ``n`` says how many
counted.  The score is the mean near-unit mass M_~1.
"""

from __future__ import annotations

import math

from hf_rksp.spectral import FEATURES

THIRDS = ("early", "middle", "late")


def _thirds(n: int) -> list[range]:
    size, extra = divmod(n, 3)
    out, start = [], 0
    for i in range(3):
        stop = start + size + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def aggregate(values: list[float | None]) -> dict:
    """mean/max/min/std over the non-null values, and the means of the thirds of depth."""
    vals = [v for v in values if v is not None]
    mean = _mean(vals)
    out = {
        "mean": mean,
        "max": max(vals) if vals else None,
        "min": min(vals) if vals else None,
        "std": math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else None,
        "n": len(vals),
    }
    for name, part in zip(THIRDS, _thirds(len(values))):
        out[name] = _mean([values[i] for i in part if values[i] is not None])
    return out


def _summarize(blocks: list[dict]) -> dict:
    feats = {f.name: aggregate([b[f.name] for b in blocks]) for f in FEATURES}
    radii = [b["spectral_radius"] for b in blocks]
    worst = max(range(len(blocks)), key=lambda i: radii[i])
    return {
        "score": feats["near_unit_mass"]["mean"],
        "features": feats,
        "spectral_radius_max_block": blocks[worst]["index"],
        "flagged_blocks": {flag: [b["index"] for b in blocks if flag in b["flags"]]
                           for flag in ("near_identity", "rank_deficient")},
    }


def summarize(blocks: list[dict]) -> dict:
    """The model-level summary; encoder-decoder models also get one per stack under ``stacks``."""
    out = _summarize(blocks)
    stacks = sorted({b["stack"] for b in blocks if "stack" in b})
    if stacks:
        out["stacks"] = {s: _summarize([b for b in blocks if b.get("stack") == s]) for s in stacks}
    return out
