"""A GGUF file read as a checkpoint: memory-mapped once, each tensor de-quantized by name when asked for.

The names and the layout fixes are transformers' own: ``get_gguf_hf_weights_map``
maps GGUF names (``blk.3.attn_q.weight``) to the model's, and the
architecture's ``TensorProcessor`` undoes what llama.cpp's converter did (the
Llama Q/K row permutation, GPT-2's transposes, Gemma's norm offset).  Only the
de-quantization is ours (:mod:`hf_rksp.dequant`, torch, cast early), so whole
loads and streamed blocks get exactly transformers' weights at a fraction of
the time and memory.
"""

from __future__ import annotations

import copy
import mmap
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from gguf import (  # bound here: shared_reader() swaps gguf's attributes
    GGUFReader,
    get_tensor_name_map,
)

from hf_rksp.errors import SourceError
from hf_rksp.models.checkpoints.dequant import dequantize
from hf_rksp.utils.threads import torch_threads

_READERS: dict[tuple, object] = {}
_SWAP = threading.RLock()  # shared_reader swaps module attributes: one thread at a time
_METADATA: dict = {}


def open_reader(path: str | Path):
    """gguf's ``GGUFReader`` of ``path`` (memory-mapped), parsed once per file version.

    Parsing the metadata is the slow part (3.5 s for SmolLM2's 49k-token
    vocabulary on a 2-core EPYC), so config, tokenizer and weights share it.
    """
    key = _file_key(path)
    if key not in _READERS:
        _READERS.clear()  # one file at a time: the old reader's memory map is released
        _READERS[key] = _parse(Path(key[0]))
    return _READERS[key]


def _file_key(path: str | Path) -> tuple:
    """A file's identity and version: its resolved path, mtime and size."""
    p = Path(path).resolve()
    st = p.stat()
    return str(p), st.st_mtime_ns, st.st_size


def _parse(path: Path):
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors... on damaged files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "GGMLQuantizationType" in msg:
            raise SourceError(f"{path.name} uses an unknown GGML quantization type ({msg}); "
                              "it may come from a newer llama.cpp than the installed gguf package reads") from e
        if "magic" in msg:
            raise SourceError(f"{path.name} is not a GGUF file (bad magic number)") from e
        raise SourceError(f"{path.name} is not a readable GGUF file (truncated or corrupt: {msg})") from e


@contextmanager
def shared_reader():
    """Within this block transformers' GGUF config and tokenizer readers get :func:`open_reader`'s parse.

    transformers builds a fresh ``gguf.GGUFReader`` in every ``from_pretrained``
    (config, tokenizer, weights), re-parsing the whole metadata each time; it
    imports the class from ``gguf`` when called, so swapping the attribute
    for the duration of the call is enough.  Likewise ``get_gguf_hf_weights_map``
    rebuilds gguf's ``TensorNameMap`` for each of the model's ~400 modules
    (5 s for SmolLM2); the map is a pure function of (architecture, blocks), so
    it is built once.

    This swaps three attributes of other libraries' modules for the length of the block: the one place the
    package does so (read transformers 5.x's GGUF loader, hence the ``transformers<6`` bound), restored on
    exit, serialized by a lock, and tested against transformers' own loader (tests/test_gguf.py).
    """
    import gguf
    from transformers import modeling_gguf_pytorch_utils as tg

    def reader(path, mode="r"):
        return open_reader(path) if mode == "r" else GGUFReader(path, mode)

    def metadata_once(path, return_tensors=False, **kwargs):
        """The config/tokenizer dict of a file (1.8 s of field decoding for SmolLM2), decoded once."""
        if return_tensors:
            return real_checkpoint(path, return_tensors=return_tensors, **kwargs)
        key = _file_key(path)
        if _METADATA.get("key") != key:
            _METADATA.update(key=key, value=real_checkpoint(path, return_tensors=False))
        return copy.deepcopy(_METADATA["value"])

    with _SWAP:
        real_checkpoint = tg.load_gguf_checkpoint  # read under the lock: never another thread's swap
        gguf.GGUFReader, gguf.get_tensor_name_map, tg.load_gguf_checkpoint = reader, _name_map, metadata_once
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map, tg.load_gguf_checkpoint = (GGUFReader, get_tensor_name_map,
                                                                                  real_checkpoint)


@lru_cache(maxsize=8)
def _name_map(arch, n_blocks: int):
    return get_tensor_name_map(arch, n_blocks)


def architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file."""
    from transformers.modeling_gguf_pytorch_utils import read_field

    value = read_field(open_reader(path), "general.architecture")
    if not value:
        raise SourceError(f"{Path(path).name} has no general.architecture: not a model GGUF")
    return value[0]


def _processor_kinds():
    """transformers' tensor processors, by what they need: reshapes only, torch arithmetic, or numpy."""
    from transformers import modeling_gguf_pytorch_utils as g

    reshape_only = (g.TensorProcessor, g.LlamaTensorProcessor, g.GPT2TensorProcessor)
    torch_safe = reshape_only + (g.Gemma2TensorProcessor, g.NemotronTensorProcessor)
    merging = tuple(getattr(g, n) for n in ("Qwen2MoeTensorProcessor", "GptOssTensorProcessor",
                                            "MiniMaxM2TensorProcessor") if hasattr(g, n))
    return reshape_only, torch_safe, merging


class GGUFCheckpoint:
    """``files``: the base model's parameter names -> the GGUF tensors holding them; ``read`` de-quantizes.

    ``model`` may be on the meta device: only its names and config are used.
    Architectures whose processor merges many GGUF tensors into one parameter
    (MoE experts) are refused: they are not one tensor per parameter.
    """

    def __init__(self, path: str | Path, model, dtype: torch.dtype = torch.float32):
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path, self.dtype = Path(path), dtype
        reader = open_reader(path)
        arch = architecture(path)
        cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        self.reshape_only, self.torch_safe, merging = _processor_kinds()
        if issubclass(cls, merging):
            raise SourceError(f"{self.path.name}: GGUF architecture {arch!r} merges expert tensors on load; "
                              "hf-rksp cannot read it tensor by tensor")
        self.processor = cls(config=model.config.to_dict())
        try:
            with shared_reader():
                mapping = get_gguf_hf_weights_map(model, self.processor)
        except NotImplementedError as e:
            raise SourceError(f"{self.path.name}: {str(e).splitlines()[0]}") from None
        by_name = {t.name: t for t in reader.tensors}
        self.files = {hf: by_name[g] for g, hf in mapping.items() if g in by_name}
        self._mmap = getattr(reader.data, "_mmap", None)  # numpy's memmap keeps its mmap.mmap here
        self.shapes: dict[str, tuple[int, ...]] = {}  # known only after the processor's reshapes: checked on read

    def expect(self, keys) -> None:
        """Nothing to plan: the file stays mapped."""

    def progress(self) -> dict[str, str]:
        return {}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named parameters, de-quantized, in transformers' layout, in ``dtype``."""
        # one thread: the byte shuffling is memory-bound, and on a 2-core EPYC shared with one busy process
        # 2 threads took 12.2 s to de-quantize SmolLM2 against 0.34 s on one
        with torch_threads(1):
            return {n: self._tensor(n) for n in names}

    def _tensor(self, name: str) -> torch.Tensor:
        t = self.files[name]
        exact = isinstance(self.processor, self.reshape_only)  # no arithmetic after decoding: cast at once
        w = dequantize(t.data, t.tensor_type, self.dtype if exact else torch.float32, name=t.name)
        self._release(t)
        if isinstance(self.processor, self.torch_safe):
            w = self.processor.process(weights=w, name=t.name, parsed_parameters={"tensors": {}}).weights
        else:  # processors written against numpy (np.log, np.expand_dims, np.stack)
            out = self.processor.process(weights=w.numpy(), name=t.name, parsed_parameters={"tensors": {}})
            w = torch.from_numpy(np.ascontiguousarray(out.weights))
        return w.to(self.dtype).contiguous()

    def _release(self, t) -> None:
        """Drop a decoded tensor's file pages from this process's resident set (MADV_DONTNEED on the
        read-only mapping: they are read from disk again if ever needed).  Without it every page the
        audit touched stays resident, so a streamed audit's peak RSS grows by the whole file."""
        if self._mmap is None or not hasattr(self._mmap, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED, lo, t.data_offset + t.n_bytes - lo)
        except (OSError, ValueError):  # an advice the platform refuses changes nothing but memory
            pass

    def state_dict(self, names: list[str]) -> dict[str, torch.Tensor]:
        """All of ``names``, failing on the first one the file lacks."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise SourceError(f"{self.path.name} has no tensor for {missing[0]} (and {len(missing) - 1} more)")
        return self.read(names)


def per_tensor(path: str | Path) -> bool:
    """Whether :class:`GGUFCheckpoint` reads this file (every architecture but merged MoE experts)."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
    )

    return not issubclass(TENSOR_PROCESSORS.get(architecture(path), TensorProcessor), _processor_kinds()[2])
