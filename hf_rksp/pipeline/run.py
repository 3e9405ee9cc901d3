"""The RKSP audit: load -> capture -> spectra -> report, as one library call."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from hf_rksp.capture import calibration as cal
from hf_rksp.capture.profile import block_result, profile_model, rksp_config
from hf_rksp.capture.routers import RouterRecorder, find_routers
from hf_rksp.capture.streaming import ResumeState, stream_snapshots_and_profile
from hf_rksp.errors import AuditInterrupted, ConfigError, RKSPError, SourceError
from hf_rksp.models.blocks import find_blocks
from hf_rksp.models.loading import (
    LoadedModel,
    load_for_streaming,
    load_model,
    resolve_source,
    weights_identity,
)
from hf_rksp.models.placement import placement_kwargs, plan_for
from hf_rksp.models.weights import CheckpointWeights, InitWeights
from hf_rksp.pipeline import slugs
from hf_rksp.pipeline.options import COMMAND_OPTIONS, AuditOptions, command_line
from hf_rksp.pipeline.risk import assess_summary
from hf_rksp.pipeline.validation import (
    check_audit_options,
    check_inputs,
    check_output_name,
)
from hf_rksp.publish.local import (
    check_contents,
    check_out_dir,
    check_output_tree,
    interrupted,
    publish,
)
from hf_rksp.record.records import (
    DEGENERATE,
    MAX_BYTES,
    MIN_DISTINCT_TOKENS,
    AuditRecord,
    InputsRecord,
    MethodRecord,
    SourceRecord,
    read_audit,
)
from hf_rksp.record.summary import summarize
from hf_rksp.report import card as report
from hf_rksp.report import plots
from hf_rksp.report.card import render_card
from hf_rksp.spectral import METHOD_VERSION, RKSPConfig
from hf_rksp.utils.threads import torch_threads

logger = logging.getLogger("hf_rksp")
METHOD_NAME = "RKSP"
VISION_FAMILIES = ("vit",)


@dataclass
class AuditResult:
    """An audit: the typed record, and the files written (empty when nothing was)."""

    record: AuditRecord
    paths: dict[str, str] = field(default_factory=dict)
    replaced: bool = False  # the files replaced an earlier audit of the same source, method and inputs

    @property
    def near_unit_mass(self) -> float:
        """The paper's score: the layer-mean near-unit mass M_~1."""
        return self.record.summary.score

    @property
    def data(self) -> dict:
        """The audit as its JSON dict (``record.to_dict()``), e.g. ``data["blocks"][0]["spectral_radius"]``."""
        return self.record.to_dict()


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`device` {name} requested but CUDA is not available on this machine", param="device")
    return name


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def calibration_for(loaded: LoadedModel, opts: AuditOptions) -> cal.Calibration:
    """Pick the calibration input: dataset, text file, embedded text, or random ids at init."""
    tok = loaded.tokenizer
    cfg = loaded.config
    if cfg.model_type in VISION_FAMILIES:
        if opts.dataset or opts.text or opts.prompts:
            raise ConfigError("vision models are calibrated on synthetic images; `text`/`dataset` are for text models",
                              param="text")
        return cal.synthetic_images(opts.tokens, cfg.num_channels, cfg.image_size, cfg.patch_size, opts.seed)
    if opts.prompts is not None:
        if tok is None:
            raise SourceError("`prompts` need a tokenizer, and none is available for this model offline")
        return cal.from_prompts(None if opts.prompts == "shipped" else opts.prompts, tok)
    if opts.dataset or opts.text:
        if tok is None:
            raise SourceError("`text`/`dataset` need a tokenizer, and none is available for this model offline")
        if opts.dataset:
            return cal.from_dataset(
                opts.dataset, opts.split, opts.column, tok, opts.tokens, opts.seq_len, opts.dataset_config
            )
        return cal.from_file(opts.text, tok, opts.tokens, opts.seq_len)
    if tok is not None:
        return cal.from_embedded(tok, opts.tokens, opts.seq_len)
    calib = cal.random_ids(loaded.config.vocab_size, opts.tokens, opts.seq_len, opts.seed)
    if not loaded.source.init:  # a tokenizer that is there but does not load failed in load_tokenizer
        logger.warning("%s has no tokenizer (none of its files): calibrating on seeded random token ids, "
                       "recorded as inputs.origin random-token-ids", loaded.source.id)
        calib.detail["reason"] = "the model has no tokenizer"
    return calib


