"""The `hf-rksp` command line: bad input gets one clear error line and writes nothing.

Every error case asserts: exit code != 0, stderr is exactly one line starting
with ``hf-rksp: error:`` that names what is wrong, no traceback, and no file at
all under ``--out-dir`` (no audit.json, README.md, png, temp or staging file).
Most cases call ``hf_rksp.cli.commands.main`` in-process; a few run the real console
script in a subprocess to prove no traceback reaches the user.  Nothing here
touches the network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, slug_of, tiny_tokenizer

from hf_rksp.cli.commands import main
from hf_rksp.models.blocks import supported_families
from hf_rksp.utils import atomic

SMALL = ["--tokens", "128", "--seq-len", "64"]
CARD_FILES = ("README.md", "spectrum.png", "profile.png")
AUDIT_FILES = ("audit.json", "spectrum.png", "profile.png")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this process (env and the constant huggingface_hub read at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working directory (relative paths resolve here; no local dir shadows a hub id)."""
    d = tmp_path / "work"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints, good and broken, written once for the module."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("cli_ckpts")
    c: dict[str, Path] = {}
    c["gpt2"] = save_tiny("gpt2", root / "tiny-gpt2")  # n_positions 256, no tokenizer
    c["llama"] = save_tiny("llama", root / "good" / "tiny-llama")

    # Same directory name (so the same slug) as the good llama, NaN weights in block 1.
    nan = save_tiny("llama", root / "nan" / "tiny-llama")
    f = nan / "model.safetensors"
    sd = load_file(str(f))
    key = "layers.1.self_attn.q_proj.weight"
    assert key in sd, sorted(sd)
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(f), metadata={"format": "pt"})
    c["nan"] = nan

    trunc = save_tiny("llama", root / "truncated")
    f = trunc / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    c["truncated"] = trunc

    tok = root / "tiny-gpt2-tok"
    shutil.copytree(c["gpt2"], tok)
    tiny_tokenizer().save_pretrained(tok)
    c["tok"] = tok
    return c


# ----------------------------------------------------------------------------- helpers


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``main([...])`` in-process: (exit code, stdout, stderr).

    An exception escaping main() is what the console script shows as a traceback:
    it is turned into rc 1 and its traceback into stderr, so the assertions
    below report it (and the no-file checks still run).
    """
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse (--help, usage errors)
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        captured = capsys.readouterr()
        return 1, captured.out, captured.err + traceback.format_exc()
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def audit_cli(capsys, out: Path, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "audit", *argv, "--out-dir", str(out), "-q")


def assert_one_error_line(rc: int, err: str, *words: str) -> str:
    """Exit != 0, no traceback, and stderr is one 'hf-rksp: error: ...' line containing ``words``."""
    assert rc != 0, f"expected a non-zero exit code, got {rc}; stderr:\n{err}"
    assert "Traceback" not in err, f"a traceback reached the user:\n{err}"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]  # splitlines also splits tqdm's \r
    assert lines, "nothing on stderr"
    line = lines[-1]
    assert line.startswith("hf-rksp: error:"), f"last stderr line is not an hf-rksp error: {line!r}\n{err}"
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in the error line {line!r}"
    assert len(lines) == 1, f"stderr should be exactly one line (the error), got {len(lines)}:\n{err}"
    return line


def files_under(root: Path) -> list[str]:
    """Every file (hidden ones, temp files and links included) under ``root``, relative."""
    if not root.exists():
        return []
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            found.append(str((Path(dirpath) / n).relative_to(root)))
    return sorted(found)


def dirs_under(root: Path) -> list[str]:
    found = []
    for dirpath, dirs, _names in os.walk(root):
        for d in dirs:
            found.append(str((Path(dirpath) / d).relative_to(root)))
    return sorted(found)


def assert_nothing_written(out: Path) -> None:
    assert files_under(out) == [], f"files left under --out-dir after a failure: {files_under(out)}"


def snapshot(root: Path) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in files_under(root)}


def expected_outputs(slug: str) -> list[str]:
    return sorted([f"audits/{slug}/{f}" for f in AUDIT_FILES] + [f"model_cards/{slug}/{f}" for f in CARD_FILES])


def assert_exact_outputs(out: Path, slug: str) -> None:
    """Exactly the six output files, and no other file or directory (no staging dir left)."""
    assert files_under(out) == expected_outputs(slug)
    assert dirs_under(out) == sorted(["audits", "model_cards", f"audits/{slug}", f"model_cards/{slug}"])


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The real `hf-rksp` console script, offline."""
    exe = shutil.which("hf-rksp")
    assert exe, "the hf-rksp console script is not on PATH (pip install -e .)"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- what to audit


