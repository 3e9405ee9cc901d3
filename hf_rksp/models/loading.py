"""Loading: turn a source (hub id, local dir, GGUF file, config) into a base model.

Only the base model (no LM head) is built: RKSP needs the residual blocks, and
the head would cost time and memory for nothing.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from hf_rksp.errors import ConfigError, RKSPError, SourceError, TokenizerError
from hf_rksp.models.blocks import BLOCK_PATHS, find_blocks, supported_families
from hf_rksp.models.checkpoints.gguf import (
    GGUFCheckpoint,
    open_reader,
    per_tensor,
    shared_reader,
)
from hf_rksp.models.checkpoints.hub import HubCheckpoint, fetch_gguf
from hf_rksp.models.config import check_config
from hf_rksp.models.init import seeded_init
from hf_rksp.models.memory import ModelSizes, plan_memory
from hf_rksp.models.weights import build_meta_model
from hf_rksp.utils.hub_errors import hub_error
from hf_rksp.utils.hub_errors import offline as _offline

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class Source:
    """Where a model comes from, resolved before anything heavy is loaded."""

    id: str  # what the user named (hub id, path, or config name)
    kind: str  # "hub", "dir", "gguf", "config"
    init: bool
    path: str | None = None  # local directory or file
    gguf_file: str | None = None
    config_origin: str | None = None  # where the config came from, for --init
    revision: str | None = None
    name: str | None = None  # --name: the hub id a local copy stands for (slug, card, base_model)

    @property
    def gguf_path(self) -> Path | None:
        """The local .gguf file, once known."""
        return Path(self.path) / self.gguf_file if self.path and self.gguf_file else None

    @property
    def display_id(self) -> str:
        return self.name or self.id

    @property
    def slug(self) -> str:
        if self.name:
            base = self.name.replace("/", "__")
        elif self.kind == "hub":
            base = self.id.replace("/", "__")
        else:
            base = Path(os.path.abspath(Path(self.id).expanduser())).name  # "." and "./x/" name their folder
            if self.kind in ("gguf", "config") and base.endswith((".gguf", ".json")):
                base = base.rsplit(".", 1)[0]
        return base + ("__init" if self.init else "")


@dataclass
class LoadedModel:
    """A model ready to audit: the module, its config and tokenizer, where it came from, and what the audit records.

    A streamed model (``load_for_streaming``) is on the meta device: its weights come block by block
    from ``checkpoint`` (a safetensors directory or a GGUFCheckpoint; None at init) in ``dtype``.
    """

    model: nn.Module
    config: object
    tokenizer: object | None
    source: Source
    family: str  # the config's model_type
    model_class: str  # the class of ``model``
    n_params: int
    checkpoint: object = None  # streamed only: a safetensors directory or a GGUFCheckpoint; None at init
    dtype: torch.dtype | None = None  # streamed only: the dtype the blocks are built in
    streamed: bool = False


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown `dtype` {name!r}; choose from {', '.join(sorted(DTYPES))}", param="dtype") from None


def shipped_config_names() -> dict[str, str]:
    """Alias -> file of the configs that ship with the package (famous checkpoints)."""
    index = resources.files("hf_rksp").joinpath("configs/index.json")
    return json.loads(index.read_text(encoding="utf-8"))


def shipped_config(name: str) -> dict | None:
    fname = shipped_config_names().get(name)
    if fname is None:
        return None
    return json.loads(resources.files("hf_rksp").joinpath(f"configs/{fname}").read_text(encoding="utf-8"))


def _check_stat(p: Path, given: str, param: str) -> None:
    """A path the file system refuses to look up (a name too long, a loop of links, no permission) as a
    SourceError naming ``param``; an absent path passes (a hub id, or the caller's own message)."""
    try:
        p.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:
        shown = given if len(given) <= 160 else f"{given[:80]}...{given[-80:]} ({len(given)} characters)"
        raise SourceError(f"`{param}` {shown}: {e.strerror or e}") from None


def resolve_source(
    source: str | None, *, init: bool = False, config_path: str | None = None, revision: str | None = None,
    gguf_file: str | None = None,
) -> Source:
    """Decide what kind of source the user named, failing early with a clear message.

    ``org/repo/file.gguf`` or a hub id with ``gguf_file`` downloads that one GGUF file.
    """
    if config_path is not None:
        p = Path(config_path).expanduser()
        _check_stat(p, config_path, "config")
        if not p.is_file():
            raise SourceError(f"config file not found: {config_path}")
        return Source(id=source or str(p), kind="config", init=True, path=str(p), config_origin=str(p))
    if not source:
        raise SourceError("name a model (hub id, local directory or .gguf file) or pass `config`")
    p = Path(source).expanduser()
    _check_stat(p, source, "source")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise SourceError(f"{source} is a file but not a .gguf model; pass a checkpoint directory, a .gguf file "
                              "or a hub id")
        return Source(id=source, kind="gguf", init=init, path=str(p.parent), gguf_file=p.name)
    if p.is_dir() and gguf_file:
        if not (p / gguf_file).is_file():
            raise SourceError(f"no GGUF file {gguf_file} in {source}")
        return Source(id=source, kind="gguf", init=init, path=str(p), gguf_file=gguf_file)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return Source(id=source, kind="gguf", init=init, path=str(p), gguf_file=ggufs[0].name)
            raise SourceError(f"directory {source} has no config.json (not a Hugging Face checkpoint)")
        return Source(id=source, kind="dir", init=init, path=str(p))
    if not source.startswith((".", "/", "~")) and source.endswith(".gguf") and source.count("/") >= 2:
        repo_id, _, gguf_file = source.partition("/")[2].partition("/")  # org/repo/file.gguf
        return _hub_gguf(source, source.split("/")[0] + "/" + repo_id, gguf_file, init, revision)
    if source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") > 1:
        raise SourceError(f"no such file or directory: {source}")
    if gguf_file:
        return _hub_gguf(source, source, gguf_file, init, revision)
    return Source(id=source, kind="hub", init=init, revision=revision)


def _hub_gguf(given: str, repo_id: str, gguf_file: str, init: bool, revision: str | None) -> Source:
    """A GGUF file of a hub repo: that one file is fetched, then it is a local GGUF source."""
    path = fetch_gguf(repo_id, gguf_file, revision, local_only=_offline())
    return Source(id=given, kind="gguf", init=init, path=str(path.parent), gguf_file=path.name, revision=revision)


def _config_from_dict(d: dict, origin: str, trust_remote_code: bool, any_family: bool = False):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise SourceError(f"config {origin} has no 'model_type'")
    if not any_family:
        check_family(model_type, origin)
    try:
        config = AutoConfig.for_model(model_type, **d)
    except Exception as e:
        raise SourceError(f"invalid config {origin}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    check_config(config, origin)
    return config


def check_family(model_type: str | None, origin: str) -> None:
    if model_type not in BLOCK_PATHS:
        raise SourceError(
            f"unsupported model family {model_type!r} ({origin}); supported: {', '.join(supported_families())}; "
            "point at the block list with `blocks` (e.g. `blocks` model.layers)"
        )


def load_config(source: Source, trust_remote_code: bool = False, any_family: bool = False):
    """The model config for ``source``, without weights."""
    from transformers import AutoConfig

    if source.kind == "config":
        try:
            d = json.loads(Path(source.path).read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, 100k-deep nesting
            raise SourceError(f"config file {source.path} is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(d, dict):
            raise SourceError(f"config file {source.path} is not a JSON object")
        return _config_from_dict(d, source.path, trust_remote_code, any_family)
    if source.kind == "hub" and source.init and source.revision is None:
        shipped = shipped_config(source.id)
        if shipped is not None:
            source.config_origin = f"shipped:{shipped_config_names()[source.id]}"
            return _config_from_dict(shipped, source.config_origin, trust_remote_code, any_family)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    try:
        if source.kind == "gguf":
            with shared_reader():
                cfg = AutoConfig.from_pretrained(source.path, **kwargs)
        elif source.kind == "hub":
            try:
                cfg = AutoConfig.from_pretrained(source.id, revision=source.revision, local_files_only=True, **kwargs)
            except OSError:
                if _offline():
                    raise
                cfg = AutoConfig.from_pretrained(source.id, revision=source.revision, **kwargs)
        else:
            cfg = AutoConfig.from_pretrained(source.path, **kwargs)
    except RKSPError:
        raise
    except Exception as e:
        if "custom code" in str(e) and not trust_remote_code:  # transformers' ValueError, offline or not
            raise SourceError(f"{source.id} holds custom code (its own model classes, named by its config's "
                              "auto_map): read it, then pass `trust_remote_code` to run it") from e
        if source.kind == "hub":
            raise hub_error(e, repo_id=source.id, action="load", revision=source.revision) from e
        raise SourceError(f"could not read a model config from {source.id}: {str(e).splitlines()[0]}") from e
    source.config_origin = source.config_origin or source.kind
    if not any_family:
        check_family(getattr(cfg, "model_type", None), source.id)
    check_config(cfg, source.id)
    return cfg


def _from_pretrained(auto_cls, source: Source, local_files_only: bool, **kwargs):
    """``auto_cls.from_pretrained`` for a gguf file, a directory, or a hub id."""
    if source.kind == "gguf":
        with shared_reader():
            return auto_cls.from_pretrained(source.path, gguf_file=source.gguf_file, **kwargs)
    if source.kind == "dir":
        return auto_cls.from_pretrained(source.path, **kwargs)
    return auto_cls.from_pretrained(source.id, revision=source.revision, local_files_only=local_files_only, **kwargs)


#: files that hold a tokenizer (or say there is one): any of them present, the model has a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")


def tokenizer_files(source: Source) -> list[str]:
    """The tokenizer files ``source`` has where the audit can see them (the directory, the GGUF file's
    ``tokenizer.ggml.*`` metadata, the HF cache for a hub id); [] when it has no tokenizer."""
    if source.kind == "config":
        return []
    if source.kind == "gguf":
        reader = open_reader(source.gguf_path)
        return ["tokenizer.ggml.tokens"] if "tokenizer.ggml.tokens" in reader.fields else []
    if source.kind == "dir":
        return [f for f in TOKENIZER_FILES if (Path(source.path) / f).is_file()]
    from huggingface_hub import try_to_load_from_cache

    return [f for f in TOKENIZER_FILES
            if isinstance(try_to_load_from_cache(source.id, f, revision=source.revision), str)]


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    """The tokenizer next to the model, or None when the model has none (the audit then runs on seeded
    random token ids, and says so).

    A tokenizer that is there (:func:`tokenizer_files`) but does not load, or loads with no usable
    vocabulary, is a :class:`~hf_rksp.errors.TokenizerError`: never a silent fallback to random ids.
    """
    from transformers import AutoTokenizer

    if source.kind == "config":
        return None
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    try:
        tok = _from_pretrained(AutoTokenizer, source, local_files_only=source.init or _offline(), **kwargs)
    except Exception as e:  # noqa: BLE001  transformers and tokenizers raise many types; the files decide
        _no_tokenizer_or_raise(source, f"cannot be loaded: {(str(e).splitlines() or [type(e).__name__])[0][:300]}")
        return None
    # transformers builds an empty (or specials-only) tokenizer from a directory without vocab files
    ids = tok("The residual stream of a transformer.", add_special_tokens=False)["input_ids"]
    if len(tok) < 256 or not ids or all(i == tok.unk_token_id for i in ids):
        _no_tokenizer_or_raise(source, f"loads with no usable vocabulary ({len(tok)} tokens; a plain sentence "
                                       "reads as unknown or nothing)")
        return None
    return tok


def _no_tokenizer_or_raise(source: Source, why: str) -> None:
    """Return when ``source`` has no tokenizer files at all; else raise TokenizerError saying ``why``."""
    found = tokenizer_files(source)
    if found:
        raise TokenizerError(f"the tokenizer of {source.id} ({', '.join(found)}) {why}; repair or replace it "
                             "(only a model with no tokenizer is calibrated on random token ids)", files=found)


def check_memory(config, dtype: torch.dtype, device: str, trust_remote_code: bool = False) -> None:
    """Fail before building a model that cannot fit in RAM whole (the memory planner, without streaming)."""
    if not str(device).startswith("cpu"):
        return

    plan_memory(ModelSizes.of(config, dtype, trust_remote_code=trust_remote_code), tokens=0, dtype=str(dtype).replace("torch.", ""), stream=False,
                can_stream=False)


def load_model(
    source: Source,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    trust_remote_code: bool = False,
    any_family: bool = False,
    placement: dict | None = None,
    blocks: str | None = None,
) -> LoadedModel:
    """Build the base model: pretrained weights, or random init from the config with ``seed``.

    ``placement`` (device_map, max_memory, offload_folder, quantization_config)
    goes to ``from_pretrained`` as accelerate expects it; then the model stays
    where accelerate put it.
    """
    placement = placement or {}
    from transformers import AutoModel

    torch_dtype = parse_dtype(dtype)
    config = load_config(source, trust_remote_code, any_family)
    try:
        if not placement:
            check_memory(config, torch_dtype, device, trust_remote_code)
    except RKSPError:
        raise
    except Exception as e:  # the config parses but transformers cannot build it
        name = Path(source.config_origin or source.id).name
        raise SourceError(f"invalid config {name}: {str(e).splitlines()[0]}") from e
    tokenizer = load_tokenizer(source, trust_remote_code)
    try:
        if source.init:
            with torch.random.fork_rng(devices=[]):  # seeded, and the caller's global RNG left as it was
                torch.manual_seed(seed)
                model = AutoModel.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
                _seeded_init(model, seed, blocks)
        elif source.kind == "gguf" and not placement and per_tensor(source.gguf_path):
            model = load_gguf_model(source, config, torch_dtype)
        else:
            model = _from_pretrained(AutoModel, source, local_files_only=_offline(), dtype=torch_dtype,
                                     trust_remote_code=trust_remote_code, **placement)
    except RKSPError:
        raise
    except (torch.OutOfMemoryError, MemoryError):
        raise RKSPError(f"out of memory while loading {source.id}; try `dtype` bfloat16") from None
    except Exception as e:
        if source.kind == "hub":
            raise hub_error(e, repo_id=source.id, action="load", revision=source.revision) from e
        raise SourceError(f"could not load weights from {source.id}: {str(e).splitlines()[0]}") from e
    if not placement:
        model.to(device)
    model.eval()
    if source.kind == "hub" and not source.init:
        source.revision = getattr(config, "_commit_hash", None) or source.revision
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=source, family=config.model_type,
                       model_class=type(model).__name__, n_params=int(sum(p.numel() for p in model.parameters())))


def load_gguf_model(source: Source, config, dtype: torch.dtype):
    """The base model of a GGUF file, every tensor de-quantized in torch straight into ``dtype``.

    The same weights as transformers' ``from_pretrained(gguf_file=...)`` (its
    name map and layout fixes; tested equal), without its float32 numpy copy of
    every tensor.
    """
    model = build_meta_model(config, dtype)
    names = [n for n, _ in model.named_parameters()]
    state = GGUFCheckpoint(source.gguf_path, model, dtype).state_dict(names)
    model.load_state_dict(state, strict=False, assign=True)
    return model


def _seeded_init(model, seed: int, blocks_path: str | None) -> None:
    """Group-by-group seeded init (hf_rksp.init_weights), so the streamed --init path gives the same weights.

    ``blocks_path`` is ``--blocks`` for families hf-rksp does not know.
    """
    seeded_init(model, find_blocks(model, blocks_path)[1], seed)


def save_sharded(loaded: LoadedModel, out: str | Path, max_shard_size: str = "2GB") -> Path:
    """Write a whole-loaded model (from GGUF, .bin, ...) as a sharded safetensors checkpoint + index,
    config and tokenizer: the layout streaming reads block by block."""
    from huggingface_hub import save_torch_state_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(loaded.model.state_dict(), out, max_shard_size=max_shard_size)
    cfg = copy.deepcopy(loaded.config)  # the caller's model keeps its own config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a GGUF's: the safetensors hold the de-quantized weights
    cfg.save_pretrained(out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    return out


def checkpoint_dir(source: Source) -> Path:
    """The local directory holding ``source``'s weights (a hub id resolves to its cached snapshot)."""
    if source.kind == "dir":
        return Path(source.path)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source.id, revision=source.revision, local_files_only=_offline(),
                                          allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:
            raise hub_error(e, repo_id=source.id, action="load", revision=source.revision) from e
    raise SourceError(f"`stream` reads safetensors and GGUF checkpoints; a {source.kind} source loads whole "
                    "(drop `stream`)")


def _file_identity(path: Path) -> dict:
    """A weights file as a resume compares it: its name, size and modification time (of the file a link points to)."""
    st = Path(path).resolve().stat()
    return {"file": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def weights_identity(loaded: LoadedModel) -> dict:
    """The identity of the weights a streamed audit reads, for its resume key (``hf_rksp.capture.streaming``).

    A safetensors directory: its config, index and every shard (name, size, mtime); a GGUF file: the same
    of the file; a Hub checkpoint: the repo, the commit its shards are read from (the one its index
    resolved to) and its config's, and its cached index; at init:
    nothing is read.  Progress saved with another identity is not resumed.
    """
    from hf_rksp.models.checkpoints.safetensors import SafetensorsCheckpoint

    src, ckpt = loaded.source, loaded.checkpoint
    if src.init:
        return {"init": True}
    if isinstance(ckpt, GGUFCheckpoint) or src.kind == "gguf":
        return {"gguf": _file_identity(src.gguf_path), "revision": src.revision}
    if isinstance(ckpt, HubCheckpoint):
        return {"hub": ckpt.repo_id, "revision": ckpt.revision, "config_revision": src.revision,
                "index": _file_identity(Path(ckpt.index_path))}
    d = Path(ckpt)
    names = sorted({p.name for p in SafetensorsCheckpoint(d).files.values()}
                   | {n for n in ("config.json", "model.safetensors.index.json") if (d / n).is_file()})
    return {"dir": str(d.resolve()), "revision": src.revision, "files": [_file_identity(d / n) for n in names]}


def load_for_streaming(
    source: Source, *, dtype: str = "float32", trust_remote_code: bool = False, any_family: bool = False,
    low_disk: bool = False,
) -> LoadedModel:
    """Config, tokenizer and the base model on the meta device: no weights are read or created here.

    A sharded hub checkpoint is read shard by shard (:mod:`hf_rksp.hub_stream`;
    ``low_disk``: one shard in the cache at a time); a single-file one is fetched whole.
    """
    torch_dtype = parse_dtype(dtype)
    config = load_config(source, trust_remote_code, any_family)
    ckpt = None
    if source.kind == "hub" and not source.init:
        ckpt = HubCheckpoint.open(source.id, source.revision, low_disk=low_disk, local_only=_offline())
    elif low_disk:
        raise SourceError("`low_disk` deletes the shards of a hub checkpoint as the audit passes them; "
                        f"{source.id} is not a hub checkpoint")
    if ckpt is None and not source.init and source.kind != "gguf":
        ckpt = checkpoint_dir(source)
    tokenizer = load_tokenizer(source, trust_remote_code)
    try:
        model = build_meta_model(config, torch_dtype, trust_remote_code)
    except Exception as e:
        raise SourceError(f"invalid config for {source.id}: {str(e).splitlines()[0]}") from e
    if source.kind == "gguf" and not source.init:
        ckpt = GGUFCheckpoint(source.gguf_path, model, torch_dtype)
    if source.kind == "hub":
        source.revision = getattr(config, "_commit_hash", None) or source.revision
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=source, family=config.model_type,
                       model_class=type(model).__name__, n_params=int(sum(p.numel() for p in model.parameters())),
                       checkpoint=ckpt, dtype=torch_dtype, streamed=True)
