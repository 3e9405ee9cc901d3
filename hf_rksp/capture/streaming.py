"""Layer-major streaming: audit a checkpoint one block at a time (docs/guides/streaming.md).

The base model is built on the meta device; only the non-block weights
(embeddings, final norm) and one block's weights are ever materialized.  The
residual stream of every calibration token stays resident: block 0's inputs
(and the call arguments the model passes its blocks: masks, rotary
embeddings) are captured by a pre-hook that stops the forward before block 0;
then each block is loaded from the safetensors shards, run over all chunks,
profiled by the same spectral core as the whole-model audit, and dropped.
Each weight is read once; peak memory is about one block plus activations.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_rksp.capture.hooks import check_finite, hidden_in, hidden_out
from hf_rksp.errors import OutputError
from hf_rksp.models.weights import release
from hf_rksp.record.records import BlockRecord, audit_schema
from hf_rksp.utils import atomic

logger = logging.getLogger("hf_rksp")


class _StopForward(Exception):
    pass


class ResumeState:
    """Per-block progress of a streamed audit: results so far and the residual stream entering the next block.

    Saved atomically after every block under ``directory``; ``key`` (a hash of
    the command, options and calibration tokens) guards against resuming a different
    audit, and ``weights`` (the identity of the weights read: files, sizes, mtimes,
    revision; ``hf_rksp.models.loading.weights_identity``) against resuming it on
    other weights: progress saved with other weights is removed, with one warning
    saying what changed.  Removed when the audit completes.  ``progress.json`` holds the
    blocks done as their audit-JSON objects (``BlockRecord.to_dict()``, the
    schema's block items), read back with ``BlockRecord.from_dict``.
    """

    def __init__(self, directory: Path, key: str, weights: dict | None = None):
        self.dir, self.key, self.weights = Path(directory), key, weights
        self.made: list[Path] = []  # the folders the first save created (an --out-dir too), deepest first

    def load(self, n_blocks: int, n_chunks: int) -> tuple[int, list[BlockRecord], list[torch.Tensor]] | None:
        """The saved progress, or None when there is none or it is not this audit's, or damaged (start over)."""
        meta, acts = self.dir / "progress.json", self.dir / "activations.pt"
        if not (meta.is_file() and acts.is_file()):
            return None
        m, hidden = {}, None
        try:
            m = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(m, dict) or m.get("key") != self.key:
                return None
            if m.get("weights") != self.weights:
                logger.warning("the saved progress in %s was made with other weights (%s): starting over",
                               self.dir, weights_change(m.get("weights"), self.weights))
                self.clear()
                return None
            nxt, results = m.get("next_block"), m.get("results")
            if isinstance(nxt, int) and not isinstance(nxt, bool) and 0 < nxt < n_blocks \
                    and _valid_results(results, nxt):
                hidden = torch.load(acts, weights_only=True)
        except (OSError, ValueError, RuntimeError, RecursionError, EOFError, pickle.UnpicklingError):
            hidden = None
        if not (isinstance(hidden, list) and len(hidden) == n_chunks and all(torch.is_tensor(h) for h in hidden)
                and m.get("activations_sha") == _tensors_sha(hidden)):
            logger.warning("the saved progress in %s is damaged or incomplete: starting over", self.dir)
            return None
        return nxt, [BlockRecord.from_dict(r) for r in results], hidden

    def save(self, next_block: int, results: list[BlockRecord], hidden: list[torch.Tensor]) -> None:
        """Write the progress atomically; a full or read-only disk is an OutputError (progress so far kept)."""
        try:
            if not self.dir.exists():
                self.made = [d for d in (self.dir, *self.dir.parents) if not d.exists()]
                self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / "activations.pt.tmp"
            buf = io.BytesIO()  # serialized first, then one plain write: a full disk is then an OSError here,
            torch.save([h.cpu() for h in hidden], buf)  # not torch's "enforce fail at inline_container.cc"
            tmp.write_bytes(buf.getbuffer())
            tmp.replace(self.dir / "activations.pt")
            atomic.write_json(self.dir / "progress.json", {"key": self.key, "weights": self.weights,
                                                           "next_block": next_block,
                                                           "activations_sha": _tensors_sha(hidden),
                                                           "results": [r.to_dict() for r in results]})
        except OSError as e:
            (self.dir / "activations.pt.tmp").unlink(missing_ok=True)
            if not (self.dir / "progress.json").is_file():
                self.clear()  # nothing saved yet: nothing to resume from
            raise OutputError(f"could not save the progress of block {next_block - 1} under {self.dir}: "
                              f"{e.strerror or e}; free space and rerun the same command to resume") from None

    def clear(self) -> None:
        """Remove the progress, ``.partial/`` once empty, and the folders its first save created, if empty."""
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        for d in (self.dir.parent, *self.made[1:]):
            try:
                d.rmdir()
            except OSError:
                pass


def weights_change(saved, now) -> str:
    """What differs between two weights identities, in a few words (the first difference found)."""
    if not isinstance(saved, dict):
        return "the progress does not record its weights"
    for k in sorted(set(saved) | set(now or {})):
        a, b = saved.get(k), (now or {}).get(k)
        if a == b:
            continue
        if k == "files" and isinstance(a, list) and isinstance(b, list):
            old = {f.get("file"): f for f in a if isinstance(f, dict)}
            for f in b:
                if f["file"] not in old:
                    return f"{f['file']} is new"
                if old[f["file"]] != f:
                    what = "size" if old[f["file"]].get("size") != f["size"] else "modification time"
                    return f"{f['file']} changed: its {what} differs"
            gone = sorted(set(old) - {f["file"] for f in b}, key=str)
            return f"{gone[0]} is gone" if gone else "the file list differs"
        if isinstance(a, dict) and isinstance(b, dict) and "file" in b:
            what = "size" if a.get("size") != b.get("size") else "modification time"
            return f"{b['file']} changed: its {what} differs"
        return f"{k} was {a!r}, is now {b!r}"
    return "unknown"


def _valid_results(results, n: int) -> bool:
    """``n`` block results as the audit schema wants them, indexed 0..n-1 (a tampered file fails this)."""
    import jsonschema


    if not isinstance(results, list) or len(results) != n:
        return False
    validator = jsonschema.Draft202012Validator(audit_schema()["properties"]["blocks"]["items"])
    return all(validator.is_valid(r) and r.get("index") == i for i, r in enumerate(results))


def _tensors_sha(hidden: list[torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in hidden:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def stream_snapshots_and_profile(
    model,
    blocks,
    block_path: str,
    weights,
    input_ids: torch.Tensor,
    profile_block,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = True,
    resume: ResumeState | None = None,
) -> tuple[list[BlockRecord], dict]:
    """Run ``model`` (on meta) block by block, its weights from ``weights``, and profile each block.

    ``weights`` is a :class:`CheckpointWeights` or :class:`InitWeights`.
    ``profile_block(i, x, y)`` turns one block's snapshots (N x d, float32) into
    its ``BlockRecord``, so the streamed and whole-model audits share every number.
    With ``resume``, progress is saved after every block and a saved state is
    picked up where it stopped.
    """
    names = [n for n, _ in model.named_parameters()]
    block_prefix = lambda i: f"{block_path}.{i}."  # noqa: E731
    outer = [n for n in names if not n.startswith(block_path + ".")]
    t0 = time.perf_counter()
    weights.outer(outer)

    # block 0's inputs and call arguments, per chunk; the forward stops before block 0
    chunks: list[tuple[torch.Tensor, tuple, dict]] = []

    def grab(_module, args, kwargs):
        h = hidden_in(args, kwargs)
        rest = dict(kwargs)
        rest.pop("hidden_states", None)
        chunks.append((h.detach(), tuple(args[1:]), rest))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            batch = batch.to(device)
            try:
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    release(model, outer)  # embeddings are only needed to make block 0's inputs
    timings = {"capture_s": time.perf_counter() - t0, "read_s": 0.0, "forward_s": 0.0, "spectral_s": 0.0}

    results: list[BlockRecord] = []
    start = 0
    saved = resume.load(len(blocks), len(chunks)) if resume is not None else None
    if saved is not None:
        start, results, hidden = saved
        chunks = [(h.to(device), a, k) for h, (_, a, k) in zip(hidden, chunks)]
        timings["resumed_at_block"] = start
    n_tok = int(input_ids.numel())
    bar = tqdm(range(start, len(blocks)), desc="blocks (streamed)", unit="block", disable=not progress,
               initial=start, total=len(blocks))
    for i in bar:
        t = time.perf_counter()
        bnames = [n for n in names if n.startswith(block_prefix(i))]
        weights.block(i, bnames)
        t_read = time.perf_counter()
        xs, outs = [], []
        for h, args, kwargs in chunks:
            check_finite(h, i, "entering")
            y = hidden_out(blocks[i](h, *args, **kwargs))
            check_finite(y, i, "leaving")
            xs.append(h.reshape(-1, h.shape[-1]).float().cpu())
            outs.append(y)
        release(model, bnames)
        t_fwd = time.perf_counter()
        x = torch.cat(xs)
        y_flat = torch.cat([o.reshape(-1, o.shape[-1]).float().cpu() for o in outs])
        results.append(profile_block(i, x, y_flat))
        chunks = [(o, a, k) for o, (_, a, k) in zip(outs, chunks)]
        t_spec = time.perf_counter()
        if resume is not None and i + 1 < len(blocks):
            resume.save(i + 1, results, [h for h, _, _ in chunks])
        timings["read_s"] += t_read - t
        timings["forward_s"] += t_fwd - t_read
        timings["spectral_s"] += t_spec - t_fwd
        timings["checkpoint_s"] = timings.get("checkpoint_s", 0.0) + time.perf_counter() - t_spec
        bar.set_postfix(tok_s=f"{n_tok / max(t_fwd - t_read, 1e-9):.0f}", near_unit=f"{results[-1].near_unit_mass:.3f}",
                        **getattr(weights, "progress", dict)())
    return results, timings
