"""Facts about model families that are not in their configs: typical peak learning rates."""

from __future__ import annotations

#: learning rate assumed when --lr is not given: the family's published pretraining peak
#: (GPT-2/-3 small 6e-4, LLaMA-2 3e-4, BERT 1e-4); everything else 3e-4.
DEFAULT_LR = {"gpt2": 6e-4, "llama": 3e-4, "mistral": 3e-4, "qwen2": 3e-4, "qwen3": 3e-4,
              "bert": 1e-4, "roberta": 1e-4}


FALLBACK_LR = 3e-4


def default_lr(family: str | None) -> float:
    """The family's typical pretraining peak learning rate (FALLBACK_LR for others)."""
    return DEFAULT_LR.get(family or "", FALLBACK_LR)

