"""Outputs users can trust (issue 27): one slug rule, nothing silently replaced, no local paths in what can be
published, degenerate audits flagged, a quiet stderr."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import save_tiny, slug_of

from hf_rksp.cli.commands import main
from hf_rksp.models.loading import resolve_source
from hf_rksp.pipeline.options import AuditOptions
from hf_rksp.pipeline.slugs import audit_slug

SMALL = ("--tokens", "128", "--seq-len", "64")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error(err: str, *words: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hf-rksp: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/a/ckpt and runs/b/ckpt: two different tiny checkpoints with the same folder name."""
    root = tmp_path_factory.mktemp("runs")
    save_tiny("gpt2", root / "a" / "ckpt", seed=0)
    save_tiny("gpt2", root / "b" / "ckpt", seed=1)
    return root


# ----------------------------------------------------------------------------- the slug rule


def test_same_named_folders_get_their_own_slugs(runs, monkeypatch):
    a, b = slug_of(str(runs / "a" / "ckpt")), slug_of(str(runs / "b" / "ckpt"))
    assert a != b
    digest = hashlib.sha256(str((runs / "a" / "ckpt").resolve()).encode()).hexdigest()[:6]
    assert a == f"a__ckpt-{digest}"  # the last two parts, and the resolved path's digest
    monkeypatch.chdir(runs / "a")
    assert slug_of("ckpt") == slug_of("./ckpt/") == a  # one folder, however it is named


def test_hub_ids_and_defaults_keep_their_readable_slugs():
    assert slug_of("gpt2", "--init") == "gpt2__init"
    assert slug_of("meta-llama/Llama-2-7b-hf", "--init") == "meta-llama__Llama-2-7b-hf__init"
    assert slug_of("gpt2", "--init", "--tokens", "2048", "--device", "cpu", "--batch-size", "4",
                   "--threads", "1") == "gpt2__init"  # defaults, and what does not change the numbers
    src = resolve_source("gpt2", init=True)
    assert audit_slug(src, AuditOptions(prompts="shipped", snapshots="hidden-states")) == \
        "gpt2__init__prompts__hidden-states"


def test_every_number_changing_option_changes_the_slug(tmp_path):
    want = hashlib.sha256(json.dumps({"tokens": "10"}, sort_keys=True).encode()).hexdigest()[:8]
    assert slug_of("gpt2", "--init", "--tokens", "10") == f"gpt2__init__{want}"
    variants = [(), ("--tokens", "4096"), ("--seq-len", "256"), ("--rank", "32"), ("--rank", "full"),
                ("--seed", "1"), ("--dtype", "bfloat16"), ("--eps", "1e-4"), ("--lr", "1e-3"),
                ("--no-kreiss",), ("--rank", "32", "--sketch", "pod"), ("--snapshots", "hidden-states"),
                ("--stream",)]
    seen = [slug_of("gpt2", "--init", *v) for v in variants]
    assert len(set(seen)) == len(seen), seen