def test_unknown_hub_id_offline(capsys, work, out):
    rc, _, err = audit_cli(capsys, out, "someone/does-not-exist-xyz", *SMALL)
    assert_one_error_line(rc, err, "someone/does-not-exist-xyz", "HF_HUB_OFFLINE")
    assert_nothing_written(out)


def test_unknown_hub_id_offline_console_script(work, out):
    p = run_script(["audit", "someone/does-not-exist-xyz", *SMALL, "--out-dir", str(out), "-q"], work)
    assert_one_error_line(p.returncode, p.stderr, "someone/does-not-exist-xyz", "HF_HUB_OFFLINE")
    assert_nothing_written(out)


@pytest.mark.parametrize("path", ["./no/such/dir", "./no/such/model.gguf", "missing.gguf"])
def test_missing_path(capsys, work, out, path):
    rc, _, err = audit_cli(capsys, out, path, *SMALL)
    assert_one_error_line(rc, err, "no such file or directory", path)
    assert_nothing_written(out)


def test_directory_without_config_json(capsys, work, out):
    d = work / "not-a-checkpoint"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\x00" * 64)
    rc, _, err = audit_cli(capsys, out, str(d), *SMALL)
    assert_one_error_line(rc, err, "config.json", "not-a-checkpoint")
    assert_nothing_written(out)


def test_corrupt_gguf(capsys, work, out):
    f = work / "broken.gguf"
    f.write_bytes(b"\x00\x13garbage, not a GGUF header" * 64)
    rc, _, err = audit_cli(capsys, out, str(f), *SMALL)
    assert_one_error_line(rc, err, "broken.gguf", "GGUF")
    assert_nothing_written(out)


def test_non_model_file(capsys, work, out):
    f = work / "notes.txt"
    f.write_text("just some notes\n")
    rc, _, err = audit_cli(capsys, out, str(f), *SMALL)
    assert_one_error_line(rc, err, "notes.txt", "not a .gguf")
    assert_nothing_written(out)


def test_truncated_safetensors(capsys, work, out, ckpts):
    rc, _, err = audit_cli(capsys, out, str(ckpts["truncated"]), *SMALL)
    assert_one_error_line(rc, err, "could not load weights", "truncated")
    assert_nothing_written(out)


def test_no_model_named(capsys, work, out):
    rc, _, err = audit_cli(capsys, out, *SMALL)
    assert_one_error_line(rc, err, "--config")
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- --config


def test_config_invalid_json(capsys, work, out):
    f = work / "config.json"
    f.write_text('{"model_type": "gpt2", n_layer: 2')
    rc, _, err = audit_cli(capsys, out, "--config", str(f), *SMALL)
    assert_one_error_line(rc, err, "config.json", "not valid JSON")
    assert_nothing_written(out)


@pytest.mark.parametrize("family", ["whisper", "clip"])
def test_config_unsupported_family(capsys, work, out, family):
    f = work / f"{family}.json"
    f.write_text(json.dumps({"model_type": family, "hidden_size": 64, "d_model": 64, "num_hidden_layers": 2}))
    rc, _, err = audit_cli(capsys, out, "--config", str(f), *SMALL)
    assert_one_error_line(rc, err, "unsupported", family, *supported_families())
    assert_nothing_written(out)


