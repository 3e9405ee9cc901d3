"""Model-level RKSP v2 aggregates (Algorithm 1, line 11; Tables 10 and 15): pure, ``BlockRecord``s in,
a ``SummaryRecord`` out.

Every feature of the registry gets mean, max, min and std over blocks, and the
means of the early / middle / late thirds of depth (np.array_split's thirds:
the first blocks take the remainder).  Blocks whose value is null (infinite or
undefined) are left out of that feature's aggregates; ``n`` says how many
counted.  The score is the mean near-unit mass M_~1.
"""

from __future__ import annotations

import math

from hf_rksp.record.records import THIRDS, Aggregate, BlockRecord, SummaryRecord
from hf_rksp.spectral import FEATURES

__all__ = ["THIRDS", "aggregate", "summarize"]


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


def aggregate(values: list[float | None]) -> Aggregate:
    """mean/max/min/std over the non-null values, and the means of the thirds of depth."""
    vals = [v for v in values if v is not None]
    mean = _mean(vals)
    thirds = {name: _mean([values[i] for i in part if values[i] is not None])
              for name, part in zip(THIRDS, _thirds(len(values)))}
    return Aggregate(
        mean=mean,
        max=max(vals) if vals else None,
        min=min(vals) if vals else None,
        std=math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else None,
        n=len(vals),
        **thirds,
    )


def _summarize(blocks: list[BlockRecord], stacks: dict[str, SummaryRecord] | None = None) -> SummaryRecord:
    feats = {f.name: aggregate([b.value(f.name) for b in blocks]) for f in FEATURES}
    radii = [b.spectral_radius for b in blocks]
    worst = max(range(len(blocks)), key=lambda i: radii[i])
    return SummaryRecord(
        score=feats["near_unit_mass"].mean,
        features=feats,
        spectral_radius_max_block=blocks[worst].index,
        flagged_blocks={flag: [b.index for b in blocks if flag in b.flags]
                        for flag in ("near_identity", "rank_deficient")},
        stacks=stacks,
    )


def summarize(blocks: list[BlockRecord]) -> SummaryRecord:
    """The model-level summary; encoder-decoder models also get one per stack under ``stacks``."""
    names = sorted({b.stack for b in blocks if b.stack is not None})
    stacks = {s: _summarize([b for b in blocks if b.stack == s]) for s in names} if names else None
    return _summarize(blocks, stacks)
