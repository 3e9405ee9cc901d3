"""GGUF: torch de-quantization, the fast whole-model loader, streaming, and bad GGUF input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader, dequantize as gguf_dequantize
from gguf_fixtures import K_QUANTS, QUANTIZABLE, every_type, write_tensors

from hf_rksp import dequant
from hf_rksp.errors import SourceError


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory):
    return every_type(tmp_path_factory.mktemp("gguf") / "types.gguf")


@pytest.mark.parametrize("qtype", [t.name for t in QUANTIZABLE + K_QUANTS])
def test_torch_dequantize_is_bit_for_bit_gguf(fixture_file, qtype):
    """float32 results equal gguf-py's numpy decoding (what transformers' loader calls) bit for bit: the same
    float32 products and sums in the same order; other dtypes are that float32 value rounded once."""
    tensor = next(t for t in GGUFReader(fixture_file).tensors if t.name == qtype)
    assert tensor.tensor_type == Q[qtype]
    ref = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    ours = dequant.dequantize(tensor.data, tensor.tensor_type, torch.float32)
    assert ours.shape == ref.shape == (6, 512) and ours.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    assert ours.abs().max() > 0
    bf = dequant.dequantize(tensor.data, tensor.tensor_type, torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, ref.to(torch.bfloat16))


def test_chunked_decoding_matches_one_piece(fixture_file, monkeypatch):
    """A tensor decoded in many small chunks is the tensor decoded at once (chunk edges fall inside rows)."""
    tensor = next(t for t in GGUFReader(fixture_file).tensors if t.name == "Q4_K")
    whole = dequant.dequantize(tensor.data, tensor.tensor_type)
    monkeypatch.setattr(dequant, "CHUNK_ELEMENTS", 256 * 3)
    assert torch.equal(dequant.dequantize(tensor.data, tensor.tensor_type), whole)


def test_unsupported_quant_type_names_the_type(tmp_path):
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[Q.IQ4_NL]
    raw = np.zeros((2, 256 // block * size), dtype=np.uint8)
    path = tmp_path / "iq.gguf"
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", raw, raw_shape=raw.shape, raw_dtype=Q.IQ4_NL)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    t = GGUFReader(path).tensors[0]
    with pytest.raises(SourceError, match=r"blk\.0\.attn_q\.weight is quantized as IQ4_NL.*supported: F32, F16"):
        dequant.dequantize(t.data, t.tensor_type, name=t.name)


def test_fixture_writer_round_trips_f32(tmp_path):
    """The fixture writer itself: F32 values come back exactly (so the other comparisons are of real tensors)."""
    values = np.random.default_rng(1).normal(size=(3, 256)).astype(np.float32)
    t = GGUFReader(write_tensors(tmp_path / "f.gguf", {"x": (values, Q.F32)})).tensors[0]
    assert np.array_equal(dequant.dequantize(t.data, t.tensor_type).numpy(), values)


@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf):
    from hf_rksp.loading import resolve_source

    return resolve_source(str(smollm2_gguf))


@pytest.mark.slow
def test_fast_gguf_load_equals_transformers_state_dict(smollm2_source):
    """SmolLM2 (Q4_1 + Q8_0 + F32, Llama Q/K permutation): our load's state dict is transformers' bit for bit."""
    from transformers import AutoModel

    from hf_rksp.loading import load_model

    ours = load_model(smollm2_source).model.state_dict()
    theirs = AutoModel.from_pretrained(smollm2_source.path, gguf_file=smollm2_source.gguf_file,
                                       dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys() and len(ours) == 272
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    bf16 = load_model(smollm2_source, dtype="bfloat16").model.state_dict()  # cast once, from the float32 values
    assert all(torch.equal(bf16[k], theirs[k].to(torch.bfloat16)) for k in theirs)