def test_config_impossible_architecture(capsys, work, out):
    """A config transformers refuses to build (64 not divisible by 5 heads) is bad input, not a crash."""
    f = work / "five-heads.json"
    f.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 5, "n_layer": 2, "vocab_size": 512,
                             "n_positions": 256, "bos_token_id": 0, "eos_token_id": 0}))
    rc, _, err = audit_cli(capsys, out, "--config", str(f), *SMALL)
    assert_one_error_line(rc, err, "five-heads.json")
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- method options


def test_rank_larger_than_tokens_allow(capsys, work, out):
    rc, _, err = audit_cli(capsys, out, "gpt2", "--init", "--rank", "300", "--tokens", "256", "--seq-len", "128")
    assert_one_error_line(rc, err, "--rank", "rank 300", "largest possible rank is 255")
    assert_nothing_written(out)


@pytest.mark.parametrize("argv, words", [
    (["--eps", "0"], ["--eps", "eps must be > 0"]),
    (["--eps=-1e-5"], ["--eps", "eps must be > 0"]),
    (["--rank", "0"], ["--rank", "at least 1"]),
    (["--rank", "-3"], ["--rank", "at least 1"]),
    (["--band-upper", "0.95"], ["--band-upper", "above 1"]),
    (["--band-lower", "-0.1"], ["--band-lower", "(0, 1)"]),
    (["--band-lower", "1.2"], ["--band-lower", "(0, 1)"]),
    (["--contractive", "0.95"], ["--contractive", "band_lower"]),
    (["--contractive", "-0.5"], ["--contractive"]),
    (["--resdmd-tau", "0"], ["--resdmd-tau", "> 0"]),
    (["--resdmd-tau", "-1"], ["--resdmd-tau", "> 0"]),
])
def test_bad_method_options_one_line_nothing_written(capsys, work, out, argv, words):
    """Every v2 method option out of range: one clear line naming the option, and nothing written."""
    rc, _, err = audit_cli(capsys, out, "gpt2", "--init", *SMALL, *argv)
    assert_one_error_line(rc, err, *words)
    assert_nothing_written(out)


def test_rank_not_a_number_is_a_usage_error(capsys, work, out):
    rc, _, err = audit_cli(capsys, out, "gpt2", "--init", *SMALL, "--rank", "most")
    assert rc == 2 and "expected full, auto or an integer" in err
    assert_nothing_written(out)


def test_tokens_not_a_multiple_of_seq_len(capsys, work, out, ckpts):
    rc, _, err = audit_cli(capsys, out, str(ckpts["gpt2"]), "--init", "--tokens", "300", "--seq-len", "128")
    assert_one_error_line(rc, err, "300", "128", "multiple")
    assert_nothing_written(out)


def test_seq_len_beyond_max_positions(capsys, work, out, ckpts):
    rc, _, err = audit_cli(capsys, out, str(ckpts["gpt2"]), "--init", "--tokens", "512", "--seq-len", "512")
    assert_one_error_line(rc, err, "--seq-len 512", "256 positions")
    assert_nothing_written(out)


@pytest.mark.parametrize("bs", ["0", "-1"])
def test_batch_size_not_positive(capsys, work, out, ckpts, bs):
    rc, _, err = audit_cli(capsys, out, str(ckpts["gpt2"]), "--init", *SMALL, "--batch-size", bs)
    assert_one_error_line(rc, err, "--batch-size")
    assert_nothing_written(out)


def test_non_integer_tokens_is_a_usage_error(capsys, work, out):
    """argparse's own usage error: exit 2, no traceback, names the option."""
    rc, _, err = audit_cli(capsys, out, "gpt2", "--init", "--tokens", "abc")
    assert rc == 2
    assert "Traceback" not in err
    assert "--tokens" in err.strip().splitlines()[-1] and "abc" in err
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- activations


