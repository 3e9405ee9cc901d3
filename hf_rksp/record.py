"""The audit JSON (schema 2.0): its schema, built from the feature registry, and the one reader.

``read_audit`` is the only place an audit.json is read (re-render, compare,
push): it rejects what JSON cannot hold (NaN, Infinity), files that are not
UTF-8 JSON, anything against the schema, and audits of another method version.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import AuditFileError
from .spectral import FEATURES, METHOD_VERSION
from .summary import THIRDS

SCHEMA_VERSION = "2.0"
SCHEMA_FILE = "schema/audit.schema.json"
MAX_BYTES = 512 * 2**20  # an audit of a 100-block model with 2048 eigenvalues each is ~10 MB

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_SHARE = {"type": "number", "minimum": 0, "maximum": 1}


def _feature_schema(f) -> dict:
    if f.name.endswith("_kept") and f.name != "resdmd_kept":
        return {"type": ["number", "null"], "minimum": 0, "maximum": 1}
    if f.name.endswith("mass") or f.name == "resdmd_kept":
        return _SHARE
    return _NUM_OR_NULL if f.unbounded or f.name.startswith("resdmd_residual") else {"type": "number", "minimum": 0}


def _aggregate_schema() -> dict:
    keys = ("mean", "max", "min", "std") + THIRDS
    return {"type": "object", "required": [*keys, "n"],
            "properties": {**{k: _NUM_OR_NULL for k in keys}, "n": {"type": "integer", "minimum": 0}}}


def _summary_schema() -> dict:
    return {
        "type": "object",
        "required": ["score", "features", "spectral_radius_max_block", "flagged_blocks"],
        "properties": {
            "score": _SHARE,
            "features": {"type": "object", "required": [f.name for f in FEATURES],
                         "properties": {f.name: _aggregate_schema() for f in FEATURES}},
            "spectral_radius_max_block": {"type": "integer", "minimum": 0},
            "flagged_blocks": {"type": "object", "additionalProperties": {"type": "array",
                                                                         "items": {"type": "integer"}}},
            "verdict": {"type": "string"},
        },
    }


def audit_schema() -> dict:
    """The JSON Schema of an audit (schema 2.0), from the feature registry."""
    block = {
        "type": "object",
        "required": ["index", *[f.name for f in FEATURES], "m", "rank", "flags", "eigenvalues"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            **{f.name: _feature_schema(f) for f in FEATURES},
            "m": {"type": "integer", "minimum": 1},
            "rank": {"type": "integer", "minimum": 1},
            "flags": {"type": "array", "items": {"enum": ["near_identity", "rank_deficient"]}},
            "eigenvalues": {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                      "items": _NUM}},
            "stack": {"type": "string"},
            "stack_index": {"type": "integer", "minimum": 0},
            "router": {"type": "object"},
        },
    }
    summary = _summary_schema()
    summary["properties"]["stacks"] = {"type": "object", "additionalProperties": _summary_schema()}
    positive = {"type": "number", "exclusiveMinimum": 0}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/hf-rksp/hf-rksp/schema/audit.schema.json",
        "title": "hf-rksp audit",
        "description": f"Result of one RKSP v{METHOD_VERSION} audit (the paper's method), schema {SCHEMA_VERSION}. "
                       "Generated from hf_rksp.spectral.FEATURES by hf_rksp.record.audit_schema().",
        "type": "object",
        "required": ["schema_version", "slug", "created", "command", "method", "source", "inputs", "blocks",
                     "summary", "risk", "environment", "timings"],
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "slug": {"type": "string", "pattern": "^[^/\\\\]+$", "minLength": 1},
            "created": {"type": "string"},
            "command": {"type": "string", "minLength": 1},
            "method": {
                "type": "object",
                "required": ["name", "version", "rank", "eps", "band_upper", "band_lower", "contractive",
                             "resdmd_tau", "rel_cut", "tokens", "seq_len", "seed", "dtype"],
                "properties": {
                    "name": {"const": "RKSP"},
                    "version": {"type": "string"},
                    "rank": {"oneOf": [{"const": "full"}, {"type": "integer", "minimum": 1}]},
                    "eps": positive, "band_upper": positive, "band_lower": positive, "contractive": positive,
                    "resdmd_tau": positive, "rel_cut": positive,
                    "tokens": {"type": "integer", "minimum": 2},
                    "seq_len": {"type": "integer", "minimum": 1},
                    "seed": {"type": "integer"},
                    "dtype": {"type": "string"},
                    "snapshots": {"type": "string"},
                    "streamed": {"type": "boolean"},
                },
            },
            "source": {
                "type": "object",
                "required": ["id", "kind", "init", "revision", "family", "n_blocks", "d_model", "n_params"],
                "properties": {
                    "id": {"type": "string"}, "path": {"type": ["string", "null"]},
                    "kind": {"enum": ["hub", "dir", "gguf", "config"]}, "init": {"type": "boolean"},
                    "revision": {"type": ["string", "null"]}, "family": {"type": "string"},
                    "model_class": {"type": "string"}, "n_blocks": {"type": "integer", "minimum": 1},
                    "d_model": {"type": "integer", "minimum": 1}, "n_params": {"type": "integer", "minimum": 1},
                },
            },
            "inputs": {
                "type": "object",
                "required": ["origin", "n_tokens", "n_sequences", "seq_len", "sha256"],
                "properties": {
                    "origin": {"enum": ["embedded-text", "text-file", "dataset", "random-token-ids",
                                        "synthetic-images"]},
                    "n_tokens": {"type": "integer", "minimum": 2},
                    "n_sequences": {"type": "integer", "minimum": 1},
                    "seq_len": {"type": "integer", "minimum": 1},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                },
            },
            "blocks": {"type": "array", "minItems": 1, "items": block},
            "summary": summary,
            "risk": {"type": ["object", "null"]},
            "risk_unavailable_reason": {"type": "string"},
            "environment": {"type": "object", "required": ["hf_rksp", "torch", "transformers", "device"]},
            "timings": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        },
    }


def validate_audit(audit: dict) -> None:
    """Raise AuditFileError naming the first violation of the schema, or a different method version."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(audit_schema()).iter_errors(audit))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
        raise AuditFileError(f"audit JSON does not match schema {SCHEMA_VERSION} at {where}: {message}")


def _reject_constant(name: str):
    raise AuditFileError(f"audit JSON holds {name}, which JSON does not allow")


def read_audit(path: str | Path) -> dict:
    """The validated audit at ``path`` (a file, or a directory holding audit.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "audit.json"
    if not p.is_file():
        raise AuditFileError(f"audit file not found: {p}")
    if p.stat().st_size > MAX_BYTES:
        raise AuditFileError(f"{p} is {p.stat().st_size} bytes, more than any audit ({MAX_BYTES})")
    try:
        data = json.loads(p.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AuditFileError(f"{p} is not a valid UTF-8 JSON audit: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise AuditFileError(f"{p} is not an audit (a JSON object)")
    version = (data.get("method") or {}).get("version") if isinstance(data.get("method"), dict) else None
    if version is not None and str(version) != METHOD_VERSION:
        raise AuditFileError(f"{p} is an RKSP v{version} audit; this hf-rksp reads v{METHOD_VERSION} only "
                             "(re-run the audit)")
    validate_audit(data)
    return data


def dumps(audit: dict) -> str:
    """The audit as JSON text; refuses NaN/Infinity rather than writing invalid JSON."""
    return json.dumps(audit, indent=1, allow_nan=False)