def test_a_text_file_names_the_slug_by_its_content(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("one text\n")
    first = slug_of("gpt2", "--init", "--text", str(text))
    text.write_text("another text\n")
    assert slug_of("gpt2", "--init", "--text", str(text)) != first


def test_config_files_in_different_folders_do_not_share_config__init(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
    x, y = (slug_of("--config", str(tmp_path / d / "config.json")) for d in ("x", "y"))
    assert x != y and x.startswith("x__config-") and x.endswith("__init")


def test_odd_names_become_folder_names():
    src = resolve_source("gpt2", init=True)
    from dataclasses import replace

    slug = audit_slug(replace(src, name="org/" + "é\n" * 200), AuditOptions())
    assert "/" not in slug and "\n" not in slug and len(slug) < 200


# ----------------------------------------------------------------------------- nothing silently replaced


def test_another_audit_in_the_folder_is_refused_the_same_one_refreshed(capsys, tmp_path, runs):
    out, ckpt = tmp_path / "out", str(runs / "a" / "ckpt")
    rc, _, err = run(capsys, "audit", ckpt, *SMALL, "--out-dir", str(out), "-q")
    assert rc == 0, err
    before = snapshot(out)
    # an audit made by another command in the folder (an older rule's, or edited): refused before any work
    slug = slug_of(ckpt, *SMALL)
    audit_json = out / "audits" / slug / "audit.json"
    data = json.loads(audit_json.read_text())
    audit_json.write_text(json.dumps({**data, "command": data["command"] + " --no-kreiss"}, indent=2))
    before = snapshot(out)
    rc, _, err = run(capsys, "audit", ckpt, *SMALL, "--out-dir", str(out), "-q")
    assert rc == 2
    one_error(err, "holds another audit", "--overwrite")
    assert snapshot(out) == before
    rc, _, err = run(capsys, "audit", ckpt, *SMALL, "--overwrite", "--out-dir", str(out), "-q")
    assert rc == 0, err
    assert "--overwrite" not in json.loads(audit_json.read_text())["command"]
    rc, stdout, err = run(capsys, "audit", ckpt, *SMALL, "--out-dir", str(out), "-q")  # the identical audit
    assert rc == 0, err
    assert "replaced the earlier audit of the same source, method and inputs" in stdout


def test_the_publish_lock_check_refuses_another_audit(tmp_path, runs):
    """Two audits of one slug whose commands agree but whose numbers' identity differs (here: the method's
    band edited in the folder's audit): refused under the lock, the folder unchanged."""
    from hf_rksp import audit

    out, ckpt = tmp_path / "out", str(runs / "a" / "ckpt")
    first = audit(ckpt, tokens=128, seq_len=64, out_dir=str(out), progress=False)
    audit_json = Path(first.paths["audit"])
    data = json.loads(audit_json.read_text())
    data["method"]["band_upper"] = 1.5
    audit_json.write_text(json.dumps(data, indent=2))
    before = snapshot(out)
    from hf_rksp.errors import AuditExistsError

    with pytest.raises(AuditExistsError, match="method band_upper"):
        audit(ckpt, tokens=128, seq_len=64, out_dir=str(out), progress=False)
    assert snapshot(out) == before
    assert audit(ckpt, tokens=128, seq_len=64, out_dir=str(out), progress=False, overwrite=True).replaced is False


def test_other_inputs_go_to_another_folder(capsys, tmp_path, runs):
    out, ckpt = tmp_path / "out", str(runs / "a" / "ckpt")
    for extra in ((), ("--tokens", "256")):
        rc, _, err = run(capsys, "audit", ckpt, "--init", "--seq-len", "64", *extra, "--out-dir", str(out), "-q")
        assert rc == 0, err
    assert len(list((out / "audits").glob("*/audit.json"))) == 2


def test_from_audit_checks_the_slug_against_the_source(capsys, tmp_path, runs):
    out = tmp_path / "out"
    for d in ("a", "b"):
        rc, _, err = run(capsys, "audit", str(runs / d / "ckpt"), *SMALL, "--out-dir", str(out), "-q")
        assert rc == 0, err
    slug_a = slug_of(str(runs / "a" / "ckpt"), *SMALL)
    slug_b = slug_of(str(runs / "b" / "ckpt"), *SMALL)
    before = snapshot(out)
    # B's audit, edited to carry A's slug: both are "ckpt" folders with the same method and inputs, so only
    # the numbers in A's folder tell them apart
    data = json.loads((out / "audits" / slug_b / "audit.json").read_text())
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**data, "slug": slug_a}))
    rc, _, err = run(capsys, "audit", "--from-audit", str(edited), "--out-dir", str(out), "-q")
    assert rc == 2
    one_error(err, "holds another audit")
    # a slug that does not follow from the source at all
    edited.write_text(json.dumps({**data, "slug": "gpt2"}))
    rc, _, err = run(capsys, "audit", "--from-audit", str(edited), "--out-dir", str(out), "-q")
    assert rc == 2
    one_error(err, "does not follow from its source")
    assert snapshot(out) == before
    # re-rendering the folder's own audit refreshes it in place
    rc, _, err = run(capsys, "audit", "--from-audit", str(out / "audits" / slug_a), "--out-dir", str(out), "-q")
    assert rc == 0, err


