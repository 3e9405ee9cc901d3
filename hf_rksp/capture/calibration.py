"""Calibration inputs: the token ids every audit runs on, and their provenance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from hf_rksp.errors import ConfigError, SourceError

DEFAULT_TEXT = "hf_rksp/data/calibration.txt"


@dataclass
class Calibration:
    input_ids: torch.Tensor  # the model input: (B, T) int64 token ids, or (B, C, H, W) float images
    origin: str  # "embedded-text", "text-file", "dataset", "random-token-ids", "synthetic-images"
    detail: dict
    input_name: str = "input_ids"  # keyword the model takes it as ("pixel_values" for images)
    positions_per_item: int | None = None  # residual-stream positions per image (patches + CLS)
    attention_mask: torch.Tensor | None = None  # (B, T) padded prompts: 1 = a token, 0 = padding

    @property
    def seq_len(self) -> int:
        return int(self.positions_per_item or self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        """Token states the snapshots hold (padding positions are not among them)."""
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return int(self.input_ids.shape[0]) * self.seq_len

    @property
    def sha256(self) -> str:
        return token_hash(self.input_ids)

    @property
    def distinct_tokens(self) -> int | None:
        """Distinct token ids among the tokens (padding not counted); None for images."""
        if self.input_name != "input_ids":
            return None
        ids = self.input_ids if self.attention_mask is None else self.input_ids[self.attention_mask.bool()]
        return int(torch.unique(ids).numel())


def token_hash(input_ids: torch.Tensor) -> str:
    """sha256 of the inputs (ids as little-endian int64, images as float32), row-major."""
    t = input_ids.cpu()
    arr = t.to(torch.int64).numpy().astype("<i8") if not t.is_floating_point() else t.float().numpy().astype("<f4")
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def default_text() -> str:
    return resources.files("hf_rksp").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def check_shape(tokens: int, seq_len: int) -> tuple[int, int]:
    """Validate --tokens/--seq-len and return (n_sequences, seq_len)."""
    if tokens < 2:
        raise ConfigError(f"`tokens` must be at least 2, got {tokens}", param="tokens")
    if seq_len < 1:
        raise ConfigError(f"`seq_len` must be positive, got {seq_len}", param="seq_len")
    seq_len = min(seq_len, tokens)
    if tokens % seq_len:
        raise ConfigError(
            f"`tokens` ({tokens}) must be a multiple of `seq_len` ({seq_len}): "
            "calibration text is cut into whole sequences with no padding", param="tokens"
        )
    return tokens // seq_len, seq_len


def _cut(ids: list[int], tokens: int, seq_len: int, what: str) -> torch.Tensor:
    n_seq, seq_len = check_shape(tokens, seq_len)
    if len(ids) < tokens:
        raise ConfigError(f"{what} gives only {len(ids)} tokens with this tokenizer; {tokens} requested (`tokens`)",
                          param="tokens")
    return torch.tensor(ids[:tokens], dtype=torch.int64).reshape(n_seq, seq_len)


def from_text(
    text: str, tokenizer, tokens: int, seq_len: int, origin: str, detail: dict | None = None, what: str | None = None
) -> Calibration:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Calibration(_cut(ids, tokens, seq_len, what or origin), origin, detail or {})


def from_embedded(tokenizer, tokens: int, seq_len: int) -> Calibration:
    text = default_text()
    detail = {"file": DEFAULT_TEXT, "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return from_text(text, tokenizer, tokens, seq_len, "embedded-text", detail)


#: the prompt set shipped as a stand-in for the paper's (which are not published): see data/SOURCES.md
DEFAULT_PROMPTS = "hf_rksp/data/prompts.txt"
#: the paper's prompts are at most this many tokens; longer ones are cut here (recorded) [ours]
PROMPT_MAX_TOKENS = 64


def from_prompts(path: str | Path | None, tokenizer, max_tokens: int = PROMPT_MAX_TOKENS) -> Calibration:
    """The paper's protocol for pretrained models (D.3): one prompt per line, each its own sequence from
    position 0, right-padded into one batch with an attention mask (padding never enters the snapshots).

    ``path`` None: the stand-in set shipped with the package.  Blank lines are skipped, repeats kept; each
    prompt is tokenized with the tokenizer's own special tokens (``add_special_tokens=True``: a BOS where the
    family adds one, none for GPT-2) and cut at ``max_tokens``.  Recorded: the file, its sha256, the number
    of prompts, how many were cut, and the special-token choice.
    """
    if path is None:
        text, name = resources.files("hf_rksp").joinpath("data/prompts.txt").read_text(encoding="utf-8"), \
            DEFAULT_PROMPTS
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"`prompts` file not found: {p}", param="prompts")
        try:
            text, name = p.read_text(encoding="utf-8"), str(p)
        except UnicodeDecodeError:
            raise ConfigError(f"`prompts` file is not UTF-8 text: {p}", param="prompts") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(prompts) < 1:
        raise ConfigError(f"`prompts` file {name} has no prompt (one per line)", param="prompts")
    rows = [tokenizer(q, add_special_tokens=True)["input_ids"] for q in prompts]
    cut = sum(len(r) > max_tokens for r in rows)
    rows = [r[:max_tokens] for r in rows]
    if sum(len(r) for r in rows) < 2:
        raise ConfigError(f"`prompts` file {name} gives fewer than 2 tokens", param="prompts")
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else \
        (getattr(tokenizer, "eos_token_id", None) or 0)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, :len(r)] = 1
    detail = {"file": name, "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "n_prompts": len(rows),
              "max_tokens": max_tokens, "prompts_cut": cut, "special_tokens": "tokenizer default",
              "padding": "right, masked out of the snapshots"}
    return Calibration(ids, "prompts", detail, attention_mask=mask)


#: --text is read and tokenized this many characters at a time at first, four times more each round
TEXT_CHUNK = 1 << 16
#: tokens beyond the ones kept that a round must yield, so cutting the text there cannot change the kept ones
TEXT_MARGIN = 64


def from_file(path: str | Path, tokenizer, tokens: int, seq_len: int) -> Calibration:
    """The first ``tokens`` tokens of a UTF-8 text file, read and tokenized incrementally.

    Only as much text as the tokens need is tokenized (a prefix cut at
    whitespace, grown until it yields TEXT_MARGIN more tokens than needed):
    memory and time follow --tokens, not the file's size.  The file is still
    read to its end, in chunks, for ``text_sha256`` and to check it is UTF-8.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`text` file not found: {p}", param="text")
    h = hashlib.sha256()
    try:
        with open(p, encoding="utf-8") as f:  # text mode: the same newlines as read_text()
            ids = _prefix_ids(f, h, tokenizer, tokens)
            for rest in iter(lambda: f.read(1 << 20), ""):
                h.update(rest.encode())
    except UnicodeDecodeError:
        raise ConfigError(f"`text` file is not UTF-8 text: {p}", param="text") from None
    except OSError as e:
        raise ConfigError(f"`text` file cannot be read: {p}: {e.strerror or e}", param="text") from e
    detail = {"file": str(p), "text_sha256": h.hexdigest()}
    return Calibration(_cut(ids, tokens, seq_len, f"`text` file {p}"), "text-file", detail)