def check_options(opts: AuditOptions, *, init: bool = False) -> None:
    """Reject options that cannot work, before any heavy work (:mod:`hf_rksp.pipeline.validation`)."""
    check_audit_options(opts, init=init)


def stream_profile(loaded: LoadedModel, input_ids: torch.Tensor, opts: AuditOptions, progress: bool = True,
                   resume_dir: Path | None = None, resume_key: str = ""):
    """profile_model's results for a model streamed block by block (from its checkpoint, or at seeded init)."""
    path, blocks = find_blocks(loaded.model, opts.blocks)
    if "+" in path or input_ids.is_floating_point():
        raise ConfigError("`stream` supports decoder and encoder text models (not encoder-decoder or vision yet)",
                          param="stream")
    device, dtype = _device(opts.device), loaded.dtype
    if loaded.source.init:
        weights = InitWeights(loaded.model, blocks, opts.seed, dtype, device)
    else:
        weights = CheckpointWeights(loaded.model, loaded.checkpoint, dtype, device)
    resume = ResumeState(resume_dir, resume_key, weights_identity(loaded)) if resume_dir is not None else None
    routers = RouterRecorder(find_routers(blocks))

    def profile_block(i, x, y):  # router statistics join each block's record, so they survive a resume
        r = block_result(i, x, y, opts)
        stats = routers.summary().get(i)
        return r if stats is None else replace(r, router=stats)

    try:
        with routers.recording():
            results, timings = stream_snapshots_and_profile(
                loaded.model, blocks, path, weights, input_ids, profile_block,
                batch_size=opts.batch_size, device=device, progress=progress, resume=resume,
            )
    except RKSPError as e:  # the same input fails the same way: its progress is of no use
        if resume is not None and not e.resumable:
            resume.clear()
        raise
    except KeyboardInterrupt:
        kept = resume is not None and (resume.dir / "progress.json").is_file()
        raise AuditInterrupted("interrupted; " + (f"progress kept in {resume.dir}: rerun the same command to resume"
                                                  if kept else "nothing was written")) from None
    if resume is not None:
        resume.clear()
    return results, path, timings


def audit_slug(source, opts: AuditOptions) -> str:
    """The audit's folder name: one rule for every source and option (:mod:`hf_rksp.pipeline.slugs`)."""
    return slugs.audit_slug(source, opts)


def method_record(opts: AuditOptions, calib, config: RKSPConfig, streamed: bool, path: str,
                  init: bool) -> MethodRecord:
    """The method of the audit: every parameter that changes the numbers (``config``: the spectral core's)."""
    return MethodRecord.from_dict({
        "name": METHOD_NAME,
        "version": METHOD_VERSION,
        "rank": "full" if config.rank is None else config.rank,
        "rank_option": str(opts.rank),
        # the sketch is recorded where it acts (rank-r DMD); a full-DMD method reads as it always did
        **{k: v for k, v in config.to_json().items() if k != "rank" and not (k == "sketch" and config.rank is None)},
        "kreiss_of": "A / max(rho, 1)",
        "tokens": opts.tokens,
        "seq_len": calib.seq_len,
        "seed": opts.seed,
        "dtype": opts.dtype,
        "snapshots": (f"forward hooks on base_model.{path}[i] (input and output of each block)"
                      if opts.snapshots == "hooks" else
                      "output_hidden_states: (h_i, h_i+1) from the embeddings to h_L, the last after the final norm")
        + (("; layer-major streaming at seeded init" if init else "; layer-major streaming from the checkpoint")
           if streamed else "")
        + ("; padding positions excluded" if calib.attention_mask is not None else ""),
        "streamed": streamed,
    })


