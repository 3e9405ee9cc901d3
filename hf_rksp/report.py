"""Report: the audit JSON (schema 1.0), the spectral model card, and writing them atomically."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

from . import atomic, plots

SCHEMA_VERSION = "1.0"
SCHEMA_FILE = "schema/audit.schema.json"


def audit_schema() -> dict:
    import json
    from importlib import resources

    return json.loads(resources.files("hf_rksp").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def validate_audit(audit: dict) -> None:
    """Raise RKSPError naming the first violation of the published JSON Schema."""
    import jsonschema

    from .errors import RKSPError

    validator = jsonschema.Draft202012Validator(audit_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(audit))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise RKSPError(f"audit JSON does not match {SCHEMA_FILE} at {where}: {error.message}")


def environment(device: str) -> dict:
    import numpy
    import torch
    import transformers

    from . import __version__

    return {
        "hf_rksp": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }


def summarize(blocks: list[dict]) -> dict:
    """Model-level features: M is the mean near-unit mass over blocks (RKSP v1 step 7).

    Encoder-decoder models also get one summary per stack under ``stacks``.
    """
    out = _summarize(blocks)
    stacks = sorted({b["stack"] for b in blocks if "stack" in b})
    if stacks:
        out["stacks"] = {s: _summarize([b for b in blocks if b.get("stack") == s]) for s in stacks}
    return out


def _summarize(blocks: list[dict]) -> dict:
    n = len(blocks)
    radii = [b["spectral_radius"] for b in blocks]
    worst = max(range(n), key=lambda i: radii[i])
    return {
        "near_unit_mass": sum(b["near_unit_mass"] for b in blocks) / n,
        "spectral_radius_max": radii[worst],
        "spectral_radius_max_block": blocks[worst]["index"],
        "spectral_radius_mean": sum(radii) / n,
        "outside_mass_mean": sum(b["outside_mass"] for b in blocks) / n,
        "fit_r2_mean": sum(b["fit_r2"] for b in blocks) / n,
    }


def _range_finder_detail(method: dict, blocks: list[dict]) -> str:
    """How the randomized range finder ran: iterations per block and any exact fallbacks."""
    if "range_finder" not in method:
        return ""
    rf = method["range_finder"]
    runs = [b["whitening"] for b in blocks if "whitening" in b]
    iters = [w["power_iters"] for w in runs if w["method"] == "randomized"]
    span = f"{min(iters)}" if iters and min(iters) == max(iters) else (f"{min(iters)}–{max(iters)}" if iters else "")
    parts = [f"{rf['dtype']} range finder on {rf['device']}"]
    if span:
        parts.append(f"{span} power iterations per block to a predicted subspace error ≤ {rf['tolerance']:g}")
    fallback = len(runs) - len(iters)
    if fallback:
        parts.append(f"{fallback} block{'s' if fallback > 1 else ''} too flat to converge, whitened by the exact Gram path")
    return " (" + "; ".join(parts) + ")"


def verdict(audit: dict) -> str:
    """A plain-language reading of the features; it states measurements, not a probability."""
    s = audit["summary"]
    n = audit["source"]["n_blocks"]
    what = "at random initialization" if audit["source"]["init"] else "with its weights"
    text = (
        f"{n} blocks audited {what}. Near-unit spectral mass M = {s['near_unit_mass']:.3f} "
        f"(mean fraction of Koopman modes with |λ| within {audit['method']['delta']:g} of 1); "
        f"largest spectral radius {s['spectral_radius_max']:.3f} (block {s['spectral_radius_max_block']}); "
        f"on average {100 * s['outside_mass_mean']:.1f}% of modes lie outside the band, beyond the unit circle. "
        f"The linear operator explains R² = {s['fit_r2_mean']:.3f} of the whitened block outputs on average."
    )
    r = audit.get("risk")
    if r is None:
        text += " No calibrated probability of divergence is given: " + audit["risk_unavailable_reason"]
        return text
    text += f" Risk of divergence: {risk_line(audit)}."
    if not r["in_range"]:
        text += (" Read it with care: this audit lies outside what the risk model was fitted on ("
                 + "; ".join(r["warnings"]) + ").")
    return text


def risk_line(audit: dict) -> str:
    """One line: probability, band, learning rate, ceiling, and whether the model is in range."""
    r = audit.get("risk")
    if r is None:
        return "not available (no fitted risk model in this build)"
    ceiling = (f"lr ceiling (P < {r['lr_ceiling_probability']:g}) {r['lr_ceiling']:.3g}"
               if r["lr_ceiling"] is not None else "no lr ceiling (risk does not grow with lr in the fit)")
    return (f"P(divergence) = {r['probability']:.3f} ({r['band']}) at lr {r['lr']:.3g} ({r['lr_source']}); "
            f"{ceiling}" + ("" if r["in_range"] else f"; OUTSIDE the fitted range ({len(r['warnings'])} warning(s))"))


CARD_TEMPLATE = """---
{card_data}
---

