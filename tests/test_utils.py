"""hf_rksp/utils and the old module paths (hf_rksp/_moved.py)."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch

from hf_rksp.errors import ConfigError, HubError
from hf_rksp.utils.checks import check_int, check_positive_float
from hf_rksp.utils.threads import torch_threads


def test_checks_name_their_parameter():
    check_int("tokens", 2, 2, 10)
    with pytest.raises(ConfigError, match="`tokens`: must be between 2 and 10, got 11") as e:
        check_int("tokens", 11, 2, 10)
    assert e.value.param == "tokens"
    with pytest.raises(ConfigError, match="integer"):
        check_int("seed", True, 0, 5)
    with pytest.raises(ConfigError, match="`lr`"):
        check_positive_float("lr", float("nan"))


def test_torch_threads_is_scoped():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(other):
            raise RuntimeError
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_hub_errors_carry_their_data_and_hide_the_token():
    from hf_rksp.utils.hub_errors import hub_error

    token = "hf_" + "x" * 34
    e = hub_error(ConnectionError(f"refused with {token}"), repo_id="a/b", action="upload", token=token)
    assert isinstance(e, HubError) and e.repo_id == "a/b" and token not in str(e) and "nothing was uploaded" in str(e)
    e = hub_error(OSError(28, "No space left on device"), repo_id="a/b", action="download",
                  filename="model-00001.safetensors")
    assert e.filename == "model-00001.safetensors" and "`low_disk`" in str(e)


@pytest.mark.parametrize("old, new", [("trainer", "training.trainer"), ("loading", "models.loading"),
                                      ("streaming", "capture.streaming"), ("kss", "training.kss")])
def test_old_module_paths_import_the_same_module_with_a_warning(old, new):
    sys.modules.pop(f"hf_rksp.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(f"hf_rksp.{old}")
    assert mod is importlib.import_module(f"hf_rksp.{new}")
    assert any(issubclass(w.category, DeprecationWarning) and f"hf_rksp.{new}" in str(w.message) for w in caught)


def test_hf_rksp_audit_stays_the_function():
    import hf_rksp

    assert callable(hf_rksp.audit) and hf_rksp.audit.__module__ == "hf_rksp.pipeline.run"
    for name in hf_rksp.__all__:
        assert getattr(hf_rksp, name) is not None


def _fake_token(n: int = 34) -> str:
    import random
    import string

    return "hf_" + "".join(random.SystemRandom().choices(string.ascii_letters + string.digits, k=n))


def test_token_detector_shapes_and_active_token(monkeypatch, tmp_path):
    """hf_ + 30 or more token characters is a token wherever it sits; 29 is not; the active token (any shape,
    8 characters or more) is found by equality; huggingface_hub's stored login counts as active."""
    import huggingface_hub.constants as hub_constants

    from hf_rksp.utils import secrets

    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    shaped = _fake_token()
    for text in (shaped, f"org/{shaped}", f"a{shaped}b", "hf_" + "a" * 30, f"path/to/{shaped}.txt"):
        assert secrets.has_secret(text, ()) and secrets.has_secret_bytes(text.encode(), ())
    for text in ("hf_" + "a" * 29, "hf_rksp", "HF_TOKEN", "hf_" + "a" * 15 + "_" + "b" * 15, "gpt2__init"):
        assert not secrets.has_secret(text, ()), text
    legacy = "api_" + "q" * 20
    assert not secrets.has_secret(f"org/{legacy}")  # no active token yet
    monkeypatch.setenv("HF_TOKEN", legacy)
    assert secrets.has_secret(f"org/{legacy}") and secrets.active_tokens() == (legacy,)
    monkeypatch.setenv("HF_TOKEN", "short")  # under MIN_ACTIVE: not looked for
    assert not secrets.has_secret("a short name")
    monkeypatch.delenv("HF_TOKEN")
    stored = "stored_" + "z" * 20
    (tmp_path / "token").write_text(stored)  # what `hf auth login` writes
    assert stored in secrets.active_tokens() and secrets.has_secret(f"x{stored}x")


def test_redact_leaves_no_token_and_no_value():
    from hf_rksp.utils.secrets import MASK, redact

    shaped, active = _fake_token(40), "legacy-token-value-1234"
    text = f"push to {shaped}/x with {active} at {shaped}"
    out = redact(text, (active,))
    assert shaped not in out and active not in out and out.count(MASK) == 3
    assert redact("nothing secret here", (active,)) == "nothing secret here"


def test_check_no_secret_names_the_parameter_never_the_value(monkeypatch):
    from hf_rksp.errors import SecretError
    from hf_rksp.utils.checks import (
        check_hub_id,
        check_no_secret,
        check_repo_id,
        check_revision,
    )

    token = _fake_token()
    monkeypatch.setenv("HF_TOKEN", token)
    for check, value, param in ((check_hub_id, f"{token}/x", "repo_id"), (check_revision, token, "revision"),
                                (check_repo_id, f"org/x{token}", "push_to"),
                                (check_no_secret, f"/data/{token}/ckpt", "source")):
        with pytest.raises(SecretError) as e:
            check(value, param) if check is not check_revision else check(value)
        assert e.value.param == param and f"`{param}`" in str(e.value) and token not in str(e.value)
    check_repo_id("alice/audits", "repo_id")
    with pytest.raises(ConfigError, match="`push_to`: must look like USER/NAME"):
        check_repo_id("alice", "push_to")


def test_cli_redacts_errors_and_the_debug_log(monkeypatch, tmp_path):
    """The one place messages are worded: the error line, an unexpected error and a debug-log record (its
    traceback included) hold no token."""
    import logging

    from hf_rksp.cli.errors import RedactingFormatter, redacted, unexpected

    token = _fake_token()
    monkeypatch.setenv("HF_TOKEN", token)
    assert token not in redacted(f"x {token} y") and "hf_" + "a" * 31 not in redacted("hf_" + "a" * 31)
    assert token not in unexpected(RuntimeError(f"request with Bearer {token} failed"))
    fmt = RedactingFormatter("%(message)s")
    try:
        raise ValueError(f"deep inside: {token}")
    except ValueError as e:
        record = logging.LogRecord("hf_rksp", logging.DEBUG, __file__, 1, "token %s", (token,), (type(e), e, None))
    line = fmt.format(record)
    assert "deep inside" in line and "ValueError" in line and token not in line


def test_atomic_write_replaces_a_link_without_following_it(tmp_path):
    from hf_rksp.utils import atomic

    target = tmp_path / "outside.txt"
    target.write_text("keep me\n")
    link = tmp_path / "out" / "progress.json"
    link.parent.mkdir()
    link.symlink_to(target)
    atomic.write_json(link, {"a": 1})
    assert not link.is_symlink() and link.read_text() == '{\n  "a": 1\n}\n'
    assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in link.parent.iterdir()) == ["progress.json"]  # no temporary file left
