"""Model registry. Every model maps (B, T) token ids to (B, T, V) logits and supports stepwise
generation through the same two methods, so one sampling loop serves them all:

    state = model.new_state(batch_size, device)      # empty cache / zero (h, c) / empty history
    logits, state = model.step(idx, state)            # idx: (B, t) the tokens after those in state

`model.max_context` is the longest prefix a state may hold (None: unbounded).
"""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig
from .base import eval_mode, num_params
from .kgram import KGramMLP
from .lstm import LSTMLM
from .transformer import Transformer

__all__ = ["build_model", "eval_mode", "num_params", "KGramMLP", "LSTMLM", "Transformer"]
FAMILIES = {"lstm": LSTMLM, "kgram": KGramMLP, "transformer": Transformer}


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.vocab_size <= 0:
        raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a model")
    return FAMILIES[cfg.model](cfg)