def source_record(loaded: LoadedModel, n_blocks: int) -> SourceRecord:
    """What was audited, and how it was found."""
    src = loaded.source
    local = _is_local(src)
    given = slugs.portable_path(src.id) if local else src.id  # never an absolute local path (it is published)
    origin = src.config_origin if src.kind != "config" else slugs.portable_path(src.config_origin)
    return SourceRecord(id=src.name or given, path=given if src.name and src.kind != "module" else None, kind=src.kind, init=src.init,
                        revision=src.revision, config_origin=origin, gguf_file=src.gguf_file,
                        family=loaded.family, model_class=loaded.model_class, n_blocks=n_blocks,
                        d_model=int(loaded.config.hidden_size), n_params=loaded.n_params)


def _is_local(src) -> bool:
    """A source named by a local path (what the record and the command write relative or as its last part)."""
    return src.kind in ("dir", "config") or (src.kind == "gguf" and slugs.is_local_path(src.id))


def recorded_command(source: str | None, init: bool, config: str | None, opts: AuditOptions, src) -> str:
    """:func:`command_line` with local paths as :func:`hf_rksp.pipeline.slugs.portable_path` writes them."""
    if source is not None and _is_local(src) and not (config and source == config):
        source = slugs.portable_path(source)
    if config is not None:
        same = source == config
        config = slugs.portable_path(config)
        source = config if same else source
    return command_line(source, init, config, opts)


def inputs_record(calib: cal.Calibration) -> InputsRecord:
    return InputsRecord(origin=calib.origin, n_tokens=calib.n_tokens, n_sequences=int(calib.input_ids.shape[0]),
                        seq_len=calib.seq_len, sha256=calib.sha256, distinct_tokens=calib.distinct_tokens,
                        extra=dict(calib.detail))


def audit_model(loaded: LoadedModel, opts: AuditOptions, *, command: str, progress: bool = True,
                resume_root: Path | None = None) -> AuditRecord:
    """The audit record of an already loaded model (calibration, capture, spectra, summary).

    A streamed audit with ``resume_root`` saves its progress after every block
    under ``resume_root/<slug>-<key>`` and resumes from there when rerun.
    """
    check_options(opts)
    return _audit_loaded(loaded, opts, command=command, progress=progress, resume_root=resume_root)


def exact_fit(n_tokens: int, d_model: int, rank: int | None) -> bool:
    """N snapshots in as many dimensions as the operator has: it reproduces them exactly (full DMD with
    N <= d + 1, or rank-r DMD with r >= N - 1)."""
    return n_tokens <= d_model + 1 if rank is None else rank >= n_tokens - 1


def exact_fit_reason(n_tokens: int, d_model: int) -> str:
    return (f"exact fit: N = {n_tokens} calibration tokens <= d + 1 = {d_model + 1}, so every block's operator "
            f"reproduces its snapshots exactly (η_nl ~ 0) and the mass partition measures nothing; use `tokens` "
            f"> {d_model + 1}")


def degeneracies(n_tokens: int, d_model: int, rank: int | None, distinct_tokens: int | None,
                 near_identity: list[int]) -> dict[str, str]:
    """Why an audit's numbers are not a measurement (``record.records.DEGENERATE``, in its order), each with
    its reason in words; empty when they are.  ``few_distinct_tokens``: fewer than ``MIN_DISTINCT_TOKENS``
    distinct token ids while the N tokens repeat them (N tokens all distinct are not "few distinct", however
    small N: that is exact fit's concern); ``near_identity``: any block flagged near-identity."""
    out = {}
    if exact_fit(n_tokens, d_model, rank):
        out["exact_fit"] = exact_fit_reason(n_tokens, d_model)
    if distinct_tokens is not None and distinct_tokens < MIN_DISTINCT_TOKENS and distinct_tokens < n_tokens:
        out["few_distinct_tokens"] = (
            f"few distinct tokens: the N = {n_tokens} calibration tokens hold {distinct_tokens} distinct ids "
            f"(< {MIN_DISTINCT_TOKENS}), so the snapshots repeat a handful of states; calibrate on varied text")
    if near_identity:
        out["near_identity"] = (
            f"near-identity blocks {near_identity}: their operator is the identity (the block changes the "
            "residual stream by < `identity_tol` of its norm), so each adds near-unit mass 1 to M by "
            "construction and its η_nl is undefined")
    return {k: out[k] for k in DEGENERATE if k in out}