def test_nan_in_block_1(capsys, work, out, ckpts):
    rc, _, err = audit_cli(capsys, out, str(ckpts["nan"]), *SMALL)
    line = assert_one_error_line(rc, err, "NaN", "block 1")
    assert "block 0" not in line
    assert_nothing_written(out)


def test_nan_in_block_1_console_script(work, out, ckpts):
    p = run_script(["audit", str(ckpts["nan"]), *SMALL, "--out-dir", str(out), "-q"], work)
    assert_one_error_line(p.returncode, p.stderr, "NaN", "block 1")
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- calibration text


def test_text_file_missing(capsys, work, out, ckpts):
    rc, _, err = audit_cli(capsys, out, str(ckpts["tok"]), *SMALL, "--text", "no-such-corpus.txt")
    assert_one_error_line(rc, err, "--text", "not found", "no-such-corpus.txt")
    assert_nothing_written(out)


def test_text_file_too_short(capsys, work, out, ckpts):
    from transformers import AutoTokenizer

    f = work / "short.txt"
    text = "A short calibration text, far from enough tokens.\n"
    f.write_text(text)
    n = len(AutoTokenizer.from_pretrained(str(ckpts["tok"]))(text, add_special_tokens=False)["input_ids"])
    assert 0 < n < 128
    rc, _, err = audit_cli(capsys, out, str(ckpts["tok"]), *SMALL, "--text", str(f))
    assert_one_error_line(rc, err, f"only {n} tokens", "128")
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- runtime


