"""The audit record (schema 2.0): typed dataclasses, their JSON, the schema built from the feature registry.

An audit is one ``AuditRecord``: the producer (``pipeline.run.audit_model``)
builds it from typed parts all the way (the profile's ``BlockRecord``s, the
summary's ``SummaryRecord``, the risk model's ``RiskEntry``, MoE blocks'
``RouterStats``); the report, plots, compare, push and CLI read its attributes, and
``to_json``/``from_json`` are the only way it becomes text and back.  The
JSON is the schema-2.0 format unchanged: ``to_json`` writes the keys in the
order they always had, so ``from_json(text).to_json() == text`` for every
audit hf-rksp writes.

``read_audit`` is the only place an audit.json is read (re-render, compare,
push): it rejects what JSON cannot hold (NaN, Infinity), files that are not
UTF-8 JSON, anything against the schema, and audits of another method version.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from hf_rksp.errors import AuditFileError
from hf_rksp.spectral import FEATURE_NAMES, FEATURES, METHOD_VERSION

#: the thirds of depth every feature's aggregate has a mean of (``hf_rksp.record.summary``)
THIRDS = ("early", "middle", "late")

#: why an audit's numbers are not a measurement (``SummaryRecord.degenerate``; the rules are
#: ``hf_rksp.pipeline.run.degeneracies``, thresholds ours): ``exact_fit``, N <= d + 1 calibration tokens, so each
#: block's DMD operator reproduces its snapshots exactly (η_nl = 0); ``few_distinct_tokens``, the calibration
#: tokens hold fewer than ``MIN_DISTINCT_TOKENS`` distinct ids, so the snapshots repeat a handful of states;
#: ``near_identity``, a block flagged ``near_identity`` (||Y~ - X~||_F <= identity_tol ||X~||_F): its operator is
#: the identity, every eigenvalue ~1, so it adds near-unit mass 1 to M by construction and its η_nl is 0/0
DEGENERATE = ("exact_fit", "few_distinct_tokens", "near_identity")
#: fewer distinct calibration token ids than this: ``few_distinct_tokens`` [ours: a text of a few repeated
#: words; character-level text has 60+]
MIN_DISTINCT_TOKENS = 16

SCHEMA_VERSION = "2.0"
SCHEMA_FILE = "schema/audit.schema.json"
#: the largest audit file read_audit takes, refused by its size before a byte is read.  An eigenvalue takes
#: ~82 bytes of audit.json (SmolLM2-135M's 30 blocks x 576: 1.4 MB), so 64 MiB holds ~800k of them: 128
#: blocks of 6,000, where `rank` auto keeps at most 1,024 per block (a 405B model's 126 blocks: 10.6 MB).
#: Reading costs ~0.5 s and ~3 bytes of memory per byte (the schema check of every eigenvalue, measured on a
#: 2-core EPYC, 1 thread), so a hostile file near the cap is refused in about half a minute.
MAX_BYTES = 64 * 2**20

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_SHARE = {"type": "number", "minimum": 0, "maximum": 1}


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
            "degenerate": {"type": "array", "items": {"enum": list(DEGENERATE)}},
        },
    }


def audit_schema() -> dict:
    """The JSON Schema of an audit (schema 2.0), from the feature registry."""
    block = {
        "type": "object",
        "required": ["index", *[f.name for f in FEATURES], "m", "rank", "flags", "eigenvalues"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            **{f.name: f.json_schema() for f in FEATURES},
            "m": {"type": "integer", "minimum": 1},
            "rank": {"type": "integer", "minimum": 1},
            "flags": {"type": "array", "items": {"enum": ["near_identity", "rank_deficient"]}},
            "eigenvalues": {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                      "items": _NUM}},
            "stack": {"type": "string"},
            "stack_index": {"type": "integer", "minimum": 0},
            "router": {"type": "object",  # what the card's routing table reads
                       "required": ["n_experts", "top_k", "load_max_over_mean", "router_logit_max",
                                    "router_entropy_mean", "router_entropy_max"],
                       "properties": {"n_experts": {"type": "integer", "minimum": 1},
                                      "top_k": {"type": "integer", "minimum": 1},
                                      **{k: _NUM for k in ("load_max_over_mean", "router_logit_max",
                                                           "router_entropy_mean", "router_entropy_max")}}},
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
            # a folder name: no separator, no control character (a newline), not "." or ".."
            "slug": {"type": "string", "pattern": "^(?!\\.\\.?$)[^/\\\\\\x00-\\x1f]+(?![\\s\\S])", "minLength": 1},
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
                    "sketch": {"enum": ["random", "pod"]},
                    "snapshots": {"type": "string"},
                    "streamed": {"type": "boolean"},
                },
            },
            "source": {
                "type": "object",
                "required": ["id", "kind", "init", "revision", "family", "n_blocks", "d_model", "n_params"],
                "properties": {
                    "id": {"type": "string"}, "path": {"type": ["string", "null"]},
                    "kind": {"enum": ["hub", "dir", "gguf", "config", "module"]}, "init": {"type": "boolean"},
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
                                        "synthetic-images", "prompts"]},
                    "n_tokens": {"type": "integer", "minimum": 2},
                    "n_sequences": {"type": "integer", "minimum": 1},
                    "seq_len": {"type": "integer", "minimum": 1},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "distinct_tokens": {"type": "integer", "minimum": 1},
                },
            },
            "blocks": {"type": "array", "minItems": 1, "items": block},
            "summary": summary,
            "risk": {"oneOf": [{"type": "null"}, {  # what the card's risk line reads
                "type": "object",
                "required": ["probability", "band", "lr", "lr_source", "lr_ceiling", "lr_ceiling_probability",
                             "in_range", "warnings"],
                "properties": {"probability": _SHARE, "band": {"type": "string"}, "lr": _NUM,
                               "lr_source": {"type": "string"}, "lr_ceiling": _NUM_OR_NULL,
                               "lr_ceiling_probability": _NUM, "in_range": {"type": "boolean"},
                               "warnings": {"type": "array"}}}]},
            "risk_unavailable_reason": {"type": "string"},
            "environment": {"type": "object", "required": ["hf_rksp", "torch", "transformers", "device"]},
            "timings": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        },
    }


def validate_audit(audit: dict) -> None:
    """Raise AuditFileError naming the first violation of the schema."""
    import jsonschema

    try:
        errors = jsonschema.Draft202012Validator(audit_schema()).iter_errors(audit)
        error = jsonschema.exceptions.best_match(itertools.islice(errors, 100))  # a 2M-item list: not 2M errors
    except RecursionError:
        raise AuditFileError("audit JSON is nested too deeply to be an audit") from None
    if error is not None:
        where = ("/".join(str(p) for p in error.absolute_path) or "(root)")[:200]
        message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
        raise AuditFileError(f"audit JSON does not match schema {SCHEMA_VERSION} at {where}: {message}")


def check_consistency(audit: dict) -> None:
    """What the schema cannot say but every reader relies on: each block's m eigenvalues are there and finite."""
    for i, b in enumerate(audit["blocks"]):
        if len(b["eigenvalues"]) != b["m"]:
            raise AuditFileError(f"audit JSON block {i} has m = {b['m']} but {len(b['eigenvalues'])} eigenvalues")
        if not all(math.isfinite(math.hypot(re, im)) for re, im in b["eigenvalues"]):
            raise AuditFileError(f"audit JSON block {i} has an eigenvalue of infinite modulus")


