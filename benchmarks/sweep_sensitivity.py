"""How the sweep's RKSP AUROC depends on the choices inside RKSP: delta, rank, tokens, which blocks.

    python benchmarks/sweep_sensitivity.py      # reads runs.jsonl, writes sensitivity.json next to it

The divergence labels are the published sweep's (benchmarks/divergence_sweep.py);
only the init-time features are recomputed, per architecture and seed, with
each variant, and scored exactly like the sweep's predictors (logistic on
features + log10 lr, 5-fold CV grouped by configuration, the same folds).
Variants are one change at a time from the audit defaults (delta 0.05, rank
256, 2048 tokens, all blocks).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "divergence_sweep"

VARIANTS = {  # name -> (delta, rank, tokens, blocks)
    "default (delta 0.05, rank 256, 2048 tokens, all blocks)": (0.05, 256, 2048, "all"),
    "delta 0.02": (0.02, 256, 2048, "all"),
    "delta 0.10": (0.10, 256, 2048, "all"),
    "rank 16": (0.05, 16, 2048, "all"),
    "rank 64": (0.05, 64, 2048, "all"),
    "512 tokens": (0.05, 256, 512, "all"),
    "first block only": (0.05, 256, 2048, "first"),
    "last block only": (0.05, 256, 2048, "last"),
}


def features(blocks: list[dict], delta: float, which: str) -> dict:
    from hf_rksp.spectral import spectral_features

    sel = {"all": blocks, "first": blocks[:1], "last": blocks[-1:]}[which]
    per = [spectral_features(torch.view_as_complex(torch.tensor(b["eigenvalues"], dtype=torch.float64)), delta)
           for b in sel]
    return {"rksp_near_unit_mass": float(np.mean([f["near_unit_mass"] for f in per])),
            "rksp_spectral_radius_max": float(max(f["spectral_radius"] for f in per)),
            "rksp_outside_mass_mean": float(np.mean([f["outside_mass"] for f in per]))}


def main() -> int:
    from hf_rksp.audit import AuditOptions, profile_model
    from hf_rksp.sweep import analysis
    from hf_rksp.sweep.run import SEQ_LEN, RunSpec, build_model, calibration_ids

    torch.set_num_threads(1)
    rows = [json.loads(x) for x in (OUT / "runs.jsonl").read_text().splitlines() if x.strip()]
    fit = [r for r in rows if r["part"] == "fit" and "error" not in r]
    fields = [f for f in RunSpec.__dataclass_fields__]
    specs = {RunSpec(**{k: r[k] for k in fields}).arch_id: RunSpec(**{k: r[k] for k in fields}) for r in fit}
    t0 = time.perf_counter()
    profiles: dict[tuple, list[dict]] = {}
    for arch, spec in specs.items():
        model = build_model(spec).eval()
        for tokens, rank in {(v[2], v[1]) for v in VARIANTS.values()}:
            ids = calibration_ids(tokens, SEQ_LEN)
            profiles[(arch, tokens, rank)], _, _ = profile_model(
                model, ids, AuditOptions(tokens=tokens, seq_len=SEQ_LEN, rank=rank), progress=False)
    y = np.array([float(r["diverged"]) for r in fit])
    folds = analysis.grouped_folds([r["config_id"] for r in fit])
    out = {}
    for name, (delta, rank, tokens, which) in VARIANTS.items():
        vrows = []
        for r in fit:
            arch = RunSpec(**{k: r[k] for k in fields}).arch_id
            vrows.append({**r, **features(profiles[(arch, tokens, rank)], delta, which)})
        entry = {}
        for pred in ("RKSP (M, radius, outside)", "RKSP near-unit mass M"):
            s = analysis.cv_scores(analysis.design_matrix(vrows, analysis.PREDICTORS[pred]), y, folds)
            entry[pred] = analysis.auroc(s, y)
        entry["raw M (no lr)"] = analysis.auroc(np.array([v["rksp_near_unit_mass"] for v in vrows]), y)
        out[name] = entry
        print(f"{name:58s} " + "  ".join(f"{k}: {v:.3f}" for k, v in entry.items()), flush=True)
    result = {"variants": out, "architectures": len(specs), "runs": len(fit), "seconds": time.perf_counter() - t0}
    analysis.write_json(OUT / "sensitivity.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