def test_device_cuda_without_cuda(capsys, work, out, ckpts, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU-only, whatever the machine
    rc, _, err = audit_cli(capsys, out, str(ckpts["gpt2"]), "--init", *SMALL, "--device", "cuda")
    assert_one_error_line(rc, err, "--device cuda", "CUDA")
    assert_nothing_written(out)


def test_unknown_dtype(capsys, work, out, ckpts):
    rc, _, err = audit_cli(capsys, out, str(ckpts["gpt2"]), "--init", *SMALL, "--dtype", "float8")
    assert_one_error_line(rc, err, "--dtype", "float8", "float32", "bfloat16")
    assert_nothing_written(out)


def test_out_dir_is_a_file(capsys, work, ckpts):
    """--out-dir naming an existing file: one error line, and the file is left alone."""
    f = work / "taken"
    f.write_text("not a directory\n")
    rc, _, err = run_cli(capsys, "audit", str(ckpts["gpt2"]), "--init", *SMALL, "--out-dir", str(f), "-q")
    assert_one_error_line(rc, err, "--out-dir", "taken")
    assert f.read_text() == "not a directory\n"
    assert sorted(p.name for p in work.iterdir()) == ["taken"]


# ----------------------------------------------------------------------------- successful audits


def test_init_audit_writes_exactly_the_outputs(capsys, work, out, ckpts):
    rc, stdout, err = audit_cli(capsys, out, str(ckpts["gpt2"]), "--init", "--tokens", "256", "--seq-len", "128")
    assert rc == 0, err
    assert "Traceback" not in err
    slug = slug_of(str(ckpts["gpt2"]), "--init", "--tokens", "256", "--seq-len", "128")
    assert slug.startswith("cli_ckpts0__tiny-gpt2-") and slug.endswith("__init__" + slug[-8:])
    assert_exact_outputs(out, slug)
    data = json.loads((out / "audits" / slug / "audit.json").read_text())
    assert data["slug"] == slug
    assert data["source"]["init"] is True and data["source"]["family"] == "gpt2"
    assert data["inputs"]["n_tokens"] == 256 and data["inputs"]["seq_len"] == 128
    assert len(data["blocks"]) == 3
    for name in ("spectrum.png", "profile.png"):
        png = (out / "audits" / slug / name).read_bytes()
        assert png.startswith(b"\x89PNG") and png == (out / "model_cards" / slug / name).read_bytes()
    card = (out / "model_cards" / slug / "README.md").read_text()
    assert card.startswith("---") and "RKSP" in card
    assert "near-unit mass" in stdout and str(out / "audits" / slug / "audit.json") in stdout


def test_no_write_writes_nothing(capsys, work, out, ckpts):
    rc, stdout, err = audit_cli(capsys, out, str(ckpts["gpt2"]), "--init", *SMALL, "--no-write")
    assert rc == 0, err
    assert "near-unit mass" in stdout and "wrote" not in stdout
    assert not out.exists() or files_under(out) == [] and dirs_under(out) == []
    assert files_under(work) == []


def test_shipped_gpt2_config_offline(capsys, work, out):
    rc, stdout, err = audit_cli(capsys, out, "gpt2", "--init", "--tokens", "256", "--seq-len", "128")
    assert rc == 0, err
    slug = slug_of("gpt2", "--init", "--tokens", "256", "--seq-len", "128")
    assert_exact_outputs(out, slug)
    data = json.loads((out / "audits" / slug / "audit.json").read_text())
    assert data["source"]["kind"] == "hub" and data["source"]["init"] is True
    assert data["source"]["config_origin"].startswith("shipped:")
    assert data["source"]["n_blocks"] == 12 and data["source"]["d_model"] == 768
    assert data["inputs"]["origin"] == "random-token-ids"
    assert "hf-rksp audit gpt2 --init" in data["command"]
    assert "RKSP audit of gpt2 (random init)" in stdout


def test_failure_after_success_keeps_earlier_outputs(capsys, work, out, ckpts):
    """A failing audit leaves the earlier outputs byte-identical."""
    rc, _, err = audit_cli(capsys, out, str(ckpts["llama"]), *SMALL)
    assert rc == 0, err
    slug = slug_of(str(ckpts["llama"]), *SMALL)
    assert_exact_outputs(out, slug)
    before = snapshot(out)

    rc, _, err = audit_cli(capsys, out, str(ckpts["nan"]), *SMALL)
    assert rc != 0
    assert snapshot(out) == before, "earlier outputs were changed by a failed audit"
    assert_exact_outputs(out, slug)
    assert_one_error_line(rc, err, "block 1")


def test_failure_while_publishing_keeps_earlier_outputs(capsys, work, out, ckpts, monkeypatch):
    """If publishing fails half-way (audit dir moved, card dir not), the earlier outputs stay as they were:
    no mix of a new audit.json with an old card, and one error line."""
    rc, _, err = audit_cli(capsys, out, str(ckpts["gpt2"]), "--init", *SMALL, "--seed", "1")
    assert rc == 0, err
    before = snapshot(out)

    real = os.rename
    calls = []

    def flaky(src, dst):
        # fail when the staged card directory is swapped in, after the audit directory was
        staged = Path(src).name.startswith(".") and ".old." not in Path(src).name
        if staged and Path(dst).parent.name == "model_cards":
            calls.append(dst)
            raise OSError(errno.EACCES, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", flaky)
    rc, _, err = audit_cli(capsys, out, str(ckpts["gpt2"]), "--init", *SMALL, "--seed", "1")  # refreshes it
    assert len(calls) == 1
    assert rc != 0
    changed = sorted(k for k in before if snapshot(out).get(k) != before[k])
    assert snapshot(out) == before, f"earlier outputs were changed by a failed audit: {changed}"
    assert_exact_outputs(out, slug_of(str(ckpts["gpt2"]), "--init", *SMALL, "--seed", "1"))
    assert_one_error_line(rc, err, "Permission denied")


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("argv", [["--help"], ["audit", "--help"]])
def test_help(capsys, argv):
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    for opt in ("--init", "--config", "--tokens", "--rank", "--eps", "--band-upper", "--band-lower", "--contractive",
                "--resdmd-tau"):
        assert opt in stdout, f"`hf-rksp {' '.join(argv)}` does not mention {opt}:\n{stdout}"


def test_help_console_script(work):
    p = run_script(["audit", "--help"], work)
    assert p.returncode == 0, p.stderr
    assert "--init" in p.stdout and "--band-upper" in p.stdout and p.stderr == ""


def test_version(capsys):
    from hf_rksp import __version__

    rc, stdout, _ = run_cli(capsys, "--version")
    assert rc == 0 and stdout.strip() == f"hf-rksp {__version__}"


# ----------------------------------------------------------------------------- options defined once


def test_every_audit_option_is_parsed_and_recorded():
    """Each AuditOptions field is a flag of `hf-rksp audit` (dest = field name) and either recorded in the
    reproducing command or listed as not changing the numbers."""
    from dataclasses import fields

    from hf_rksp.cli.commands import build_parser
    from hf_rksp.pipeline.options import COMMAND_OPTIONS, NOT_RECORDED, AuditOptions

    names = {f.name for f in fields(AuditOptions)}
    assert set(COMMAND_OPTIONS) | set(NOT_RECORDED) == names and not set(COMMAND_OPTIONS) & set(NOT_RECORDED)
    audit_parser = build_parser()._subparsers._group_actions[0].choices["audit"]
    assert names <= {a.dest for a in audit_parser._actions}


@pytest.mark.parametrize("changes", [
    {},
    {"rank": 8, "eps": 1e-4, "band_upper": 1.1, "band_lower": 0.85, "contractive": 0.7, "resdmd_tau": 0.2,
     "kreiss": False, "seed": 3, "dtype": "bfloat16", "tokens": 512, "seq_len": 128},
    {"rank": "full", "dataset": "wikitext", "dataset_config": "wikitext-2-raw-v1", "split": "test", "column": "body",
     "revision": "v1.0", "trust_remote_code": True, "name": "org/model", "blocks": "model.layers", "lr": 3e-4},
    {"text": "my file.txt", "device_map": "cpu", "max_memory": "cpu=4GiB", "quantize": "4bit", "stream": True},
])
def test_recorded_command_parses_back_to_the_same_options(changes):
    """command_line (generated from the option table) and the parser agree: the command reproduces the options."""
    import shlex

    from hf_rksp.cli.commands import audit_options, build_parser
    from hf_rksp.pipeline.options import AuditOptions, command_line

    opts = AuditOptions(**changes)
    argv = shlex.split(command_line("org/model", True, None, opts))
    assert argv[:4] == ["hf-rksp", "audit", "org/model", "--init"]
    args = build_parser().parse_args(argv[1:])
    assert audit_options(args) == opts and args.model == "org/model" and args.init


def test_default_command_is_unchanged():
    from hf_rksp.pipeline.options import AuditOptions, command_line

    assert command_line("gpt2", True, None, AuditOptions()) == (
        "hf-rksp audit gpt2 --init --tokens 2048 --seq-len 512 --rank auto --seed 0 --dtype float32")
    assert command_line("c.json", True, "c.json", AuditOptions(eps=2e-5, stream=True)) == (
        "hf-rksp audit --config c.json --tokens 2048 --seq-len 512 --rank auto --eps 2e-05 --seed 0 --dtype float32 "
        "--stream")


#: the option strings of `hf-rksp audit`, captured from the parser before the options were defined once
#: (hand-written argparse calls); the derived parser must give exactly these, plus the options added since
#: issue 26's --threads and issue 24's --prompts, --snapshots, --sketch, each added as one field
ADDED_SINCE = ["--threads", "--prompts", "--snapshots", "--sketch", "--overwrite", "--format"]
AUDIT_OPTION_STRINGS = [
    "-h", "--help", "--init", "--config", "--revision", "--name", "--gguf-file", "--blocks", "--trust-remote-code",
    "--tokens", "--seq-len", "--rank", "--eps", "--band-upper", "--band-lower", "--contractive", "--resdmd-tau",
    "--no-kreiss", "--seed", "--lr", "--text", "--dataset", "--dataset-config", "--split", "--column", "--dtype",
    "--device", "--batch-size", "--stream", "--low-disk", "--device-map", "--max-memory", "--load-in-8bit",
    "--load-in-4bit", "--out-dir", "--no-write", "-q", "--quiet", "--from-audit", "--push-to",
]
#: the options of `hf-rksp audit` that are not AuditOptions fields (what to run on, where to write, what to print)
NOT_FIELDS = {"-h", "--help", "--init", "--config", "--out-dir", "--no-write", "-q", "--quiet", "--from-audit",
              "--push-to", "--format"}


def audit_parser():
    from hf_rksp.cli.commands import build_parser

    return build_parser()._subparsers._group_actions[0].choices["audit"]


def test_audit_help_lists_the_same_options():
    strings = [s for a in audit_parser()._actions for s in a.option_strings]
    assert sorted(strings) == sorted(AUDIT_OPTION_STRINGS + ADDED_SINCE) and len(strings) == len(set(strings))


def test_every_field_is_an_option_and_every_option_but_a_few_is_a_field():
    """dest = field name for each flag derived from AuditOptions; the others are the command's own."""
    from dataclasses import fields

    from hf_rksp.pipeline.options import AuditOptions

    names = {f.name for f in fields(AuditOptions)}
    by_dest: dict = {}
    for a in audit_parser()._actions:
        if a.option_strings:
            by_dest.setdefault(a.dest, []).extend(a.option_strings)
    assert names <= set(by_dest)
    others = {s for dest, strings in by_dest.items() if dest not in names for s in strings}
    assert others == NOT_FIELDS
    assert by_dest["kreiss"] == ["--no-kreiss"] and by_dest["quantize"] == ["--load-in-8bit", "--load-in-4bit"]


def test_derived_flags_keep_their_behaviour(capsys):
    """Types, choices, switches and the 8bit/4bit exclusion, as the hand-written parser had them."""
    from hf_rksp.cli.commands import audit_options, build_parser

    p = build_parser()
    args = p.parse_args(["audit", "m", "--rank", "full", "--tokens", "64", "--eps", "2e-5", "--no-kreiss",
                         "--load-in-4bit", "--device-map", "cpu", "--stream", "--trust-remote-code"])
    opts = audit_options(args)
    assert (opts.rank, opts.tokens, opts.eps, opts.kreiss, opts.quantize, opts.device_map, opts.stream,
            opts.trust_remote_code) == ("full", 64, 2e-5, False, "4bit", "cpu", True, True)
    assert audit_options(p.parse_args(["audit", "m", "--rank", "8"])).rank == 8
    assert not hasattr(p.parse_args(["audit", "m"]), "tokens")  # unset: AuditOptions holds the default
    for argv, message in [(["--rank", "x"], "argument --rank: expected full, auto or an integer, got 'x'"),
                          (["--tokens", "x"], "argument --tokens: invalid int value: 'x'"),
                          (["--device-map", "nope"], "argument --device-map: invalid choice: 'nope'"),
                          (["--load-in-8bit", "--load-in-4bit"], "not allowed with argument --load-in-8bit")]:
        with pytest.raises(SystemExit):
            p.parse_args(["audit", "m", *argv])
        assert message in capsys.readouterr().err


def test_help_gives_each_default_from_the_dataclass():
    from dataclasses import fields

    from hf_rksp.pipeline.options import AuditOptions

    helps = {a.dest: a.help for a in audit_parser()._actions}
    defaults = {f.name: f.default for f in fields(AuditOptions)}
    assert helps["tokens"].endswith(f"(default: {defaults['tokens']})")
    assert helps["eps"].endswith("(default: 1e-05)") and helps["rank"].endswith("(default: auto)")
    assert helps["lr"].startswith("peak learning rate") and "(default: the family's" in helps["lr"]
    assert "(default" not in helps["stream"]  # a switch says what it does


def test_options_markdown_has_a_row_per_flag():
    from hf_rksp.pipeline.options import GROUPS, options_markdown

    md = options_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    flags = [r.split("`")[1].split(" ")[0].replace("\\", "") for r in rows]
    assert sorted(flags) == sorted(set(AUDIT_OPTION_STRINGS + ADDED_SINCE) - NOT_FIELDS)
    assert all(f"**{title}**" in md for title in GROUPS.values())
    assert "| `--tokens TOKENS` | `2048` | always | calibration tokens N |" in rows
    assert "| `--rank full\\|auto\\|R` | `auto` | always |" in md  # table pipes escaped
    assert "| `--device DEVICE` | `cpu` | no |" in md


def test_a_new_option_is_one_field(monkeypatch, capsys):
    """A field with its metadata is enough: flag, help with default, check and recorded command follow."""
    from dataclasses import dataclass

    from hf_rksp.errors import ConfigError
    from hf_rksp.pipeline import options
    from hf_rksp.pipeline.validation import check_audit_options
    from hf_rksp.utils.options import option

    @dataclass
    class WithWarmup(options.AuditOptions):
        warmup: int = option(0, group="method", parse=int, bounds=(0, 64), help="forward passes before the capture")

    monkeypatch.setattr(options, "AuditOptions", WithWarmup)
    from hf_rksp.cli.commands import audit_options, build_parser

    args = build_parser().parse_args(["audit", "m", "--warmup", "3"])
    opts = audit_options(args)
    assert opts.warmup == 3
    assert options.command_line("m", False, None, opts).endswith("--dtype float32 --warmup 3")
    assert "--warmup" not in options.command_line("m", False, None, WithWarmup())
    assert {a.dest: a.help for a in audit_parser()._actions}["warmup"] == \
        "forward passes before the capture (default: 0)"
    with pytest.raises(ConfigError, match="between 0 and 64"):
        check_audit_options(WithWarmup(warmup=65))
    assert "`--warmup WARMUP` | `0` | if changed | forward passes before the capture |" in options.options_markdown()


def test_options_table_order_covers_only_fields():
    from dataclasses import fields

    from hf_rksp.pipeline.options import ORDER, AuditOptions, audit_option_fields

    assert len(ORDER) == len(set(ORDER)) and set(ORDER) <= {f.name for f in fields(AuditOptions)}
    assert [f.name for f, _ in audit_option_fields()][:len(ORDER)] == list(ORDER)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_list_names_every_family_and_shipped_config(capsys):
    """`hf-rksp list`: every supported family with its block path, every shipped config with the names it
    answers to and its depth and width (checked against transformers' own reading of the config), offline."""
    from transformers import AutoConfig

    from hf_rksp.models.blocks import BLOCK_PATHS
    from hf_rksp.models.loading import shipped_config, shipped_config_names

    rc, out, err = run_cli(capsys, "list")
    assert rc == 0 and err == ""
    families, configs = out.split("\nshipped configs")
    lines = {ln.split()[0]: ln.split()[1:] for ln in families.splitlines()[2:] if ln.strip()}
    assert lines == {f: [p] for f, p in BLOCK_PATHS.items()}
    rows = {ln.split()[0]: ln for ln in configs.splitlines()[2:] if ln.strip()}
    assert len(rows) == len(set(shipped_config_names().values()))
    for name, fname in shipped_config_names().items():
        hub_id = fname.removesuffix(".json").replace("__", "/")
        row = rows[hub_id].split(None, 4)
        assert name == hub_id or name in row[4].split(", ")
        cfg = AutoConfig.for_model(**shipped_config(name))
        assert row[1:4] == [cfg.model_type, str(cfg.num_hidden_layers), str(cfg.hidden_size)]
    rc, out, _ = run_cli(capsys, "list", "--help")
    assert rc == 0 and "no network" in out and "shipped configs" in out