def check_method_version(audit: dict, origin: str = "this audit") -> None:
    """Raise AuditFileError when ``audit`` (a JSON dict) is of another RKSP version than this build's."""
    method = audit.get("method")
    version = method.get("version") if isinstance(method, dict) else None
    if version is not None and str(version) != METHOD_VERSION:
        raise AuditFileError(f"{origin} is an RKSP v{version} audit; this hf-rksp reads v{METHOD_VERSION} only "
                             "(re-run the audit)")


# ----------------------------------------------------------------------------- the typed record


@dataclass(frozen=True, kw_only=True)
class _Record:
    """A JSON object as a frozen dataclass: its keys are the fields, in declaration order, then ``extra``.

    An optional field left None is not written, unless it is named in
    ``_NULLABLE`` (then it is written as null); keys a record does not know
    are kept in ``extra`` and written after the known ones, so reading and
    writing an audit loses nothing.  The sub-records' ``from_dict`` does not
    validate: ``AuditRecord.from_dict`` validates the whole audit first.
    """

    extra: dict = field(default_factory=dict)

    _NULLABLE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def json_keys(cls) -> tuple[str, ...]:
        """The JSON keys this record types, in the order they are written."""
        return tuple(f.name for f in fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, d: dict, **typed):
        """The record of the JSON object ``d``; ``typed`` gives nested fields already converted."""
        known = cls.json_keys()
        kwargs = {k: d[k] for k in known if k in d}
        return cls(**{**kwargs, **typed}, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self, **typed) -> dict:
        """The JSON object of this record; ``typed`` gives nested fields already converted to JSON."""
        out = {}
        for k in self.json_keys():
            v = typed[k] if k in typed else getattr(self, k)
            if v is not None or k in self._NULLABLE:
                out[k] = v
        out.update(self.extra)
        return out


