"""GGUF: torch de-quantization, the fast whole-model loader, streaming, and bad GGUF input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf import dequantize as gguf_dequantize
from gguf_fixtures import K_QUANTS, QUANTIZABLE, every_type, write_tensors

from hf_rksp.errors import SourceError
from hf_rksp.models.checkpoints import dequant


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
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()  # noqa: B018
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
    from hf_rksp.models.loading import resolve_source

    return resolve_source(str(smollm2_gguf))


@pytest.mark.slow
def test_fast_gguf_load_equals_transformers_state_dict(smollm2_source):
    """SmolLM2 (Q4_1 + Q8_0 + F32, Llama Q/K permutation): our load's state dict is transformers' bit for bit."""
    from transformers import AutoModel

    from hf_rksp.models.loading import load_model

    ours = load_model(smollm2_source).model.state_dict()
    theirs = AutoModel.from_pretrained(smollm2_source.path, gguf_file=smollm2_source.gguf_file,
                                       dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys() and len(ours) == 272
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    bf16 = load_model(smollm2_source, dtype="bfloat16").model.state_dict()  # cast once, from the float32 values
    assert all(torch.equal(bf16[k], theirs[k].to(torch.bfloat16)) for k in theirs)


def _tiny_llama(seed: int = 0):
    from conftest import tiny_config
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_config("llama"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama as llama.cpp writes it (Q8_0 weights, F32 norms, permuted Q/K rows)."""
    from gguf_fixtures import tiny_llama_gguf

    return tiny_llama_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.gguf", _tiny_llama())


def test_f32_gguf_loads_back_the_original_weights(tmp_path):
    """Through transformers' name map and Q/K permutation reversal, an F32 GGUF gives back the model written."""
    from gguf_fixtures import tiny_llama_gguf

    from hf_rksp.models.loading import load_model, resolve_source

    model = _tiny_llama(seed=1)
    path = tiny_llama_gguf(tmp_path / "f32.gguf", model, Q.F32)
    loaded = load_model(resolve_source(str(path))).model.state_dict()
    ref = model.state_dict()
    assert loaded.keys() == ref.keys() and all(torch.equal(loaded[k], ref[k]) for k in ref)


def _without_run_details(d: dict) -> dict:
    # the slug names the method too, and --stream is part of it (docs/guides/auditing.md, "Where an audit is
    # written"): a run detail here, like the command
    d = {k: v for k, v in d.items() if k not in ("created", "command", "timings", "slug")}
    d["method"] = {k: v for k, v in d["method"].items() if k not in ("streamed", "snapshots")}
    return d


def assert_same_audit(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Equal JSON except run details; numbers within float32 tolerance (masses: 2 band-edge eigenvalues)."""
    def walk(x, y, where):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif isinstance(x, float) and isinstance(y, float):
            tol = 2.0 / 256 if where.endswith("_mass") else rel * max(abs(x), abs(y)) + 1e-7
            assert abs(x - y) <= tol, (where, x, y)
        else:
            assert x == y, (where, x, y)

    walk(_without_run_details(a), _without_run_details(b), "audit")


def test_tiny_gguf_streamed_equals_whole(tiny_gguf):
    from hf_rksp import audit

    whole = audit(str(tiny_gguf), out_dir=None, tokens=256, seq_len=128, progress=False)
    streamed = audit(str(tiny_gguf), out_dir=None, tokens=256, seq_len=128, progress=False, stream=True)
    assert streamed.data["method"]["streamed"] and not whole.data["method"]["streamed"]
    assert streamed.data["source"]["kind"] == "gguf" and streamed.data["source"]["gguf_file"] == "tiny-llama.gguf"
    assert_same_audit(whole.data, streamed.data)


def test_gguf_streams_by_itself_when_it_would_not_fit(tiny_gguf, monkeypatch):
    """The memory planner sizes a GGUF de-quantized in --dtype (not by its file size), and streams when told."""
    from hf_rksp import audit
    from hf_rksp.models import placement

    seen = []
    real = placement.plan_memory

    def plan(sizes, **kw):
        seen.append((kw["dtype"], sizes.whole))
        return real(sizes, **{**kw, "tokens": 2, "available": 2 * sizes.whole})  # weights: half the RAM

    monkeypatch.setattr(placement, "plan_memory", plan)
    r = audit(str(tiny_gguf), out_dir=None, tokens=256, seq_len=128, progress=False, dtype="bfloat16")
    assert r.data["method"]["streamed"]
    assert seen == [("bfloat16", 2 * r.data["source"]["n_params"])]


@pytest.mark.slow
def test_smollm2_gguf_streamed_equals_whole(smollm2_gguf):
    """SmolLM2-135M (real Q4_1 weights): the streamed GGUF audit is the whole-model GGUF audit."""
    from hf_rksp import audit

    whole = audit(str(smollm2_gguf), out_dir=None, tokens=512, seq_len=256, progress=False)
    streamed = audit(str(smollm2_gguf), out_dir=None, tokens=512, seq_len=256, progress=False, stream=True)
    assert streamed.data["method"]["streamed"] and streamed.data["inputs"]["origin"] == "embedded-text"
    assert len(streamed.data["blocks"]) == 30
    assert_same_audit(whole.data, streamed.data)


def _bad_ggufs(tmp_path, tiny_gguf) -> dict[str, tuple]:
    """Damaged or unsupported GGUF files -> the words their one error line must contain."""
    from gguf_fixtures import tiny_llama_gguf

    data = tiny_gguf.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    reader = GGUFReader(tiny_gguf)
    t = reader.tensors[-1]
    unknown = tmp_path / "unknown-type.gguf"  # the last tensor's type id (a uint32 before its offset) -> 250
    raw = bytearray(data)
    type_at = t.field.offset + sum(p.nbytes for p in t.field.parts[:4])
    assert int.from_bytes(raw[type_at:type_at + 4], "little") == int(t.tensor_type)
    raw[type_at:type_at + 4] = (250).to_bytes(4, "little")
    unknown.write_bytes(bytes(raw))
    return {
        "truncated": (truncated, ["truncated.gguf", "truncated or corrupt"]),
        "unknown quant type": (unknown, ["unknown GGML quantization type", "250"]),
        "unsupported architecture": (tiny_llama_gguf(tmp_path / "arch.gguf", _tiny_llama(), arch="bogus"),
                                     ["bogus", "not supported"]),
        "unsupported quant type": (tiny_llama_gguf(tmp_path / "iq.gguf", _tiny_llama(), Q.IQ4_NL),
                                   ["IQ4_NL", "cannot de-quantize"]),
    }


@pytest.mark.parametrize("stream", [False, True])
def test_bad_gguf_gives_one_line_and_writes_nothing(tmp_path, tiny_gguf, capsys, stream):
    from hf_rksp.cli.commands import main

    for case, (path, words) in _bad_ggufs(tmp_path, tiny_gguf).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        rc = main(["audit", str(path), "--tokens", "256", "--seq-len", "128", "--out-dir", str(out), "-q",
                   *(["--stream"] if stream else [])])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("hf-rksp: error:") and len(err.strip().splitlines()) == 1, (case, err)
        assert all(w in err for w in words), (case, err)
        assert not out.exists(), case