def record_degeneracies(record: AuditRecord) -> dict[str, str]:
    """:func:`degeneracies` of an audit, from its own numbers (an audit read back included)."""
    rank = None if record.method.rank == "full" else int(record.method.rank)
    return degeneracies(record.inputs.n_tokens, record.source.d_model, rank, record.inputs.distinct_tokens,
                        record.summary.flagged_blocks.get("near_identity", []))


def with_degeneracies(record: AuditRecord, found: dict[str, str]) -> AuditRecord:
    """The record with ``summary.degenerate`` and, where it is degenerate, no risk and the reasons instead."""
    if not found:
        return record
    return replace(record, summary=replace(record.summary, degenerate=list(found)), risk=None,
                   risk_unavailable_reason="; ".join(found.values()))


def flag_degenerate(record: AuditRecord) -> AuditRecord:
    """An audit read back, with its degenerate flags (and no risk) where its own numbers make it one."""
    found = record_degeneracies(record)
    if not found or record.summary.degenerate == list(found):
        return record
    return with_degeneracies(record, found)


def _audit_loaded(loaded: LoadedModel, opts: AuditOptions, *, command: str, progress: bool,
                  resume_root: Path | None) -> AuditRecord:
    """audit_model, for options already checked (:func:`audit` checks them before loading)."""
    streamed = loaded.streamed
    device = _device(opts.device) if streamed else str(next(loaded.model.parameters()).device)
    d_model = int(loaded.config.hidden_size)
    calib = calibration_for(loaded, opts)
    max_pos = _max_positions(loaded.config)
    if calib.input_name == "input_ids" and max_pos is not None and calib.seq_len > max_pos:
        raise ConfigError(f"`seq_len` {calib.seq_len} exceeds the model's {max_pos} positions", param="seq_len")
    if streamed:
        material = f"{command}\n{loaded.source.path}\n{calib.sha256}\n{replace(opts, overwrite=False)!r}"
        key = hashlib.sha256(material.encode()).hexdigest()
        rdir = resume_root / f"{loaded.source.slug}-{key[:16]}" if resume_root is not None else None
        blocks, path, timings = stream_profile(loaded, calib.input_ids, opts, progress,
                                               resume_dir=rdir, resume_key=key)
    else:
        blocks, path, timings = profile_model(loaded.model, calib.input_ids, opts, device=device,
                                              progress=progress, input_name=calib.input_name,
                                              attention_mask=calib.attention_mask)
    config = rksp_config(opts, calib.n_tokens, d_model)
    if config.rank is None and opts.sketch != "random":  # asked for, but it has nothing to act on: say so
        logger.warning("sketch %r has no effect: this audit uses full DMD (rank %s resolved to full)",
                       opts.sketch, opts.rank)
    method = method_record(opts, calib, config, streamed, path, loaded.source.init)
    summary = summarize(blocks)
    found = degeneracies(calib.n_tokens, d_model, config.rank, calib.distinct_tokens,
                         summary.flagged_blocks.get("near_identity", []))
    if found:  # flagged in the record, the card, on stderr; no risk
        summary = replace(summary, degenerate=list(found))
        risk, risk_reason = None, "; ".join(found.values())
        for reason in found.values():
            logger.warning("degenerate audit: %s", reason)
    else:
        risk, risk_reason = assess_summary(summary, lr=opts.lr, family=loaded.family, d_model=d_model,
                                           n_layers=len(blocks), init=loaded.source.init,
                                           method=method.to_dict())
    record = AuditRecord(
        slug=audit_slug(loaded.source, opts),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command,
        method=method,
        source=source_record(loaded, len(blocks)),
        inputs=inputs_record(calib),
        blocks=blocks,
        summary=summary,
        risk=risk,
        environment=report.environment(device),
        timings=timings,
        risk_unavailable_reason=risk_reason,
    )
    return report.with_verdict(record)