# RKSP spectral audit: {title}

{verdict}

![RKSP spectrum](spectrum.png)

![RKSP profile](profile.png)

## Summary

| feature | value |
|---|---|
| near-unit spectral mass M (mean over blocks) | {M:.4f} |
| largest spectral radius (block) | {rho_max:.4f} ({rho_block}) |
| mean spectral radius | {rho_mean:.4f} |
| mean outside mass | {outside:.4f} |
| mean DMD fit R² | {r2:.4f} |
| probability of divergence | {risk} |

## Per block

| block | near-unit mass | spectral radius | outside mass | fit R² | rank |
|---:|---:|---:|---:|---:|---:|
{rows}

{router_section}## How it was produced

- Source: `{source_id}` ({kind}{revision}), family `{family}`, {n_blocks} blocks, d_model = {d_model}, {n_params:,} parameters{init}.
- Method: RKSP v{mversion} — whitened DMD of each residual block's input/output snapshots, rank ≤ {rank}, δ = {delta:g}, whitening `{whitening}`{whitening_detail}.
- Calibration input: {n_tokens} tokens ({origin}) in sequences of {seq_len}, sha256 `{sha}`, dtype {dtype}, seed {seed}.
- Software: hf-rksp {v_rksp}, torch {v_torch}, transformers {v_tf}.

Reproduce with:

```bash
{command}
```

The full result, eigenvalues included, is in `audit.json` (schema {schema}).

## Limitations

- The spectrum describes the model on the calibration tokens above; other text, lengths or dtypes move it.
- RKSP linearizes each block around the observed snapshots; the fit R² says how much of the block's map a linear operator explains.
- The probability of divergence comes from a logistic model fitted on hf-rksp's own divergence sweep (small GPT-style transformers trained from scratch at random init; see the hf-rksp README). It is calibrated only inside that sweep's ranges; the risk entry of `audit.json` lists every way this model lies outside them.
"""


def eval_results(audit: dict) -> list:
    """The audit's headline numbers as Hub `model-index` results (shown as evaluation results)."""
    from huggingface_hub import EvalResult

    s = audit["summary"]
    metrics = [
        ("near_unit_mass", s["near_unit_mass"], "Near-unit spectral mass (RKSP M)"),
        ("spectral_radius_max", s["spectral_radius_max"], "Max spectral radius"),
        ("outside_mass_mean", s["outside_mass_mean"], "Mean outside mass"),
        ("fit_r2_mean", s["fit_r2_mean"], "Mean DMD fit R2"),
    ]
    if audit.get("risk"):
        metrics.append(("divergence_probability", audit["risk"]["probability"], "Probability of divergence"))
    common = dict(
        task_type="other",
        task_name=f"RKSP v{audit['method']['version']} spectral audit",
        dataset_type="text",
        dataset_name=audit["inputs"]["origin"],
        dataset_config=f"{audit['inputs']['n_tokens']} tokens",
    )
    return [EvalResult(metric_type=t, metric_value=round(float(v), 6), metric_name=n, **common) for t, v, n in metrics]


