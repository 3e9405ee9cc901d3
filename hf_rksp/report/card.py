"""Report: the spectral model card and the plots of an audit, and writing them with the JSON atomically."""

from __future__ import annotations

import platform
from dataclasses import replace

from hf_rksp.record.records import (
    SCHEMA_VERSION,
    AuditRecord,
    BlockRecord,
    EnvironmentRecord,
)
from hf_rksp.spectral import FEATURES
from hf_rksp.version import __version__

__all__ = ["SCHEMA_VERSION", "environment", "verdict", "with_verdict", "risk_line", "render_card"]


def environment(device: str) -> EnvironmentRecord:
    import numpy
    import torch
    import transformers


    return EnvironmentRecord(hf_rksp=__version__, torch=torch.__version__, transformers=transformers.__version__,
                             numpy=numpy.__version__, python=platform.python_version(), platform=platform.platform(),
                             device=device)


def _fmt(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def verdict(audit: AuditRecord) -> str:
    """A plain-language reading of the features; it states measurements, not a probability."""
    s, m = audit.summary, audit.method
    f = s.features
    what = "at random initialization" if audit.source.init else "with its weights"
    text = (
        f"{audit.source.n_blocks} blocks audited {what}. Near-unit spectral mass M = {s.score:.3f} (mean share of "
        f"DMD eigenvalues with {m.band_lower:g} <= |λ| <= {m.band_upper:g}); expansive mass "
        f"{f['expansive_mass'].mean:.3f} (|λ| > {m.band_upper:g}), contractive mass {f['contractive_mass'].mean:.3f} "
        f"(|λ| < {m.contractive:g}); largest spectral radius {f['spectral_radius'].max:.3f} "
        f"(block {s.spectral_radius_max_block}); mean eigenvector condition number "
        f"κ(V) = {_fmt(f['eigvec_condition'].mean, '.3g')}; mean nonlinearity ratio "
        f"η_nl = {_fmt(f['nonlinearity_ratio'].mean, '.3f')}; "
        f"{100 * f['resdmd_kept'].mean:.0f}% of modes pass the ResDMD filter (r ≤ {m.resdmd_tau:g})."
    )
    flagged = {k: v for k, v in s.flagged_blocks.items() if v}
    if flagged.get("near_identity"):
        text += (f" Blocks {flagged['near_identity']} barely change the residual stream: their η_nl is "
                 "unreliable (zero-init / ReZero-like).")
    if flagged.get("rank_deficient"):
        text += f" Blocks {flagged['rank_deficient']} see rank-deficient inputs: fewer eigenvalues than d."
    if s.degenerate:
        text += (" DEGENERATE AUDIT (" + ", ".join(s.degenerate) + "): these numbers are not a measurement of "
                 "the model.")
    if audit.risk is None:
        text += (" No calibrated probability of divergence is given: "
                 + (audit.risk_unavailable_reason or "no fitted risk model") + ".")
    else:
        text += f" Risk of divergence: {risk_line(audit)}."
    return text


def fallback_note(audit: AuditRecord) -> str:
    """The sentence a card carries when the audit fell back to random token ids (``inputs.reason`` says why:
    issue 29's one fallback, a pretrained model with no tokenizer); empty otherwise (an audit at init without
    a tokenizer is calibrated on random ids by design)."""
    inp = audit.inputs
    reason = inp.detail.get("reason")
    if inp.origin != "random-token-ids" or not reason:
        return ""
    return (f"**Not text:** {reason}, so hf-rksp calibrated on {inp.n_tokens} seeded uniform random token ids "
            f"(vocabulary {inp.detail.get('vocab_size', '?')}, seed {inp.detail.get('seed', '?')}) instead; these "
            "spectra are the model's on random tokens, not on language (give it a tokenizer and `--text` for "
            "those).")


def with_verdict(audit: AuditRecord) -> AuditRecord:
    """The record with its summary's verdict (re)written from its numbers."""
    return replace(audit, summary=replace(audit.summary, verdict=verdict(audit)))


def _risk_note(audit: AuditRecord) -> str:
    if audit.risk is None:
        return "No calibrated probability of divergence is given here: " + (audit.risk_unavailable_reason or
                                                                            "no fitted risk model") + "."
    model = audit.risk.model or {}
    cv = ""
    if model.get("cv_auroc") is not None and model.get("cv_ece") is not None:
        cv = (f" On runs it did not see (grouped cross-validation on that sweep) it has AUROC "
              f"{model.get('heldout_auroc', model['cv_auroc']):.2f} and ECE {model['cv_ece']:.2f}.")
    return ("The probability of divergence comes from hf-rksp's logistic model fitted on its reproduction of the "
            "paper's sweep (small GPT-2-style models at random init); outside that setting it is a rough guide."
            + cv)


def risk_line(audit: AuditRecord) -> str:
    """One line: probability, band, learning rate, ceiling, and whether the model is in range."""
    r = audit.risk
    if r is None:
        return "not available: " + (audit.risk_unavailable_reason or "no fitted risk model")
    ceiling = (f"lr ceiling (P < {r.lr_ceiling_probability:g}) {r.lr_ceiling:.3g}"
               if r.lr_ceiling is not None else "no lr ceiling (risk does not grow with lr in the fit)")
    auc = (r.model or {}).get("heldout_auroc")
    return (f"P(divergence) = {r.probability:.3f} ({r.band}) at lr {r.lr:.3g} ({r.lr_source}); "
            f"{ceiling}" + ("" if auc is None else f"; the model's held-out AUROC {auc:.2f}")
            + ("" if r.in_range else f"; OUTSIDE the fitted range ({len(r.warnings)} warning(s))"))


CARD_TEMPLATE = """---
{card_data}
---

# RKSP spectral audit: {title}

{verdict}

![RKSP spectrum](spectrum.png)

![RKSP profile](profile.png)

## Summary (over blocks)

| feature | mean | min | max | std | early | middle | late |
|---|---:|---:|---:|---:|---:|---:|---:|
{summary_rows}

Probability of divergence: {risk}

## Per block

| block | {block_header} | m |
|---:|{block_align}---:|
{rows}

{router_section}## How it was produced

- Source: `{source_id}` ({kind}{revision}), family `{family}`, {n_blocks} blocks, d_model = {d_model}, {n_params:,} parameters{init}.
- Method: RKSP v{mversion}, the paper's whitened DMD of each residual block's input/output snapshots: ZCA whitening with X's covariance + {eps:g} I, {rank_text}; bands: expansive |λ| > {band_upper:g}, near-unit [{band_lower:g}, {band_upper:g}], contractive < {contractive:g}; ResDMD τ = {resdmd_tau:g}; Kreiss constant of A / max(ρ, 1).
- Calibration input: {n_tokens} tokens ({origin}) in sequences of {seq_len}, sha256 `{sha}`, dtype {dtype}, seed {seed}.{fallback}
- Software: hf-rksp {v_rksp}, torch {v_torch}, transformers {v_tf}.

Reproduce with:

```bash
{command}
```

The full result, eigenvalues included, is in `audit.json` (schema {schema}).

## Limitations

- The spectrum describes the model on the calibration tokens above; other text, lengths or dtypes move it.
- RKSP linearizes each block around the observed snapshots; η_nl and the ResDMD share say how far that linear operator can be trusted.
- M is the paper's score (AUROC 0.995 in its sweep); it is not a probability. {risk_note}
"""

#: the per-block table's columns (a subset of the registry: the full record is in audit.json)
CARD_BLOCK_COLUMNS = ("near_unit_mass", "expansive_mass", "contractive_mass", "spectral_radius", "eigvec_condition",
                      "nonlinearity_ratio", "kreiss_constant", "resdmd_kept")
#: the model-index metrics: (summary feature, aggregate, metric name)
CARD_METRICS = (("near_unit_mass", "mean", "Near-unit spectral mass M (RKSP v2)"),
                ("expansive_mass", "mean", "Expansive mass M_>1"),
                ("spectral_radius", "max", "Max spectral radius"),
                ("eigvec_condition", "mean", "Mean eigenvector condition number kappa(V)"),
                ("nonlinearity_ratio", "mean", "Mean nonlinearity ratio eta_nl"))


def eval_results(audit: AuditRecord) -> list:
    """The audit's headline numbers as Hub `model-index` results (shown as evaluation results)."""
    from huggingface_hub import EvalResult

    feats = audit.summary.features
    common = dict(
        task_type="other",
        task_name=f"RKSP v{audit.method.version} spectral audit",
        dataset_type="text",
        dataset_name=audit.inputs.origin,
        dataset_config=f"{audit.inputs.n_tokens} tokens",
    )
    values = [(name, agg, label, getattr(feats[name], agg)) for name, agg, label in CARD_METRICS]
    return [EvalResult(metric_type=f"{name}_{agg}", metric_value=round(float(v), 6), metric_name=label, **common)
            for name, agg, label, v in values if v is not None]


def _router_section(blocks: list[BlockRecord]) -> str:
    routed = [b for b in blocks if b.router is not None]
    if not routed:
        return ""
    return (
        "## Mixture-of-experts routing\n\n"
        "| block | experts (top-k) | max / mean expert load | max abs router logit | mean router entropy (max) |\n"
        "|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {b.index} | {b.router.n_experts} ({b.router.top_k}) | "
            f"{b.router.load_max_over_mean:.3f} | {b.router.router_logit_max:.3f} | "
            f"{b.router.router_entropy_mean:.3f} ({b.router.router_entropy_max:.3f}) |"
            for b in routed
        )
        + "\n\n"
    )