@dataclass(frozen=True, kw_only=True)
class MethodRecord(_Record):
    """Every parameter that changes the numbers: RKSP's (the RKSPConfig) and the audit's."""

    name: str
    version: str
    rank: str | int  # "full", or r for rank-r randomized DMD
    rank_option: str | None = None  # as asked: "auto", "full" or r
    eps: float
    band_upper: float
    band_lower: float
    contractive: float
    resdmd_tau: float
    rel_cut: float
    eps_nl: float | None = None
    eps_r: float | None = None
    oversample: int | None = None
    power_iters: int | None = None
    kreiss: bool | None = None
    identity_tol: float | None = None
    kreiss_of: str | None = None
    tokens: int
    seq_len: int
    seed: int
    dtype: str
    sketch: str | None = None  # rank-r DMD's subspace ("random" or "pod"); absent at full rank
    snapshots: str | None = None  # where the snapshots were taken, in words
    streamed: bool | None = None


@dataclass(frozen=True, kw_only=True)
class SourceRecord(_Record):
    """What was audited: the model and how it was found."""

    id: str
    path: str | None = None  # the local copy ``id`` stands for (``--name``)
    kind: str  # hub | dir | gguf | config | module (a model audited in memory)
    init: bool
    revision: str | None = None
    config_origin: str | None = None
    gguf_file: str | None = None
    family: str
    model_class: str | None = None
    n_blocks: int
    d_model: int
    n_params: int

    _NULLABLE = ("path", "revision", "config_origin", "gguf_file")


@dataclass(frozen=True, kw_only=True)
class InputsRecord(_Record):
    """The calibration tokens; ``extra`` holds the origin's details (file, dataset, vocab_size, seed...)."""

    origin: str
    n_tokens: int
    n_sequences: int
    seq_len: int
    sha256: str
    distinct_tokens: int | None = None  # distinct token ids among them (absent for images and older audits)

    @property
    def detail(self) -> dict:
        return self.extra


@dataclass(frozen=True, kw_only=True)
class Aggregate(_Record):
    """One feature over the blocks: mean, max, min, std, the means of the thirds of depth; ``n`` blocks counted."""

    mean: float | None
    max: float | None
    min: float | None
    std: float | None
    n: int
    early: float | None
    middle: float | None
    late: float | None

    _NULLABLE = ("mean", "max", "min", "std", "early", "middle", "late")


