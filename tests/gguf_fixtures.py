"""Small GGUF files written with the gguf package's own GGUFWriter, for the de-quantization and streaming tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, quantize
from gguf import GGMLQuantizationType as Q

#: types gguf-py can quantize itself; the K-quants it only decodes, so their blocks are written raw
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
F16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # float16 scales per block (others: at 0)


def quantized(values: np.ndarray, qtype: Q) -> np.ndarray:
    """``values`` (float32, rows of a multiple of 256) in ``qtype``'s bytes."""
    if qtype in QUANTIZABLE:
        return quantize(values, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(values.size // block, size), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, (0,)):  # random bits would make NaN/inf scales: put small finite ones there
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(*values.shape[:-1], values.shape[-1] // block * size)


def write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama") -> Path:
    """A GGUF file holding ``tensors`` (name -> (float32 values, quant type)), with no other metadata."""
    w = GGUFWriter(str(path), arch)
    for name, (values, qtype) in tensors.items():
        _add(w, name, values, qtype)
    return _finish(w, path)


def _add(w: GGUFWriter, name: str, values: np.ndarray, qtype: Q) -> None:
    data = quantized(values.astype(np.float32), qtype)
    if qtype in (Q.F32, Q.F16):
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


def _finish(w: GGUFWriter, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def every_type(path: Path, rows: int = 6, cols: int = 512, seed: int = 0) -> Path:
    """One (rows x cols) tensor per supported quant type, named after it."""
    rng = np.random.default_rng(seed)
    return write_tensors(path, {t.name: (rng.normal(0, 0.02, (rows, cols)), t) for t in QUANTIZABLE + K_QUANTS})


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (transformers' loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama_gguf(path: Path, model, qtype: Q = Q.Q8_0, arch: str = "llama") -> Path:
    """``model`` (a tiny transformers LlamaModel) written as llama.cpp would: GGUF names, permuted Q/K rows,
    2-D weights in ``qtype``, norms in F32, and the metadata transformers builds a config from."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    cfg = model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for hf_name, p in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        values = p.detach().float().numpy()
        if base.endswith("q_proj"):
            values = _llama_cpp_permute(values, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            values = _llama_cpp_permute(values, cfg.num_key_value_heads)
        _add(w, f"{names.get_name(base)}.{suffix}", values, qtype if values.ndim == 2 else Q.F32)
    return _finish(w, path)
