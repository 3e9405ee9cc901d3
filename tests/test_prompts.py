"""The paper's protocol for pretrained models: --prompts (one prompt per line, padded, padding kept out of
the snapshots), --snapshots hidden-states, and the rank-r sketch (docs/guides/auditing.md)."""

from __future__ import annotations

import pytest
import torch

from hf_rksp import audit
from hf_rksp.capture.calibration import from_prompts
from hf_rksp.capture.hooks import capture_snapshots
from hf_rksp.errors import ConfigError


def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64,
                                bos_token_id=0, eos_token_id=0)).eval()


def test_prompts_are_right_padded_and_masked(minilm_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    f = tmp_path / "p.txt"
    f.write_text("a short one\n\n" + "word " * 200 + "\na short one\n")
    cal = from_prompts(f, tok, max_tokens=64)
    lengths = cal.attention_mask.sum(1).tolist()
    assert cal.input_ids.shape == (3, 64) and lengths[1] == 64 and lengths[0] == lengths[2] < 64
    assert cal.n_tokens == sum(lengths) and cal.origin == "prompts"
    assert all(bool(cal.attention_mask[i, :n].all()) and not bool(cal.attention_mask[i, n:].any())
               for i, n in enumerate(lengths))  # from position 0, padding on the right
    assert cal.detail["n_prompts"] == 3 and cal.detail["prompts_cut"] == 1
    shipped = from_prompts(None, tok)
    assert shipped.detail["n_prompts"] == 32 and shipped.detail["prompts_cut"] == 0  # 8 prompts x 4 (paper D.3)


def test_padding_never_enters_the_snapshots():
    """Padded batch with a mask vs each prompt alone, unpadded: the same token states (causal model, right
    padding: a real position never attends to padding). 1e-5: float32 attention over different widths."""
    model = tiny_gpt2()
    rows = [torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 3)]
    ids = torch.zeros(3, 9, dtype=torch.int64)
    mask = torch.zeros(3, 9, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    padded = capture_snapshots(model, model.h, ids, batch_size=3, attention_mask=mask, progress=False)
    alone = [capture_snapshots(model, model.h, r[None], progress=False) for r in rows]
    assert padded.n_tokens == 17
    for b in range(2):
        want_x = torch.cat([a.inputs[b] for a in alone])
        want_y = torch.cat([a.outputs[b] for a in alone])
        torch.testing.assert_close(padded.inputs[b], want_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded.outputs[b], want_y, rtol=1e-5, atol=1e-5)


def test_hidden_states_pairs_are_the_blocks_but_the_last_is_after_the_final_norm():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    hooks = capture_snapshots(model, model.h, ids, progress=False)
    states = capture_snapshots(model, model.h, ids, progress=False, source="hidden-states")
    for b in range(2):
        torch.testing.assert_close(states.inputs[b], hooks.inputs[b], rtol=0, atol=0)
    torch.testing.assert_close(states.outputs[0], hooks.outputs[0], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(states.outputs[1], model.ln_f(hooks.outputs[1]), rtol=1e-6, atol=1e-6)


def test_the_pretrained_protocol_end_to_end(minilm_dir):
    """MiniLM (BERT: no final norm) under the paper's protocol: recorded in inputs, method and command; and
    hidden-states gives exactly the hooks' numbers there (BERT's hidden states are its blocks' inputs and
    outputs)."""
    kw = dict(name="sentence-transformers/all-MiniLM-L6-v2", out_dir=None, progress=False, prompts="shipped",
              rank=16)
    r = audit(str(minilm_dir), snapshots="hidden-states", sketch="pod", **kw).record
    assert r.slug.startswith("sentence-transformers__all-MiniLM-L6-v2__prompts__hidden-states__")  # + rank, sketch
    assert r.inputs.origin == "prompts" and r.inputs.extra["n_prompts"] == 32 and r.inputs.n_tokens < 32 * 64
    assert r.method.sketch == "pod" and r.method.rank == 16 and "output_hidden_states" in r.method.snapshots
    assert "padding positions excluded" in r.method.snapshots
    assert "--prompts shipped" in r.command and "--snapshots hidden-states" in r.command and "--sketch pod" in r.command
    hooks = audit(str(minilm_dir), sketch="pod", **kw).record
    assert [b.to_dict() for b in hooks.blocks] == [b.to_dict() for b in r.blocks]
    full = audit(str(minilm_dir), name="x/y", out_dir=None, progress=False, tokens=256, seq_len=128).record
    assert full.method.sketch is None and "sketch" not in full.method.to_dict()  # recorded where it acts


def test_a_sketch_at_full_rank_is_not_silent(minilm_dir, caplog):
    """--sketch pod with an audit that resolves to full DMD does nothing: the user is told."""
    with caplog.at_level("WARNING", logger="hf_rksp"):
        r = audit(str(minilm_dir), name="x/y", out_dir=None, progress=False, tokens=256, seq_len=128,
                  sketch="pod").record
    assert r.method.rank == "full" and any("has no effect" in m for m in caplog.messages)


@pytest.mark.parametrize("kw, match", [
    (dict(prompts="/nonexistent/prompts.txt"), "prompts"),
    (dict(prompts="shipped", stream=True), "stream"),
    (dict(snapshots="hidden-states", stream=True), "stream"),
    (dict(prompts="shipped", text="x.txt"), "prompts|text"),
    (dict(sketch="svd"), "sketch"),
])
def test_bad_protocol_options_are_refused_before_any_work(kw, match, tiny_dirs):
    with pytest.raises(ConfigError, match=match):
        audit(str(tiny_dirs["gpt2"]), out_dir=None, progress=False, **kw)
