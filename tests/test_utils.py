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
