"""Results as data: AuditRecord.to_csv, Comparison.to_csv, and `hf-rksp audit/compare --format table|json|csv`."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from hf_rksp.cli.commands import main
from hf_rksp.record import read_audit
from hf_rksp.record.records import AuditRecord
from hf_rksp.report.compare import compare
from hf_rksp.spectral import FEATURE_NAMES

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "audits").glob("*/audit.json"))
GPT2 = REPO / "audits" / "gpt2__init" / "audit.json"


def _cell(text: str):
    return None if text == "" else float(text)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_to_csv_holds_every_feature_of_every_block_exactly(path):
    """Read back with the csv module: one row per block, every registry feature equal to the record's value
    (bit for bit: a float is written as its repr), None as an empty cell."""
    r = read_audit(path)
    rows = list(csv.DictReader(io.StringIO(r.to_csv())))
    assert [int(x["block"]) for x in rows] == [b.index for b in r.blocks]
    assert list(rows[0])[:len(FEATURE_NAMES) + 1] == ["block", *FEATURE_NAMES]
    for x, b in zip(rows, r.blocks):
        for name in FEATURE_NAMES:
            assert _cell(x[name]) == b.value(name), (name, b.index)
        assert (int(x["m"]), int(x["rank"]), x["flags"]) == (b.m, b.rank, ",".join(b.flags))
        assert ("stack" in x) == any(bb.stack is not None for bb in r.blocks)


def test_to_csv_is_to_pandas_and_writes_to_a_path_or_buffer(tmp_path):
    pd = pytest.importorskip("pandas")
    r = read_audit(GPT2)
    text = r.to_csv()
    back = pd.read_csv(io.StringIO(text), index_col="block", keep_default_na=False,
                       na_values={n: [""] for n in FEATURE_NAMES})
    pd.testing.assert_frame_equal(back, r.to_pandas(), check_dtype=False)
    assert r.to_csv(tmp_path / "a.csv") is None and (tmp_path / "a.csv").read_text() == text
    buf = io.StringIO()
    assert r.to_csv(buf) is None and buf.getvalue() == text


def test_to_csv_needs_no_pandas(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)
    assert read_audit(GPT2).to_csv().startswith("block,")


def test_comparison_to_csv_rows():
    a = read_audit(GPT2)
    b = read_audit(REPO / "audits" / "meta-llama__Llama-2-7b-hf__init__019cf932" / "audit.json")
    for x, y in ((a, a), (a, b)):
        res = compare(x, y)
        rows = list(csv.DictReader(io.StringIO(res.to_csv())))
        summary = [r for r in rows if r["block"] == ""]
        assert [r["row"] for r in summary] == list(res.summary)
        for r in summary:
            v = res.summary[r["row"]]
            assert (_cell(r["a"]), _cell(r["b"]), _cell(r["delta"])) == (v.a, v.b, v.delta)
            assert (r["n_a"], r["n_b"]) == (str(v.n_a), str(v.n_b))
        per_block = [r for r in rows if r["block"] != ""]
        assert len(per_block) == sum(len(d.deltas) for d in res.blocks)
        for r in per_block:
            assert _cell(r["delta"]) == res.blocks[int(r["block"])].delta(r["row"])
    assert compare(a, b).blocks == []  # 12 vs 32 blocks: the summary rows only


def test_audit_format_json_is_the_audit_file_and_csv_its_rows(tmp_path, capsys):
    """`--format json` prints the audit.json text byte for byte (pipeable into a file `compare` reads), the
    files written go to stderr; `--format csv` prints to_csv(); table is the summary as before."""
    rc = main(["audit", "--from-audit", str(GPT2), "--out-dir", str(tmp_path), "-q", "--format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    written = tmp_path / "audits" / "gpt2__init" / "audit.json"
    assert out == written.read_text()
    assert AuditRecord.from_json(out).slug == "gpt2__init" and f"wrote audit {written}" in err
    rc = main(["audit", "--from-audit", str(GPT2), "--out-dir", str(tmp_path), "-q", "--format", "csv"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == read_audit(written).to_csv() and "RKSP audit of" not in out
    rc = main(["audit", "--from-audit", str(GPT2), "--out-dir", str(tmp_path), "-q"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "RKSP audit of" in out and f"wrote audit     {written}" in out


def test_audit_format_of_a_model_without_writing(tiny_dirs, capsys):
    rc = main(["audit", str(tiny_dirs["gpt2"]), "--tokens", "64", "--seq-len", "32", "--no-write", "-q",
               "--format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = AuditRecord.from_json(out)  # valid against the schema
    assert len(r.blocks) == r.source.n_blocks and math.isfinite(r.summary.score) and "wrote" not in err


def test_compare_format(capsys, tmp_path):
    a = str(GPT2)
    assert main(["compare", a, a, "--format", "json"]) == 0
    as_json = capsys.readouterr().out
    assert main(["compare", a, a, "--json"]) == 0  # the older flag, kept as an alias
    assert capsys.readouterr().out == as_json
    assert json.loads(as_json) == compare(read_audit(GPT2), read_audit(GPT2)).to_dict()
    assert main(["compare", a, a, "--format", "csv", "--plot", str(tmp_path / "p.png")]) == 0
    out, err = capsys.readouterr()
    assert out == compare(read_audit(GPT2), read_audit(GPT2)).to_csv() and "wrote plot" in err
    assert main(["compare", a, a]) == 0
    assert "B - A" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # one of them, not both
        main(["compare", a, a, "--json", "--format", "csv"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_a_closed_pipe_is_not_an_error():
    """`hf-rksp compare A B --format json | head -1`: the reader stops early; no error line, exit 141 (SIGPIPE's
    status, as a shell reports it) or 0 when everything was written before the pipe closed."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-m", "hf_rksp", "compare", str(GPT2), str(GPT2), "--format", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # before the command writes a byte: its first write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141) and err == "", err
