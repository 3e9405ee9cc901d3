"""Risk of divergence: the learning rates an audit is read at, and the (absent) calibrated v2 model.

RKSP v1's logistic model (fitted on our first, non-paper sweep) is retired
with v1: its features no longer exist.  The paper itself fits no model: it
uses the layer-mean near-unit mass M_~1 as the score.  A calibrated v2 model
comes with the reproduction of the paper's sweep; until then ``risk`` is
null in every audit, with the reason.
"""

from __future__ import annotations

#: learning rate assumed when --lr is not given: the family's published pretraining peak
#: (GPT-2/-3 small 6e-4, LLaMA-2 3e-4, BERT 1e-4); everything else 3e-4.
DEFAULT_LR = {"gpt2": 6e-4, "llama": 3e-4, "mistral": 3e-4, "qwen2": 3e-4, "qwen3": 3e-4,
              "bert": 1e-4, "roberta": 1e-4}
FALLBACK_LR = 3e-4
UNAVAILABLE = ("the shipped risk model was fitted on RKSP v1 features and does not apply to v2; "
               "a v2 model comes with the reproduction of the paper's sweep")


def default_lr(family: str | None) -> float:
    """The family's typical pretraining peak learning rate (FALLBACK_LR for others)."""
    return DEFAULT_LR.get(family or "", FALLBACK_LR)