@dataclass(frozen=True, kw_only=True)
class SummaryRecord(_Record):
    """Model-level RKSP: the score M, every registry feature aggregated, flagged blocks, per-stack summaries."""

    score: float
    features: dict[str, Aggregate]  # by feature name, in registry order
    spectral_radius_max_block: int
    flagged_blocks: dict[str, list[int]]
    stacks: dict[str, SummaryRecord] | None = None  # encoder-decoder models
    verdict: str | None = None
    degenerate: list[str] | None = None  # why the numbers are not a measurement (DEGENERATE); absent: they are

    def feature(self, name: str) -> Aggregate:
        return self.features[name]

    @classmethod
    def from_dict(cls, d: dict) -> SummaryRecord:
        stacks = d.get("stacks")
        return super().from_dict(d, features={k: Aggregate.from_dict(v) for k, v in d["features"].items()},
                                 stacks=None if stacks is None else {k: cls.from_dict(v) for k, v in stacks.items()})

    def to_dict(self) -> dict:
        return super().to_dict(
            features={k: a.to_dict() for k, a in self.features.items()},
            stacks=None if self.stacks is None else {k: s.to_dict() for k, s in self.stacks.items()})


@dataclass(frozen=True, kw_only=True)
class RouterStats(_Record):
    """Routing of one mixture-of-experts block over the calibration tokens (``capture.routers``)."""

    n_experts: int
    top_k: int
    expert_load: list[float] | None = None  # each expert's share of the routed tokens
    load_max_over_mean: float
    load_cv: float | None = None  # coefficient of variation of the load
    router_logit_max: float  # the largest |router logit|
    router_entropy_mean: float
    router_entropy_max: float  # log(n_experts)


@dataclass(frozen=True, kw_only=True)
class BlockRecord(_Record):
    """RKSP v2 of one block: every registry feature by name (``block.value(name)`` or ``block.<name>``; None
    where infinite or undefined), the eigenvalues as [re, im] pairs, and what MoE and encoder-decoder add."""

    index: int
    values: dict[str, float | None]  # by feature name, in registry order
    m: int  # number of eigenvalues
    rank: int  # k, the numerical rank of X~
    flags: list[str]
    eigenvalues: list[list[float]]
    stack: str | None = None
    stack_index: int | None = None
    router: RouterStats | None = None

    def value(self, name: str) -> float | None:
        return self.values[name]

    def __getattr__(self, name: str):  # only reached when no field has that name: the registry's features
        values = self.__dict__.get("values")
        if values is not None and name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def from_dict(cls, d: dict) -> BlockRecord:
        rest = {k: v for k, v in d.items() if k not in FEATURE_NAMES}
        router = d.get("router")
        return super().from_dict(rest, values={name: d[name] for name in FEATURE_NAMES},
                                 router=None if router is None else RouterStats.from_dict(router))

    def to_dict(self) -> dict:
        tail = super().to_dict(router=None if self.router is None else self.router.to_dict())
        # index, values, m, rank, ...: the features go where values is
        del tail["index"], tail["values"]
        return {"index": self.index, **self.values, **tail}


@dataclass(frozen=True, kw_only=True)
class EnvironmentRecord(_Record):
    """The software and device an audit ran with."""

    hf_rksp: str
    torch: str
    transformers: str
    numpy: str | None = None
    python: str | None = None
    platform: str | None = None
    device: str


@dataclass(frozen=True, kw_only=True)
class RiskEntry(_Record):
    """The calibrated risk model's reading of an audit (filled by ``hf_rksp.pipeline.risk``)."""

    probability: float  # P(divergence)
    band: str  # low | medium | high
    lr: float  # the learning rate it was assessed at
    lr_source: str  # "given", or the family default it came from
    lr_ceiling: float | None  # the largest lr with P below lr_ceiling_probability; None: P does not grow with lr
    lr_ceiling_probability: float
    in_range: bool  # False: some input is outside what the model was fitted on (see warnings)
    warnings: list[str]
    model: dict | None = None  # the risk model's provenance: sweep_data_sha256, n_runs, features, cv_auroc...

    _NULLABLE = ("lr_ceiling",)


