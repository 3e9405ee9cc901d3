"""hf_rksp/cli: the one place library errors become flags (a library message names parameters in backticks by
their library name; the CLI says the flag), and commands that only read write nothing."""

from __future__ import annotations

import logging

import pytest

from hf_rksp.capture.calibration import check_shape
from hf_rksp.cli import build_parser, main
from hf_rksp.cli.errors import worded
from hf_rksp.errors import ConfigError, RKSPError


def test_library_message_names_the_parameter_and_the_cli_names_the_flag():
    with pytest.raises(ConfigError) as e:
        check_shape(1000, 300)
    assert "--" not in str(e.value) and "`tokens`" in str(e.value) and "`seq_len`" in str(e.value)
    text = worded(e.value, build_parser())
    assert "--tokens (1000) must be a multiple of --seq-len (300)" in text and "`" not in text


def test_special_flags_and_unknown_names():
    p = build_parser()
    assert worded(RKSPError("`kreiss` and `quantize` and `not_an_option`"), p) == \
        "--no-kreiss and --load-in-8bit/--load-in-4bit and not_an_option"
    assert worded(ConfigError("must be positive", param="band_upper"), p) == "--band-upper: must be positive"
    assert worded(ConfigError("`quantize` 4bit loads the model whole; not with `stream`", param="quantize"), p) == \
        "--load-in-4bit loads the model whole; not with --stream"
    assert worded(ConfigError("`device` cuda:1 requested", param="device"), p) == "--device cuda:1 requested"


def test_a_library_error_keeps_its_cause_in_the_debug_log(tmp_path, monkeypatch, capsys):
    """A hostile config: the one line on stderr, and behind it in HF_RKSP_LOG the traceback of the cause."""
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "gpt2", "n_layer": 2, "n_embd": 30, "n_head": 7, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 0}')
    log = tmp_path / "debug.log"
    monkeypatch.setenv("HF_RKSP_LOG", str(log))
    monkeypatch.chdir(tmp_path)
    rc = main(["audit", "--config", str(cfg), "--tokens", "64", "--seq-len", "32", "--no-write", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("hf-rksp: error:")
    assert "Traceback" in log.read_text() and "direct cause" in log.read_text()  # the cause, chained
    logging.getLogger("hf_rksp").handlers.clear()


def test_read_only_commands_leave_the_output_folder_alone(tmp_path, capsys):
    """compare and audit --no-write do not run the publish recovery (it writes); an audit that writes does."""
    journal = tmp_path / "audits" / ".publish-x.json"
    journal.parent.mkdir()
    journal.write_text('{"steps": []}')
    main(["compare", "a", "b", "--out-dir", str(tmp_path)])
    assert journal.is_file()
    main(["audit", "--config", str(tmp_path / "missing.json"), "--no-write", "--out-dir", str(tmp_path), "-q"])
    assert journal.is_file()
    main(["audit", "--config", str(tmp_path / "missing.json"), "--out-dir", str(tmp_path), "-q"])
    assert not journal.exists()
    capsys.readouterr()