def render_card(audit: dict) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    src, m, s, inp, env = audit["source"], audit["method"], audit["summary"], audit["inputs"], audit["environment"]
    data = ModelCardData(
        tags=["rksp", "koopman", "spectral-audit"],
        base_model=src["id"] if src["kind"] == "hub" or src.get("path") else None,
        library_name="hf-rksp",
        model_name=audit["slug"],
        eval_results=eval_results(audit),
    )
    rows = "\n".join(
        f"| {b['index']} | {b['near_unit_mass']:.4f} | {b['spectral_radius']:.4f} | "
        f"{b['outside_mass']:.4f} | {b['fit_r2']:.4f} | {b['rank_used']} |"
        for b in audit["blocks"]
    )
    risk = audit["risk"]
    routed = [b for b in audit["blocks"] if "router" in b]
    router_section = ""
    if routed:
        router_section = (
            "## Mixture-of-experts routing\n\n"
            "| block | experts (top-k) | max / mean expert load | max abs router logit | mean router entropy (max) |\n"
            "|---:|---:|---:|---:|---:|\n"
            + "\n".join(
                f"| {b['index']} | {b['router']['n_experts']} ({b['router']['top_k']}) | "
                f"{b['router']['load_max_over_mean']:.3f} | {b['router']['router_logit_max']:.3f} | "
                f"{b['router']['router_entropy_mean']:.3f} ({b['router']['router_entropy_max']:.3f}) |"
                for b in routed
            )
            + "\n\n"
        )
    text = CARD_TEMPLATE.format(
        router_section=router_section,
        card_data=data.to_yaml(),
        title=src["id"] + (" (random init)" if src["init"] else ""),
        verdict=audit["summary"]["verdict"],
        M=s["near_unit_mass"],
        rho_max=s["spectral_radius_max"],
        rho_block=s["spectral_radius_max_block"],
        rho_mean=s["spectral_radius_mean"],
        outside=s["outside_mass_mean"],
        r2=s["fit_r2_mean"],
        risk=risk_line(audit),
        rows=rows,
        source_id=src["id"],
        kind=src["kind"],
        revision=f", revision `{src['revision']}`" if src.get("revision") else "",
        family=src["family"],
        n_blocks=src["n_blocks"],
        d_model=src["d_model"],
        n_params=src["n_params"],
        init=f", random init (seed {m['seed']})" if src["init"] else "",
        mversion=m["version"],
        rank=m["rank"],
        delta=m["delta"],
        whitening=m["whitening"],
        whitening_detail=_range_finder_detail(m, audit["blocks"]),
        n_tokens=inp["n_tokens"],
        origin=inp["origin"],
        seq_len=inp["seq_len"],
        sha=inp["sha256"][:16],
        dtype=m["dtype"],
        seed=m["seed"],
        v_rksp=env["hf_rksp"],
        v_torch=env["torch"],
        v_tf=env["transformers"],
        command=audit["command"],
        schema=audit["schema_version"],
    )
    return str(ModelCard(text))


def write_outputs(audit: dict, out_dir: str | Path) -> dict[str, str]:
    """Write audit.json, the plots and the card; all files appear together or not at all.

    Everything is rendered into staging directories first and then swapped in
    as whole directories, so a failure at any point leaves the previous
    audit and card of this slug untouched.
    """
    validate_audit(audit)
    out_dir = Path(out_dir)
    slug = audit["slug"]
    audit_dir = out_dir / "audits" / slug
    card_dir = out_dir / "model_cards" / slug
    spectrum = plots.spectrum_png(audit)
    profile = plots.profile_png(audit)
    card = render_card(audit)
    (out_dir / "audits").mkdir(parents=True, exist_ok=True)
    (out_dir / "model_cards").mkdir(parents=True, exist_ok=True)
    stage_a = atomic.make_dir(out_dir / "audits", f".{slug}.")
    stage_c = atomic.make_dir(out_dir / "model_cards", f".{slug}.")
    try:
        atomic.write_json(stage_a / "audit.json", audit)
        for stage in (stage_a, stage_c):
            atomic.write_bytes(stage / "spectrum.png", spectrum)
            atomic.write_bytes(stage / "profile.png", profile)
        atomic.write_text(stage_c / "README.md", card)
        atomic.publish_dirs([(stage_a, audit_dir), (stage_c, card_dir)])
    finally:
        shutil.rmtree(stage_a, ignore_errors=True)
        shutil.rmtree(stage_c, ignore_errors=True)
    return {
        "audit": str(audit_dir / "audit.json"),
        "spectrum": str(audit_dir / "spectrum.png"),
        "profile": str(audit_dir / "profile.png"),
        "card": str(card_dir / "README.md"),
    }