@dataclass(frozen=True, kw_only=True)
class MonitorAlarm(_Record):
    """The monitor's early warning: the first profiled step where one block's whitened spectral radius passed
    the early-warning rule (``hf_rksp.training.monitor.EarlyWarning``)."""

    step: int  # the optimizer step whose weights were profiled
    block: int  # the block's index in the model's block list
    spectral_radius: float  # that block's whitened DMD spectral radius at ``step``
    baseline: float  # ... and at train begin
    statistic: float  # what the rule compared with its threshold (a ratio, or the radius itself)
    rule: str  # "ratio" | "jump" | "absolute"
    threshold: float


@dataclass(frozen=True, kw_only=True)
class PreflightResult(_Record):
    """A pre-flight check of a planned training run (filled by ``hf_rksp.pipeline.preflight``).

    ``probability`` is None, with ``unavailable_reason``, where no model with a held-out AUROC of at least
    0.8 covers these settings.
    """

    probability: float | None  # P(the planned run diverges)
    band: str | None  # low | medium | high
    unavailable_reason: str | None
    lr: float  # the planned peak learning rate
    lr_ceiling: float | None  # the lr where P reaches lr_ceiling_probability, the probe's features held
    lr_ceiling_probability: float | None
    driving_blocks: list[int]  # the block(s) whose whitened spectral radius grew most over the probe
    rho_before: list[float]  # per block, whitened DMD spectral radius before the probe
    rho_after: list[float]  # ... and after it (empty when the probe ran away)
    features: dict[str, float]
    probe_steps: int
    probe_seconds: float
    probe_fraction: float  # probe_steps / total_steps
    probe_diverged: bool  # a non-finite loss or gradient stopped the probe
    settings: dict  # the planned run, as given
    warnings: list[str]
    model: dict | None = None  # the fitted model's provenance and held-out figures (heldout_auroc, ...)

    _NULLABLE = ("probability", "band", "unavailable_reason", "lr_ceiling", "lr_ceiling_probability", "model")


