"""Checks of a model config's sizes before anything is built from it."""

from __future__ import annotations

from hf_rksp.errors import RKSPError

#: config keys that size the model: each must be a positive integer when present
SIZE_KEYS = ("vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers",
             "num_attention_heads", "n_head", "intermediate_size", "n_inner", "max_position_embeddings",
             "n_positions", "num_key_value_heads", "head_dim", "d_ff", "image_size", "patch_size", "num_channels")


#: no real model has a dimension this large (a 7B model's vocabulary is 32k, its width 4096)
MAX_DIM = 2**24


#: nor this many blocks (the deepest published LLMs have ~120; building 2^24 modules alone would take hours)
MAX_LAYERS = 2**12


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def check_config(config, origin: str) -> None:
    """The size fields of a model config: positive integers within reason (0 or -1 crash deep in transformers)."""
    for key in SIZE_KEYS:
        v = getattr(config, key, None)
        if v is None:
            continue
        top = MAX_LAYERS if key in LAYER_KEYS else MAX_DIM
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= top:
            raise RKSPError(f"invalid config {origin}: {key} must be a positive integer up to {top}, got {v!r}")

