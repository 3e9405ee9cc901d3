"""Small GGUF files written with the gguf package's own GGUFWriter, for the de-quantization and streaming tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter, quantize

#: types gguf-py can quantize itself; the K-quants it only decodes, so their blocks are written raw
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
F16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # byte offsets of the float16 scales per block


def quantized(values: np.ndarray, qtype: Q) -> np.ndarray:
    """``values`` (float32, rows of a multiple of 256) in ``qtype``'s bytes."""
    if qtype in QUANTIZABLE:
        return quantize(values, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(values.size // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:  # random bits would make NaN/inf scales: put small finite ones there
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(*values.shape[:-1], values.shape[-1] // block * size)


def write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama") -> Path:
    """A GGUF file holding ``tensors`` (name -> (float32 values, quant type)), with no other metadata."""
    w = GGUFWriter(str(path), arch)
    for name, (values, qtype) in tensors.items():
        data = quantized(values.astype(np.float32), qtype)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def every_type(path: Path, rows: int = 6, cols: int = 512, seed: int = 0) -> Path:
    """One (rows x cols) tensor per supported quant type, named after it."""
    rng = np.random.default_rng(seed)
    return write_tensors(path, {t.name: (rng.normal(0, 0.02, (rows, cols)), t) for t in QUANTIZABLE + K_QUANTS})