@dataclass(frozen=True, kw_only=True)
class AuditRecord(_Record):
    """One RKSP audit: the typed form of audit.json (schema 2.0).

    ``risk`` is a calibrated model's reading (a ``RiskEntry``) or None with
    ``risk_unavailable_reason``; ``timings`` maps step names to seconds.
    """

    schema_version: str = SCHEMA_VERSION
    slug: str
    created: str  # ISO 8601, UTC
    command: str  # the `hf-rksp audit` command that reproduces it
    method: MethodRecord
    source: SourceRecord
    inputs: InputsRecord
    blocks: list[BlockRecord]
    summary: SummaryRecord
    risk: RiskEntry | None = None
    environment: EnvironmentRecord
    timings: dict[str, float]
    risk_unavailable_reason: str | None = None

    _NULLABLE = ("risk",)

    @classmethod
    def from_dict(cls, d: dict, *, validate: bool = True, origin: str = "this audit") -> AuditRecord:
        """The record of an audit JSON object, after checking its method version and the schema."""
        if validate:
            check_method_version(d, origin)
            validate_audit(d)
            check_consistency(d)
        return super().from_dict(
            d, method=MethodRecord.from_dict(d["method"]), source=SourceRecord.from_dict(d["source"]),
            inputs=InputsRecord.from_dict(d["inputs"]), blocks=[BlockRecord.from_dict(b) for b in d["blocks"]],
            summary=SummaryRecord.from_dict(d["summary"]), environment=EnvironmentRecord.from_dict(d["environment"]),
            risk=None if d.get("risk") is None else RiskEntry.from_dict(d["risk"]))

    def to_dict(self) -> dict:
        """The audit as a JSON-ready dict (it shares the record's lists: copy before changing it)."""
        return super().to_dict(method=self.method.to_dict(), source=self.source.to_dict(),
                               inputs=self.inputs.to_dict(), blocks=[b.to_dict() for b in self.blocks],
                               summary=self.summary.to_dict(), environment=self.environment.to_dict(),
                               risk=None if self.risk is None else self.risk.to_dict())

    @classmethod
    def from_json(cls, text: str, origin: str = "this audit") -> AuditRecord:
        """The record of an audit's JSON text; rejects NaN/Infinity, other method versions, schema violations."""
        try:
            data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit integer, 200k-deep nesting
            raise AuditFileError(f"{origin} is not a valid JSON audit: {str(e)[:200]}") from None
        if not isinstance(data, dict):
            raise AuditFileError(f"{origin} is not an audit (a JSON object)")
        return cls.from_dict(data, origin=origin)

    def to_json(self) -> str:
        """The audit.json text, byte for byte; refuses NaN/Infinity rather than writing invalid JSON."""
        try:
            return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        except (ValueError, RecursionError) as e:
            raise AuditFileError(f"audit {self.slug} holds a value JSON does not allow: {e}") from None

    def validate(self) -> None:
        """Raise AuditFileError naming the first violation of the schema."""
        validate_audit(self.to_dict())

    def table_rows(self) -> list[dict]:
        """One dict per block, in block order: ``block``, every registry feature (None where a value is None),
        ``m``, ``rank``, ``flags`` (comma-separated) and, for multi-stack models, ``stack``/``stack_index``: the
        rows of :meth:`to_pandas` and :meth:`to_csv`."""
        rows = []
        for b in self.blocks:
            row = {"block": b.index, **b.values, "m": b.m, "rank": b.rank, "flags": ",".join(b.flags)}
            if b.stack is not None:
                row.update(stack=b.stack, stack_index=b.stack_index)
            rows.append(row)
        return rows

    def to_pandas(self):
        """One row per block, indexed by block: every registry feature (NaN where a value is None), then
        ``m``, ``rank``, ``flags`` (comma-separated) and, for multi-stack models, ``stack``/``stack_index``.
        Needs pandas (an optional dependency)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("AuditRecord.to_pandas() needs pandas, which hf-rksp does not install: "
                              "pip install pandas; AuditRecord.to_csv() needs nothing") from None
        rows = [{k: (float("nan") if v is None and k in FEATURE_NAMES else v) for k, v in r.items()}
                for r in self.table_rows()]
        return pd.DataFrame(rows).set_index("block")

    def to_csv(self, path_or_buf=None) -> str | None:
        """The rows of :meth:`to_pandas` as CSV (``block`` first; an empty cell where a value is None; floats
        written exactly): the text when ``path_or_buf`` is None, else written to that path or text buffer.
        Needs no pandas (the csv module)."""
        from hf_rksp.utils.atomic import write_csv

        rows = self.table_rows()
        header = list(dict.fromkeys(k for r in rows for k in r))  # stack columns only where a block has them
        return write_csv(header, [[r.get(k) for k in header] for r in rows], path_or_buf)


def _finite_float(text: str) -> float:
    """A JSON number as a float; 1e400 would read as infinity, which JSON does not allow either."""
    x = float(text)
    if not math.isfinite(x):
        raise AuditFileError(f"audit JSON holds {text[:40]}, which is beyond float range (read as infinity)")
    return x


def _reject_constant(name: str):
    raise AuditFileError(f"audit JSON holds {name}, which JSON does not allow")


def read_audit(path: str | Path) -> AuditRecord:
    """The validated audit at ``path`` (a file, or a directory holding audit.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "audit.json"
    if not p.is_file():
        raise AuditFileError(f"audit file not found: {p}")
    size = p.stat().st_size
    if size > MAX_BYTES:
        raise AuditFileError(f"{p} is {size} bytes, more than an audit file may be ({MAX_BYTES} bytes, 64 MiB): "
                             "refused before reading it")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AuditFileError(f"{p} is not a valid UTF-8 JSON audit: {str(e)[:200]}") from None
    return AuditRecord.from_json(text, origin=str(p))