def audit(
    source: str | torch.nn.Module | None = None,
    *,
    tokenizer=None,
    init: bool = False,
    config: str | None = None,
    options: AuditOptions | None = None,
    out_dir: str | None = ".",
    progress: bool = True,
    **kwargs,
) -> AuditResult:
    """Audit a model with RKSP v2 and (unless ``out_dir`` is None) write JSON, plots and card.

    ``source`` is a hub id (from the local cache when offline), a checkpoint
    directory or a .gguf file; ``init=True`` or ``config=PATH`` audits the
    architecture at random init.  Keyword arguments override ``options``.

    ``source`` may also be a transformers model already in memory (an ``nn.Module`` with a ``config``; a
    PEFT model is audited through ``get_base_model()``), calibrated with ``tokenizer`` when given (else
    on seeded random token ids), in the dtype and on the device it is in; it is left in the training
    mode it was in.  Its slug is ``name`` (or its config's ``_name_or_path``) plus ``__in-memory``.
    """
    unknown = sorted(set(kwargs) - {f.name for f in fields(AuditOptions)})
    if unknown:
        raise TypeError(f"audit() got unknown options {unknown}")
    opts = replace(options or AuditOptions(), **kwargs)  # the caller's options are left as they were
    if source is not None and not isinstance(source, (str, os.PathLike, torch.nn.Module)):
        raise ConfigError(f"`source` must be a hub id, a path or a model (nn.Module), got a {type(source).__name__}"
                          + ("; profile (N x d) snapshots with hf_rksp.profile_block"
                             if isinstance(source, torch.Tensor) else ""), param="source")
    if isinstance(source, torch.nn.Module):
        if init or config is not None:
            raise ConfigError("`init`/`config` build a model; a model in memory is audited as it is", param="init")
        if tokenizer is not None and not callable(tokenizer):
            raise ConfigError(f"`tokenizer` must be a transformers tokenizer, got a {type(tokenizer).__name__}",
                              param="tokenizer")
        check_options(opts)
        if out_dir is not None:
            check_out_dir(Path(out_dir))
        with torch_threads(opts.threads):
            return _audit_module(source, tokenizer, opts, out_dir, progress)
    if tokenizer is not None:
        raise ConfigError("`tokenizer` is for a model in memory; a model by name brings its own", param="tokenizer")
    check_options(opts, init=init or config is not None)
    check_inputs(source=source, config=config, out_dir=out_dir)  # no token in what names the audit or its files
    if out_dir is not None:
        check_out_dir(Path(out_dir))
    with torch_threads(opts.threads):
        return _audit(source, init, config, opts, out_dir, progress)


def _audit(source, init: bool, config, opts: AuditOptions, out_dir, progress: bool) -> AuditResult:
    """:func:`audit` for checked options."""
    t0 = time.perf_counter()
    device = _device(opts.device)
    src = replace(resolve_source(source, init=init, config_path=config, revision=opts.revision,
                                 gguf_file=opts.gguf_file), name=opts.name)
    if out_dir is not None:  # the slug is known: checked, and its folders are no links, before any model is loaded
        check_output_name(audit_slug(src, opts))
        check_output_tree(out_dir, audit_slug(src, opts))
    check_hub_reachable(src)
    if opts.low_disk and not opts.stream:
        opts = replace(opts, stream=True)  # --low-disk implies --stream
    plan = plan_for(src, opts)
    if plan is not None and plan.stream and not opts.stream:
        logger.warning("%s would take more than half the available memory: streaming it block by block", src.id)
        opts = replace(opts, stream=True)
    command = recorded_command(source, init, config, opts, src)
    if out_dir is not None:  # another audit in this audit's folder: refused before any work
        slugs.guard_early(out_dir, audit_slug(src, opts), command, opts.overwrite)
    # --device-map disk offloads to a folder of this audit's own, removed however the audit ends
    with tempfile.TemporaryDirectory(prefix="hf-rksp-offload-") if opts.device_map == "disk" else nullcontext() \
            as offload:
        if opts.stream:
            loaded = load_for_streaming(src, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code,
                                        any_family=opts.blocks is not None, low_disk=opts.low_disk)
        else:
            loaded = load_model(src, dtype=opts.dtype, device=device, seed=opts.seed,
                                trust_remote_code=opts.trust_remote_code, any_family=opts.blocks is not None,
                                placement=placement_kwargs(opts, offload), blocks=opts.blocks)
        t_load = time.perf_counter()
        resume_root = Path(out_dir) / "audits" / ".partial" if out_dir is not None else None
        record = _audit_loaded(loaded, opts, command=command, progress=progress, resume_root=resume_root)
    timings = {"load_s": t_load - t0, **record.timings, "total_s": time.perf_counter() - t0}
    result = AuditResult(record=replace(record, timings=timings))
    if out_dir is not None:
        result.paths, result.replaced = write_outputs(result.record, out_dir, overwrite=opts.overwrite,
                                                      report_replaced=True)
    return result