def test_a_failed_push_leaves_the_earlier_local_audit(capsys, tmp_path, runs, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token
    out, ckpt = tmp_path / "out", str(runs / "a" / "ckpt")
    rc, _, err = run(capsys, "audit", ckpt, *SMALL, "--out-dir", str(out), "-q")
    assert rc == 0, err
    before = snapshot(out)
    rc, _, err = run(capsys, "audit", ckpt, *SMALL, "--push-to", "alice/x", "--out-dir", str(out), "-q")
    assert rc == 2
    one_error(err, "token")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- what can be published


def test_no_absolute_local_path_in_json_or_card(capsys, tmp_path, runs, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the checkpoint is outside the working directory: recorded by its name
    out = tmp_path / "out"
    rc, _, err = run(capsys, "audit", str(runs / "a" / "ckpt"), *SMALL, "--out-dir", str(out), "-q")
    assert rc == 0, err
    (audit,) = (out / "audits").glob("*/audit.json")
    card = out / "model_cards" / audit.parent.name / "README.md"
    for text in (audit.read_text(), card.read_text()):
        assert str(runs) not in text
    data = json.loads(audit.read_text())
    assert data["source"]["id"] == "ckpt" and data["command"].startswith("hf-rksp audit ckpt ")
    # inside the working directory: relative, so the command reproduces it from there
    monkeypatch.chdir(runs)
    rc, _, err = run(capsys, "audit", str(runs / "b" / "ckpt"), *SMALL, "--no-write", "-q")
    assert rc == 0, err


def test_relative_path_inside_the_working_directory(tmp_path, runs, monkeypatch):
    from hf_rksp.pipeline.slugs import portable_path

    monkeypatch.chdir(runs)
    assert portable_path(str(runs / "b" / "ckpt")) == os.path.join("b", "ckpt")
    assert portable_path("/somewhere/else/model.gguf") == "model.gguf"


# ----------------------------------------------------------------------------- degenerate audits


def test_exact_fit_is_flagged_and_gets_no_risk(capsys, tmp_path):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "audit", "gpt2", "--init", "--tokens", "10", "--seq-len", "10",
                          "--out-dir", str(out), "-q")
    assert rc == 0, err
    assert "exact fit" in err and err.startswith("hf-rksp: warning: degenerate audit")  # -q keeps our warnings
    data = json.loads((out / "audits" / slug_of("gpt2", "--init", "--tokens", "10", "--seq-len", "10")
                       / "audit.json").read_text())
    assert data["summary"]["degenerate"] == ["exact_fit"] and data["risk"] is None
    assert "exact fit" in data["risk_unavailable_reason"]
    card = next((out / "model_cards").glob("*/README.md")).read_text()
    assert "DEGENERATE AUDIT" in card


def test_enough_tokens_is_not_flagged(capsys):
    rc, stdout, err = run(capsys, "audit", "gpt2", "--init", "--tokens", "800", "--seq-len", "100", "--no-write",
                          "-q")
    assert rc == 0, err
    assert "degenerate" not in err and "exact fit" not in stdout


# ----------------------------------------------------------------------------- a quiet stderr


def test_transformers_config_warnings_stay_off_stderr(tmp_path):
    """In a fresh process (transformers adds its stderr handler on first use, which in-process tests may
    have done long before): its bos/eos_token_id warnings go to the debug log, not before our line."""
    import subprocess
    import sys

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100,
                               "bos_token_id": 5000, "eos_token_id": 5000, "n_positions": 64}))
    log = tmp_path / "debug.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), HF_RKSP_LOG=str(log))
    p = subprocess.run([sys.executable, "-m", "hf_rksp", "audit", "--config", str(cfg), "--tokens", "100",
                        "--seq-len", "100", "--no-write"], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 2
    one_error(p.stderr, "--seq-len 100")
    assert "bos_token_id must be" in log.read_text()  # said, to the debug log


def test_no_network_fails_fast_with_advice():
    """A hub id, online mode, an unreachable Hub: one line naming HF_HUB_OFFLINE=1 and --init (gpt2's config
    ships), in seconds rather than after huggingface_hub's ~30 s of retries (timed inside the process: the
    import of torch is not the probe's)."""
    import subprocess
    import sys

    script = ("import sys, time\nfrom hf_rksp.cli import main\nt = time.perf_counter()\n"
              "rc = main(['audit', 'gpt2', '--no-write', '-q'])\n"
              "print(f'{rc} {time.perf_counter() - t:.2f}')\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(Path(__file__).parents[1]))  # refused at once
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    rc, seconds = p.stdout.split()
    assert rc == "2" and float(seconds) < 5, (p.stdout, p.stderr)
    one_error(p.stderr, "cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE=1", "--init")


def test_full_disk_while_saving_progress_is_one_typed_line(capsys, tmp_path, runs, monkeypatch):
    """A real ENOSPC (the progress file's bytes go to /dev/full) while a streamed audit saves its progress: one
    worded line, not torch's 'enforce fail at inline_container.cc'.  The write is redirected in the process,
    not by a link in the output folder: a link there is refused before any work (issue 28)."""
    from conftest import interrupt_block

    out, ckpt = tmp_path / "out", str(runs / "a" / "ckpt")
    argv = ("audit", ckpt, *SMALL, "--stream", "--out-dir", str(out), "-q")
    with monkeypatch.context() as m:
        interrupt_block(m, 1)  # progress of block 0 kept; the rerun saves block 1's (of 3)
        rc, _, err = run(capsys, *argv)
    assert rc == 130, err
    (progress,) = (out / "audits" / ".partial").glob("*/progress.json")
    real, written = Path.write_bytes, []

    def to_full(self, data):  # the kernel's own ENOSPC, from the device that is always full
        written.append(self.name)
        return real(Path("/dev/full") if self.name == "activations.pt.tmp" else self, data)

    monkeypatch.setattr(Path, "write_bytes", to_full)
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "activations.pt.tmp" in written, err
    one_error(err, "could not save the progress", "No space left on device")
    assert progress.is_file(), "the progress saved before was lost"


# ----------------------------------------------------------------------------- a model in memory


def test_audit_of_a_model_in_memory_is_the_audit_of_its_checkpoint(tmp_path):
    """hf_rksp.audit(model) gives the same numbers as the audit of the same weights saved to a folder (both
    calibrated on the same seeded random ids), leaves the model's mode and weights alone, and writes under
    <name>__in-memory with no reproducing CLI command claimed."""
    import torch
    from conftest import tiny_config
    from transformers import AutoModel

    from hf_rksp import audit

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("gpt2"))
    model.save_pretrained(tmp_path / "saved")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mem = audit(model, tokens=128, seq_len=64, out_dir=str(tmp_path / "out"), progress=False, name="org/tiny")
    disk = audit(str(tmp_path / "saved"), tokens=128, seq_len=64, out_dir=None, progress=False)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert mem.record.inputs.sha256 == disk.record.inputs.sha256
    for a, b in zip(mem.record.blocks, disk.record.blocks):
        assert a.eigenvalues == b.eigenvalues and a.values == b.values
    assert mem.record.source.kind == "module" and mem.record.slug.startswith("org__tiny__in-memory")
    assert mem.record.command.startswith("hf_rksp.audit(model") and Path(mem.paths["card"]).is_file()


def test_audit_of_a_module_that_is_not_a_transformer_is_refused():
    import torch

    from hf_rksp import audit
    from hf_rksp.errors import ConfigError

    with pytest.raises(ConfigError, match="without a transformers config"):
        audit(torch.nn.Linear(4, 4), out_dir=None)
    with pytest.raises(ConfigError, match="`tokenizer` is for a model in memory"):
        audit("gpt2", init=True, tokenizer=object(), out_dir=None)


# ----------------------------------------------------------------------------- plots


@pytest.mark.parametrize("slug", ["gpt2__init", "sentence-transformers__all-MiniLM-L6-v2"])
def test_profile_plot_is_readable(slug):
    """Rendered for a shipped audit: both legends lie right of the axes (they hide no bar), M is a line of
    its own at the score, and the κ(V) axis shows at least two labelled ticks."""
    from hf_rksp.record.records import read_audit
    from hf_rksp.report.plots import profile_figure

    record = read_audit(Path(__file__).parents[1] / "audits" / slug)
    fig = profile_figure(record)
    fig.canvas.draw()
    mass, kappa = fig.axes[0], fig.axes[1]
    for ax in (mass, kappa):
        legend = ax.get_legend()
        assert legend is not None
        assert legend.get_window_extent().x0 >= mass.get_window_extent().x1
    m_lines = [ln for ln in mass.get_lines() if ln.get_label().startswith("mean near-unit mass M")]
    assert len(m_lines) == 1 and m_lines[0].get_ydata()[0] == pytest.approx(record.summary.score)
    lo, hi = kappa.get_ylim()
    labelled = [t for t in kappa.yaxis.get_ticklocs() if lo <= t <= hi]
    labelled += [t for t in kappa.yaxis.get_ticklocs(minor=True) if lo <= t <= hi
                 and any(lab.get_text() for lab in kappa.yaxis.get_minorticklabels())]
    assert len(labelled) >= 2, labelled
