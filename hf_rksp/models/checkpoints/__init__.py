"""Checkpoints read a few tensors at a time, behind one protocol (:class:`Checkpoint`).

- ``safetensors.py``: a local safetensors directory (one file, or shards with an index);
- ``gguf.py`` (with ``dequant.py``): a GGUF file, de-quantized by name in torch;
- ``hub.py``: the shards of a Hub repo, downloaded (or range-read) on first use.

:class:`hf_rksp.models.weights.CheckpointWeights` materializes a model's blocks from any of them; a new
format is one module here that implements the protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Checkpoint(Protocol):
    """What streaming needs from a checkpoint."""

    #: every tensor key the checkpoint holds (mapped to where it lives: a shard, a GGUF tensor...)
    files: Mapping[str, object]
    #: tensor key -> shape, for the keys whose shape is known without reading them (may be empty)
    shapes: Mapping[str, tuple[int, ...]]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``."""

    def expect(self, keys: Iterable[str]) -> None:
        """The keys that will be read (a checkpoint may free what no later read needs)."""

    def progress(self) -> dict[str, str]:
        """What a progress bar may show about reading (e.g. shards fetched); empty when nothing."""