#: seconds the one reachability probe of the Hub may take (huggingface_hub would retry for ~30 s)
HUB_PROBE_TIMEOUT = 5.0


def check_hub_reachable(src) -> None:
    """A hub id, online mode, and no network: fail in seconds with what works offline, rather than after
    huggingface_hub's retries.  One HEAD request for the config (``get_hf_file_metadata``, which does not
    retry); any HTTP answer (404, 401...) means the Hub is reachable and the load words it."""
    from hf_rksp.models.loading import shipped_config
    from hf_rksp.utils.hub_errors import offline

    if src.kind != "hub" or offline() or (src.init and shipped_config(src.id) is not None):
        return
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(src.id, "config.json", revision=src.revision), timeout=HUB_PROBE_TIMEOUT)
    except HfHubHTTPError:
        return
    except Exception as e:  # connection refused, DNS, timeout, proxy: the client's own exception types
        logger.debug("hub probe failed", exc_info=e)
        init = " or `init` (its config ships with hf-rksp)" if shipped_config(src.id) is not None else ""
        raise SourceError(f"cannot reach the Hugging Face Hub for {src.id!r} ({type(e).__name__}); set "
                          f"HF_HUB_OFFLINE=1 to use the local cache{init}") from e


#: torch dtypes as AuditOptions.dtype names them
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}


def in_memory(model: torch.nn.Module, tokenizer, name: str | None) -> LoadedModel:
    """A transformers model already in memory as the LoadedModel the audit reads."""
    from hf_rksp.models.loading import Source

    if callable(getattr(model, "get_base_model", None)):  # a PEFT model: the transformers model it wraps
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if config is None or not isinstance(getattr(config, "hidden_size", None), int):
        raise ConfigError(f"`source` is a {type(model).__name__} without a transformers config (hidden_size): "
                          "audit a transformers model, or profile blocks with hf_rksp.profile_block", param="source")
    params = list(model.parameters())
    if not params:
        raise ConfigError("`source` has no parameters", param="source")
    given = name or getattr(config, "_name_or_path", None) or config.model_type
    if os.path.isabs(given) or os.path.exists(given):
        given = slugs.portable_path(given)  # a local folder it was loaded from: never the absolute path
    return LoadedModel(model=model, config=config, tokenizer=tokenizer,
                       source=Source(id=given, kind="module", init=False, name=name),
                       family=config.model_type, model_class=type(model).__name__,
                       n_params=sum(p.numel() for p in params))


