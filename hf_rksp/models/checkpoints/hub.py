"""A sharded safetensors checkpoint on the Hub, read shard by shard as the streamed audit reaches it.

The index (``model.safetensors.index.json``) comes first; each shard is
fetched with ``hf_hub_download`` (the HF cache, tokens, offline mode, retries
as usual) when the first block that needs it comes up, so the audit starts
after one shard instead of the whole model.  With ``low_disk`` at most one
shard is in the cache: a shard is deleted as soon as the tensors the audit
needs from it have been read, and a tensor needed from a shard other than the
one on disk (a 7B model's final norm sits in its last shard) is read with an
HTTP range request instead of downloading that shard early.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from hf_rksp.errors import SourceError
from hf_rksp.utils.hub_errors import INDEX, hub_error

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class HubCheckpoint:
    """``files``: tensor key -> shard name; ``read`` downloads shards (or ranges) on first use.

    ``needed`` are the keys the audit will read (a base model never reads a
    causal LM's head): a shard is done, and under ``low_disk`` deleted, once
    they are all read.
    """

    def __init__(self, repo_id: str, revision: str | None, *, low_disk: bool = False, local_only: bool = False):
        self.repo_id, self.revision, self.low_disk, self.local_only = repo_id, revision, low_disk, local_only
        self.index_path = self._download(INDEX)
        snapshot = Path(self.index_path).parent  # the HF cache's snapshots/<commit>/: the commit the index is of
        if snapshot.parent.name == "snapshots" and len(snapshot.name) == 40:
            self.revision = snapshot.name  # every shard from that commit, however the branch moves meanwhile
        index = json.loads(Path(self.index_path).read_text())
        self.files: dict[str, str] = index["weight_map"]
        self.shapes: dict[str, tuple[int, ...]] = {}  # shard headers are read with the shards: checked on read
        self.shards = sorted(set(self.files.values()))
        self.pending: dict[str, set[str]] = {s: set() for s in self.shards}
        self.on_disk: dict[str, Path] = {}
        self.fetched: set[str] = set()
        self.range_reads = 0

    @classmethod
    def open(cls, repo_id: str, revision: str | None, **kwargs) -> HubCheckpoint | None:
        """The checkpoint, or None when the repo has no index (a single-file checkpoint: fetched whole)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            hf_hub_download(repo_id, INDEX, revision=revision, local_files_only=kwargs.get("local_only", False))
        except EntryNotFoundError:
            return None
        except Exception:
            pass  # __init__ words it
        return cls(repo_id, revision, **kwargs)

    def expect(self, keys) -> None:
        """The keys the audit will read, so a shard's last use is known."""
        for k in keys:
            self.pending[self.files[k]].add(k)

    def _download(self, filename: str) -> str:
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(self.repo_id, filename, revision=self.revision, local_files_only=self.local_only)
        except Exception as e:
            raise hub_error(e, repo_id=self.repo_id, action="download", filename=filename) from e

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``: the shard on disk first, so it can be done with before the next one."""
        by_shard: dict[str, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self.files[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(by_shard, key=lambda s: s not in self.on_disk):
            wanted = by_shard[shard]
            if self.low_disk and shard not in self.on_disk and self.on_disk:
                out.update({k: self._range_read(shard, k) for k in wanted})
            else:
                out.update(self._read_shard(shard, wanted))
            self.pending[shard].difference_update(wanted)
            if self.low_disk and not self.pending[shard] and shard in self.on_disk:
                self._delete(shard)
        return out

    def _read_shard(self, shard: str, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        if shard not in self.on_disk:
            self.on_disk[shard] = Path(self._download(shard))
            self.fetched.add(shard)
        with safe_open(self.on_disk[shard], "pt") as f:
            return {k: f.get_tensor(k) for k in keys}

    def _delete(self, shard: str) -> None:
        """Remove a shard from the HF cache: the snapshot's link and the blob it points to."""
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.repo_id, shard, revision=self.revision)
        path = Path(cached) if isinstance(cached, str) else self.on_disk[shard]
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        del self.on_disk[shard]

    def _range_read(self, shard: str, key: str) -> torch.Tensor:
        """One tensor of a shard that is not on disk, by HTTP range requests (header, then its bytes)."""
        (n,) = struct.unpack("<Q", self._get_range(shard, 0, 8))
        info = json.loads(self._get_range(shard, 8, 8 + n))[key]
        start, end = info["data_offsets"]
        raw = self._get_range(shard, 8 + n + start, 8 + n + end)
        self.range_reads += 1
        return torch.frombuffer(bytearray(raw), dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])

    def _get_range(self, shard: str, start: int, end: int) -> bytes:
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(self.repo_id, shard, revision=self.revision)
        try:
            r = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes={start}-{end - 1}"},
                                  follow_redirects=True)
            r.raise_for_status()
        except Exception as e:
            raise hub_error(e, repo_id=self.repo_id, action="download", filename=shard) from e
        if len(r.content) != end - start:
            raise SourceError(f"the Hub sent {len(r.content)} bytes of {shard} for a {end - start}-byte range")
        return r.content

    def progress(self) -> dict[str, str]:
        """For the per-block bar: shards fetched so far, of all."""
        return {"shards": f"{len(self.fetched)}/{len(self.shards)}"}


def fetch_gguf(repo_id: str, filename: str, revision: str | None, local_only: bool) -> Path:
    """One GGUF file of a hub repo, from the HF cache or downloaded: the only file fetched."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_only))
    except Exception as e:
        raise hub_error(e, repo_id=repo_id, action="download", filename=filename) from e