def render_card(audit: AuditRecord) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    src, m, s, inp, env = audit.source, audit.method, audit.summary, audit.inputs, audit.environment
    data = ModelCardData(
        tags=["rksp", "koopman", "spectral-audit"],
        base_model=src.id if src.kind == "hub" or src.path else None,
        library_name="hf-rksp",
        model_name=audit.slug,
        eval_results=eval_results(audit),
    )
    summary_rows = "\n".join(
        f"| {f.label} ({f.symbol}) | "
        + " | ".join(_fmt(getattr(s.features[f.name], k), f.fmt) for k in ("mean", "min", "max", "std", "early",
                                                                            "middle", "late")) + " |"
        for f in FEATURES
    )
    cols = [f for f in FEATURES if f.name in CARD_BLOCK_COLUMNS]
    rows = "\n".join(f"| {b.index} | " + " | ".join(_fmt(b.value(f.name), f.fmt) for f in cols) + f" | {b.m} |"
                      for b in audit.blocks)
    text = CARD_TEMPLATE.format(
        card_data=data.to_yaml(),
        title=src.id + (" (random init)" if src.init else ""),
        verdict=s.verdict,
        summary_rows=summary_rows,
        risk=risk_line(audit),
        risk_note=_risk_note(audit),
        block_header=" | ".join(f.symbol for f in cols),
        block_align="---:|" * len(cols),
        rows=rows,
        router_section=_router_section(audit.blocks),
        source_id=src.id,
        kind=src.kind,
        revision=f", revision `{src.revision}`" if src.revision else "",
        family=src.family,
        n_blocks=src.n_blocks,
        d_model=src.d_model,
        n_params=src.n_params,
        init=f", random init (seed {m.seed})" if src.init else "",
        mversion=m.version,
        eps=m.eps,
        rank_text=("full DMD (all eigenvalues on the range of X~)" if m.rank == "full"
                   else f"seeded rank-{m.rank} randomized DMD"),
        band_upper=m.band_upper,
        band_lower=m.band_lower,
        contractive=m.contractive,
        resdmd_tau=m.resdmd_tau,
        n_tokens=inp.n_tokens,
        origin=inp.origin,
        fallback=("" if not fallback_note(audit) else " " + fallback_note(audit)),
        seq_len=inp.seq_len,
        sha=inp.sha256[:16],
        dtype=m.dtype,
        seed=m.seed,
        v_rksp=env.hf_rksp,
        v_torch=env.torch,
        v_tf=env.transformers,
        command=audit.command,
        schema=audit.schema_version,
    )
    return str(ModelCard(text))