def _audit_module(model: torch.nn.Module, tokenizer, opts: AuditOptions, out_dir, progress: bool) -> AuditResult:
    """:func:`audit` of a model in memory (options checked)."""
    t0 = time.perf_counter()
    loaded = in_memory(model, tokenizer, opts.name)
    dtype = next(loaded.model.parameters()).dtype
    opts = replace(opts, dtype=DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")))
    recorded = {f.name: getattr(opts, f.name) for f in fields(AuditOptions)
                if f.name in COMMAND_OPTIONS and getattr(opts, f.name) != f.default}
    command = "hf_rksp.audit(model" + "".join(f", {k}={v!r}" for k, v in recorded.items()) + \
        f")  # {loaded.model_class} in memory"
    if out_dir is not None:
        slugs.guard_early(out_dir, audit_slug(loaded.source, opts), command, opts.overwrite)
    was_training = loaded.model.training
    try:
        record = _audit_loaded(loaded, opts, command=command, progress=progress, resume_root=None)
    finally:
        loaded.model.train(was_training)
    result = AuditResult(record=replace(record, timings={**record.timings, "total_s": time.perf_counter() - t0}))
    if out_dir is not None:
        result.paths, result.replaced = write_outputs(result.record, out_dir, overwrite=opts.overwrite,
                                                      report_replaced=True)
    return result


def rerender(audit_json: str, out_dir: str = ".", *, overwrite: bool = False) -> AuditResult:
    """Re-render plots and card (and rewrite the JSON) from an existing audit.json; no model needed.

    A token in the file is refused first (the user must learn of it, whatever else is wrong with the file;
    the message names the file, never the value).  Then the slug inside the file is checked against the
    file's own source and method (:func:`hf_rksp.pipeline.slugs.check_slug`), and the folder it names may
    only hold the same audit (same source, method and inputs) unless ``overwrite``.
    """
    result = AuditResult(record=report.with_verdict(flag_degenerate(read_audit(audit_json))))
    for reason in record_degeneracies(result.record).values():  # as an audit says it (stderr, also under -q)
        logger.warning("degenerate audit: %s", reason)
    check_contents(result.record.slug, {"audits": {"audit.json": result.record.to_json().encode("utf-8")}})
    slugs.check_slug(result.record)
    result.paths, result.replaced = write_outputs(result.record, out_dir, overwrite=overwrite,
                                                  report_replaced=True, same_numbers=True)
    return result


def write_outputs(audit: AuditRecord, out_dir: str | Path, *, overwrite: bool = False,
                  report_replaced: bool = False, same_numbers: bool = False):
    """Write audit.json, the plots and the card; all files appear together or not at all.

    Everything is rendered in memory first, then :func:`hf_rksp.publish.local.publish`
    switches the audit and card folders in together (crash-safe), so a
    failure at any point leaves the previous audit and card of this slug untouched.
    An audit of another source, method or inputs in that folder is refused (checked under the
    publish lock) unless ``overwrite``.  Returns the paths written (and, with ``report_replaced``,
    whether they replaced the same audit).
    """
    audit.validate()
    check_output_name(audit.slug)
    text = audit.to_json().encode("utf-8")
    if len(text) > MAX_BYTES:  # written all the same (hours of work), but said: the readers refuse it
        logger.warning("audit.json is %d bytes, more than the %d that --from-audit, compare and push read",
                       len(text), MAX_BYTES)
    spectrum, profile = plots.drawn(plots.spectrum_png, audit), plots.drawn(plots.profile_png, audit)
    card = render_card(audit).encode("utf-8")
    contents = {
        "audits": {"audit.json": text, "spectrum.png": spectrum, "profile.png": profile},
        "model_cards": {"README.md": card, "spectrum.png": spectrum, "profile.png": profile},
    }
    out = Path(out_dir)
    created = [d for d in (out, *out.parents, out / "audits", out / "model_cards") if not d.exists()]
    had_earlier = (out / "audits" / audit.slug).exists()
    replaced = []
    try:
        done = publish(out_dir, audit.slug, contents,
                       check=lambda: replaced.append(slugs.guard(out_dir, audit, overwrite, same_numbers)))
    except KeyboardInterrupt:  # Ctrl-C at any step: the message says exactly what the folder holds now
        raise AuditInterrupted(interrupted(out_dir, audit.slug, contents, had_earlier=had_earlier,
                                           created=created)) from None
    audit_dir, card_dir = done["audits"], done["model_cards"]
    paths = {
        "audit": str(audit_dir / "audit.json"),
        "spectrum": str(audit_dir / "spectrum.png"),
        "profile": str(audit_dir / "profile.png"),
        "card": str(card_dir / "README.md"),
    }
    return (paths, bool(replaced and replaced[0])) if report_replaced else paths