def _prefix_ids(f, h, tokenizer, tokens: int) -> list[int]:
    """Token ids of the shortest whitespace-cut prefix of ``f`` that yields tokens + TEXT_MARGIN ids (or all)."""
    text, size = "", TEXT_CHUNK
    while True:
        chunk = f.read(size)
        h.update(chunk.encode())
        text += chunk
        if len(chunk) < size:  # end of file: the whole text
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = max(text.rfind(" "), text.rfind("\n"))
        ids = tokenizer(text[:cut] if cut > 0 else text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens + TEXT_MARGIN:
            return ids
        size = 3 * len(text)  # the text read so far grows fourfold each round


def from_dataset(
    name: str, split: str, column: str, tokenizer, tokens: int, seq_len: int, config_name: str | None = None
) -> Calibration:
    """Rows of a ``datasets`` dataset joined by blank lines until enough tokens are gathered."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for missing/offline/bad names
        raise SourceError(f"could not load dataset {name!r} split {split!r}: {e}") from e
    ids: list[int] = []
    rows = 0
    for row in ds:
        if column not in row:
            raise SourceError(f"dataset {name!r} has no column {column!r}; columns: {', '.join(row)}")
        text = row[column]
        if not isinstance(text, str) or not text.strip():
            continue
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        rows += 1
        if len(ids) >= tokens:
            break
    detail = {"dataset": name, "config": config_name, "split": split, "column": column, "rows_used": rows}
    return Calibration(_cut(ids, tokens, seq_len, f"dataset {name!r}"), "dataset", detail)


def random_ids(vocab_size: int, tokens: int, seq_len: int, seed: int) -> Calibration:
    """Uniform token ids from a seeded generator, for --init without a tokenizer."""
    n_seq, seq_len = check_shape(tokens, seq_len)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n_seq, seq_len), generator=g, dtype=torch.int64)
    return Calibration(ids, "random-token-ids", {"vocab_size": vocab_size, "seed": seed})


def synthetic_images(
    n_tokens: int, channels: int, size: int, patch: int, seed: int, cls_tokens: int = 1
) -> Calibration:
    """Seeded smooth random images in [-1, 1] (a ViT processor's output range), for vision models.

    Each image is bilinear-upsampled low-resolution noise: spatially correlated
    like natural images, unlike white noise.  ``n_tokens`` residual positions
    are rounded down to whole images of (size / patch)^2 + cls_tokens positions.
    """
    per_image = (size // patch) ** 2 + cls_tokens
    n_images = n_tokens // per_image
    if n_images < 1:
        raise ConfigError(f"`tokens` {n_tokens} is less than one image ({per_image} positions)", param="tokens")
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n_images, channels, max(2, size // 8), max(2, size // 8), generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    images = images + 0.1 * (torch.rand(n_images, channels, size, size, generator=g) * 2 - 1)
    return Calibration(images.clamp(-1, 1), "synthetic-images",
                       {"image_size": size, "patch_size": patch, "n_images": n_images, "seed": seed},
                       input_name="pixel_values", positions_per_item=per_image)
