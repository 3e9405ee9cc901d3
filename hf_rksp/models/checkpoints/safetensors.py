"""A safetensors checkpoint directory (one file or sharded with an index), read a few tensors at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hf_rksp.errors import SourceError


class SafetensorsCheckpoint:
    """Tensor names -> shard files of a (possibly sharded) safetensors checkpoint directory.

    The index and every shard's header are read and checked when it is opened
    (a few KB per shard), so a damaged checkpoint fails before any block runs.
    """

    def __init__(self, directory: str | Path):
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            files = {k: d / v for k, v in _weight_map(index).items()}
        elif (d / "model.safetensors").is_file():
            files = {k: d / "model.safetensors" for k in _header(d / "model.safetensors")}
        else:
            kinds = sorted({p.suffix for p in d.iterdir() if p.suffix in (".bin", ".pt", ".gguf")})
            hint = f" (found {', '.join(kinds)} weights: those can only be loaded whole)" if kinds else ""
            raise SourceError(f"streaming (`stream`, automatic for models over half the free RAM) needs a "
                              f"safetensors checkpoint in {d}{hint}")
        self.files, self.shapes = files, {}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise SourceError(f"checkpoint {d}: shard {shard.name} named in its index is missing")
            self.shapes.update(_header(shard))
        absent = [k for k in files if k not in self.shapes]
        if absent:
            raise SourceError(f"checkpoint {d}: {absent[0]} is in the index but not in {files[absent[0]].name}")

    def expect(self, keys) -> None:
        """Nothing to plan: every shard stays on disk."""

    def progress(self) -> dict[str, str]:
        return {}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        for f, keys in by_file.items():
            try:
                with safe_open(f, "pt") as h:
                    for k in keys:
                        out[k] = h.get_tensor(k)
            except Exception as e:  # SafetensorError, OSError: a shard damaged since it was opened
                raise SourceError(f"cannot read {', '.join(keys[:1])} from {f}: {_first_line(e)}") from e
        return out


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> shard map, checked: a JSON object whose weight_map maps names to file names."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise SourceError(f"{index} is not a valid safetensors index: {_first_line(e)}") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) and v and "/" not in v and v not in (".", "..")
            for k, v in weight_map.items()):
        raise SourceError(f"{index} has no valid weight_map (tensor name -> shard file)")
    return weight_map


def _header(shard: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a shard's header (safetensors checks the header and the file size)."""
    from safetensors import safe_open

    try:
        with safe_open(shard, "pt") as h:
            return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    except Exception as e:  # SafetensorError (corrupt header, bad length, truncated file) or OSError
        raise SourceError(f"{shard} is not a valid safetensors file: {_first_line(e)}") from e

