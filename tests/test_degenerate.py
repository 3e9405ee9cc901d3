"""Degenerate audits beyond exact fit: too few distinct calibration tokens, near-identity blocks.

Each is a summary flag (``summary.degenerate``), a sentence of the card's verdict, a stderr warning and no risk
probability; near-identity is also the per-block flag it is built on.  The cases are constructed: a text of
one repeated word, a block whose residual update is zeroed, a shipped audit edited to say either.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_tokenizer
from transformers import AutoModel

from hf_rksp import audit
from hf_rksp.cli.commands import main
from hf_rksp.pipeline.run import degeneracies
from hf_rksp.record.records import DEGENERATE, MIN_DISTINCT_TOKENS

REPO = Path(__file__).resolve().parents[1]
GPT2 = REPO / "audits" / "gpt2__init" / "audit.json"


def test_the_rules():
    """Thresholds as documented: exact fit N <= d + 1; fewer than MIN_DISTINCT_TOKENS distinct ids among
    repeated tokens (N all-distinct tokens are not "few distinct"); any near-identity block."""
    assert degeneracies(2048, 64, None, 500, []) == {}
    assert list(degeneracies(65, 64, None, 65, [])) == ["exact_fit"]
    assert list(degeneracies(10, 768, None, 10, [])) == ["exact_fit"]  # all distinct: exact fit only
    assert list(degeneracies(2048, 64, None, MIN_DISTINCT_TOKENS - 1, [])) == ["few_distinct_tokens"]
    assert degeneracies(2048, 64, None, MIN_DISTINCT_TOKENS, []) == {}
    assert degeneracies(2048, 64, None, None, []) == {}  # images: no token ids
    got = degeneracies(40, 64, None, 3, [0, 2])
    assert list(got) == list(DEGENERATE) and "[0, 2]" in got["near_identity"] and "3 distinct" in \
        got["few_distinct_tokens"]


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_config("gpt2")).eval()


def test_one_repeated_word_is_few_distinct_tokens(tmp_path, caplog):
    text = tmp_path / "same.txt"
    text.write_text("residual " * 2000)
    with caplog.at_level(logging.WARNING, logger="hf_rksp"):
        res = audit(_tiny(), tokenizer=tiny_tokenizer(), text=str(text), tokens=256, seq_len=64, out_dir=None,
                    progress=False)
    r = res.record
    assert r.inputs.origin == "text-file" and r.inputs.distinct_tokens < MIN_DISTINCT_TOKENS
    assert r.summary.degenerate == ["few_distinct_tokens"] and r.risk is None
    assert "few distinct tokens" in r.risk_unavailable_reason
    assert "DEGENERATE AUDIT (few_distinct_tokens)" in r.summary.verdict
    assert any("degenerate audit: few distinct tokens" in m for m in caplog.messages)
    r.validate()  # distinct_tokens and the flag are in the schema


def test_a_block_that_changes_nothing_is_near_identity(tmp_path, caplog):
    """Block 1's attention and MLP output projections zeroed: it returns its input, so its operator is the
    identity (every eigenvalue 1); the block flag, the summary flag, the warning, no risk."""
    model = _tiny()
    with torch.no_grad():
        for proj in (model.h[1].attn.c_proj, model.h[1].mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
    with caplog.at_level(logging.WARNING, logger="hf_rksp"):
        res = audit(model, tokens=256, seq_len=64, out_dir=str(tmp_path), progress=False, name="org/ident")
    r = res.record
    assert r.blocks[1].flags[:1] == ["near_identity"] and "near_identity" not in r.blocks[0].flags
    assert all(abs(complex(*ev) - 1) < 1e-3 for ev in r.blocks[1].eigenvalues)  # the identity, as said
    assert r.summary.flagged_blocks["near_identity"] == [1]
    assert r.summary.degenerate == ["near_identity"] and r.risk is None
    assert any("near-identity blocks [1]" in m for m in caplog.messages)
    card = Path(res.paths["card"]).read_text()
    assert "DEGENERATE AUDIT (near_identity)" in card and "near-identity blocks [1]" in card


def test_an_ordinary_tiny_audit_is_not_degenerate():
    r = audit(_tiny(), tokens=256, seq_len=64, out_dir=None, progress=False).record
    assert r.summary.degenerate is None and r.blocks[0].flags == []
    assert r.inputs.distinct_tokens >= MIN_DISTINCT_TOKENS


@pytest.mark.parametrize("edit,flag", [("distinct", "few_distinct_tokens"), ("identity", "near_identity")])
def test_rerender_flags_an_audit_from_its_own_numbers(tmp_path, capsys, edit, flag):
    """An audit read back (--from-audit) is flagged from what it records, with the warning on stderr."""
    data = json.loads(GPT2.read_text())
    if edit == "distinct":
        data["inputs"]["distinct_tokens"] = 3
    else:
        data["blocks"][4]["flags"] = ["near_identity"]
        data["summary"]["flagged_blocks"]["near_identity"] = [4]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    rc = main(["audit", "--from-audit", str(src), "--out-dir", str(tmp_path / "o"), "-q", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "hf-rksp: warning: degenerate audit" in err
    got = json.loads((tmp_path / "o" / "audits" / "gpt2__init" / "audit.json").read_text())
    assert got["summary"]["degenerate"] == [flag] and got["risk"] is None
    assert "No calibrated probability" in got["summary"]["verdict"]


def test_the_card_says_when_the_audit_fell_back_to_random_ids():
    """inputs.reason (the random-id fallback of a pretrained model without a tokenizer) is a sentence of the
    card, naming the reason, the vocabulary and the seed; an audit at init on random ids by design has none."""
    from dataclasses import replace

    from hf_rksp.record import read_audit
    from hf_rksp.report.card import render_card

    r = read_audit(GPT2)
    assert r.inputs.origin == "random-token-ids" and "reason" not in r.inputs.detail
    assert "**Not text:**" not in render_card(r)
    fell = replace(r, inputs=replace(r.inputs, extra={**r.inputs.extra, "reason": "the model has no tokenizer"}))
    card = render_card(fell)
    line = next(ln for ln in card.splitlines() if ln.startswith("- Calibration input:"))
    assert ("**Not text:** the model has no tokenizer, so hf-rksp calibrated on 2048 seeded uniform random token "
            f"ids (vocabulary {r.inputs.detail['vocab_size']}, seed {r.inputs.detail['seed']}) instead") in line
