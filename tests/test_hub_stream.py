"""Streaming from the Hub, shard by shard, through the real huggingface_hub client against tests/fakehub.py."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
from conftest import slug_of
from fakehub import FakeHub
from test_streaming import SMALL, sharded_checkpoint

from hf_rksp import audit
from hf_rksp.cli.commands import main

TOKEN = "hf_streamtoken_8d2e41b7a9"
REPO = "someorg/tiny-llama"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return sharded_checkpoint("llama", tmp_path_factory.mktemp("hubckpt") / "tiny-llama")


def repo_files(ckpt: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def server():
    """One fake Hub for the module (each test resets transformers' shared HfApi to reach it: see hub_env)."""
    with FakeHub() as hub:
        yield hub


@pytest.fixture
def hub_env(monkeypatch, tmp_path, server):
    """``use(files)``: the real client pointed at the fake Hub serving ``files`` ({repo: {path: bytes}}), with
    an empty HF cache of its own and a token in HF_TOKEN; returns (hub, cache)."""
    cache = tmp_path / "hf-cache"

    def use(files: dict):
        import transformers.utils.hub as transformers_hub

        hub = server
        hub.files, hub.requests = files, []
        # transformers keeps one HfApi for the process, holding the endpoint of the first test that made it:
        # made earlier in the suite it points at huggingface.co, unreachable offline, and every revision lookup
        # retried with back-off (47-95 s a test in the full suite); a fresh one for this test reaches the fake Hub
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no_cached_login"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        return hub, cache

    return use


def cache_bytes(cache: Path) -> int:
    """Bytes of the files in the HF cache: its blobs (snapshots only link to them)."""
    return sum(p.stat().st_size for p in cache.glob("*/blobs/*") if p.is_file())


def test_hub_stream_equals_local_and_fetches_shards_lazily(checkpoint, hub_env, monkeypatch):
    from hf_rksp.models.checkpoints.hub import HubCheckpoint

    local = audit(str(checkpoint), out_dir=None, stream=True, **SMALL)
    hub, _ = hub_env({REPO: repo_files(checkpoint)})
    seen = []  # (block, shards fetched so far) as each block is read
    real_read = HubCheckpoint.read

    def read(self, keys):
        out = real_read(self, keys)
        seen.append(len(self.fetched))
        return out

    monkeypatch.setattr(HubCheckpoint, "read", read)
    streamed = audit(REPO, out_dir=None, stream=True, **SMALL)
    assert streamed.data["blocks"] == local.data["blocks"]
    assert streamed.data["source"]["kind"] == "hub" and streamed.data["source"]["id"] == REPO
    gets = [r["path"].rsplit("/", 1)[-1] for r in hub.requests if r["method"] == "GET"]
    assert gets.index("model.safetensors.index.json") < min(gets.index(s) for s in gets if s.endswith(".safetensors"))
    n_shards = len(list(checkpoint.glob("*.safetensors")))
    assert n_shards >= 3 and seen[0] < n_shards and seen[-1] == n_shards  # not all shards before the first block
    auth = [{k.lower(): v for k, v in r["headers"].items()}.get("authorization") for r in hub.requests
            if ".safetensors" in r["path"]]
    assert auth and set(auth) == {f"Bearer {TOKEN}"}  # the token is sent with every weight request


def test_low_disk_keeps_one_shard_in_the_cache(checkpoint, hub_env, monkeypatch, tmp_path, capsys):
    """Measured after every download: the cache never holds more than the largest shard plus the small
    metadata files (the index, and config.json which transformers fetches)."""
    from hf_rksp.models.checkpoints.hub import HubCheckpoint

    local = audit(str(checkpoint), out_dir=None, stream=True, **SMALL)
    shards = sorted(checkpoint.glob("*.safetensors"))
    metadata = sum(p.stat().st_size for p in checkpoint.iterdir() if p.suffix != ".safetensors")
    limit = max(p.stat().st_size for p in shards) + metadata
    peaks = []
    real_download = HubCheckpoint._download

    def download(self, filename):
        path = real_download(self, filename)
        peaks.append(cache_bytes(cache))
        return path

    monkeypatch.setattr(HubCheckpoint, "_download", download)
    hub, cache = hub_env({REPO: repo_files(checkpoint)})
    rc = main(["audit", REPO, "--low-disk", "--tokens", "256", "--seq-len", "128", "--out-dir",
               str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(peaks) == len(shards) + 1 and max(peaks) <= limit, (peaks, limit)
    assert not list(cache.rglob("*.safetensors"))  # every shard deleted after its last block
    slug = slug_of(REPO, "--stream", "--tokens", "256", "--seq-len", "128")  # --low-disk implies --stream
    written = json.loads((tmp_path / "out" / "audits" / slug / "audit.json").read_text())
    assert written["blocks"] == local.data["blocks"] and "--stream" in written["command"]
    for text in (out, err, json.dumps(written)):
        assert TOKEN not in text
    assert not any(TOKEN.encode() in p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_missing_shard_and_full_disk_give_one_line(checkpoint, hub_env, monkeypatch, tmp_path, capsys):
    files = repo_files(checkpoint)
    missing = sorted(n for n in files if n.endswith(".safetensors"))[-1]
    cases = {"missing": ({k: v for k, v in files.items() if k != missing}, [missing, "missing from the repo"]),
             "full disk": (files, ["no space left", "--low-disk"])}
    for case, (served, words) in cases.items():
        if case == "full disk":
            import errno

            import huggingface_hub.file_download as fd

            def no_space(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(fd, "http_get", no_space)
        hub_env({REPO: served})
        out = tmp_path / case.replace(" ", "-")
        rc = main(["audit", REPO, "--stream", "--tokens", "256", "--seq-len", "128", "--out-dir", str(out), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("hf-rksp: error:") and len(err.strip().splitlines()) == 1, (case, err)
        assert all(w in err for w in words), (case, err)
        slug = slug_of(REPO, "--stream", "--tokens", "256", "--seq-len", "128")
        assert TOKEN not in err and not (out / "audits" / slug).exists(), case


def test_gguf_file_of_a_hub_repo_downloads_that_file_only(tmp_path, hub_env):
    from conftest import tiny_config
    from gguf_fixtures import tiny_llama_gguf
    from transformers import AutoModel

    torch.manual_seed(0)
    gguf = tiny_llama_gguf(tmp_path / "tiny.Q8_0.gguf", AutoModel.from_config(tiny_config("llama")))
    local = audit(str(gguf), out_dir=None, **SMALL)
    files = {"tiny.Q8_0.gguf": gguf.read_bytes(), "other.Q4_0.gguf": b"not fetched"}
    hub, _ = hub_env({REPO: files})
    by_option = audit(REPO, gguf_file="tiny.Q8_0.gguf", out_dir=None, **SMALL)
    by_path = audit(f"{REPO}/tiny.Q8_0.gguf", out_dir=None, stream=True, **SMALL)
    assert by_option.data["blocks"] == local.data["blocks"] == by_path.data["blocks"]
    assert "--gguf-file tiny.Q8_0.gguf" in by_option.data["command"]
    assert not any("other.Q4_0" in r["path"] for r in hub.requests)


def test_resume_from_the_hub_refuses_progress_of_another_commit(checkpoint, hub_env, monkeypatch, tmp_path,
                                                                 caplog):
    """A streamed hub audit interrupted at block 2; the repo then gets a new commit whose block-0 shard
    differs: the rerun starts over (one warning naming the revision) and equals a fresh audit of the new
    weights (issue 29: it resumed the old commit's progress)."""
    import shutil

    import fakehub
    from conftest import interrupt_block
    from test_streaming import _change_block0

    hub, _ = hub_env({REPO: repo_files(checkpoint)})
    out = tmp_path / "out"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        interrupt_block(m, 2)
        audit(REPO, out_dir=str(out), stream=True, **SMALL)
    assert list((out / "audits" / ".partial").glob("*/progress.json"))
    changed = tmp_path / "changed"
    shutil.copytree(checkpoint, changed)
    _change_block0(changed)
    hub.files = {REPO: repo_files(changed)}
    monkeypatch.setattr(fakehub, "COMMIT", "beef" + "1" * 36)
    caplog.clear()
    rerun = audit(REPO, out_dir=str(out), stream=True, **SMALL)
    assert "resumed_at_block" not in rerun.data["timings"]
    assert rerun.data["blocks"] == audit(str(changed), out_dir=None, stream=True, **SMALL).data["blocks"]
    said = [r.getMessage() for r in caplog.records if "other weights" in r.getMessage()]
    assert len(said) == 1 and "revision was 'c0ffee" in said[0] and "beef" in said[0], said
