"""De-quantize GGUF tensors in torch, one tensor at a time, straight into the requested dtype.

Why not ``gguf.dequantize``: its numpy path builds several float32 temporaries
of the whole tensor and is single-threaded; here each tensor is decoded in
chunks of about ``CHUNK_ELEMENTS`` values and written into an output already in
``--dtype``, so a 7B model's largest tensor costs one output plus one small
chunk.  The block layouts and the arithmetic mirror gguf-py's ``quants.py``
operation for operation (same float32 products and sums, in the same order),
so the float32 results are bit-for-bit equal to ``gguf.dequantize`` (tested).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from hf_rksp.errors import SourceError

QK_K = 256
CHUNK_ELEMENTS = 1 << 22  # values decoded per step: 16 MiB of float32 temporaries


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row -> their float16 value as float32, shape (n, 1)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Split (n, groups*width) bytes into 4-bit values: per group, the low nibbles then the high ones."""
    q = qs.reshape(qs.shape[0], groups, 1, width) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(qs.shape[0], -1)


def _bits(qh: torch.Tensor, shifts: list[int], mask: int, width: int) -> torch.Tensor:
    """Spread packed high bits: each shift of each ``width``-byte group gives ``width`` values."""
    n = qh.shape[0]
    q = qh.reshape(n, -1, 1, width) >> torch.tensor(shifts, dtype=torch.uint8).reshape(1, 1, -1, 1)
    return (q & mask).reshape(n, -1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 1, 16).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 1, 16).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The 5-bit values of Q5_0 / Q5_1 (``offset`` = bytes of scales before the 4 high-bit bytes)."""
    high = b[:, offset:offset + 4].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)
    qh = (high & 1).reshape(-1, 32)  # bit i of the little-endian uint32 -> value i
    return _nibbles(b[:, offset + 4:], 1, 16) | (qh << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_q5(b, 2).to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _q5(b, 4).float() + _f16(b[:, 2:4])


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d * scale * q - dmin * min over 8 sub-blocks of 32 (Q4_K, Q5_K)."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    return (d * q.reshape(n, -1, 32).float() - dm).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_affine(b, _nibbles(b[:, 16:], 4, 32))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    ql = _nibbles(b[:, 48:], 4, 32)
    qh = _bits(b[:, 16:48], list(range(8)), 1, 32)
    return _k_affine(b, ql | (qh << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    ql = _nibbles(b[:, :128], 2, 64)
    qh = _bits(b[:, 128:192], [0, 2, 4, 6], 3, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, QK_K // 16, -1).float()).reshape(n, QK_K)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


#: quant type -> decoder of (n_blocks, type_size) uint8 rows into (n_blocks, block_size) float32
DECODERS = {Q.BF16: _bf16, Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
            Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
SUPPORTED = ("F32", "F16", *(t.name for t in DECODERS))


def _as_torch(data: np.ndarray) -> torch.Tensor:
    """A torch view of a (read-only, memory-mapped) numpy array: nothing is copied or written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read it
        return torch.from_numpy(np.ascontiguousarray(data))


def dequantize(data: np.ndarray, qtype, dtype: torch.dtype = torch.float32, name: str = "tensor") -> torch.Tensor:
    """One GGUF tensor (``ReaderTensor.data``, numpy row-major shape) as a new torch tensor of ``dtype``.

    Raises SourceError naming the quant type when it is not one hf-rksp decodes.
    """
    qtype = Q(qtype)
    if qtype in (Q.F32, Q.F16):
        return _as_torch(data).to(dtype, copy=True)
    decode = DECODERS.get(qtype)
    if decode is None:
        raise SourceError(f"GGUF tensor {name} is quantized as {qtype.name}, which hf-rksp cannot de-quantize "
                          f"(supported: {', '.join(SUPPORTED)})")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = (*data.shape[:-1], data.shape[-1] // type_size * block_size)
    blocks = _as_torch(data).reshape(-1, type_size)
    out = torch.empty(blocks.shape[0] * block_size, dtype=dtype)
    step = max(1, CHUNK_ELEMENTS // block_size)
    for s in range(0, blocks.shape[0], step):
        chunk = blocks[s:s + step]
        out[s * block_size:(s + chunk.shape[0]) * block_size] = decode(chunk).reshape(-1)
    return out.reshape(shape)
