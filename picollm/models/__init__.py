"""Model registry. Every model maps (B, T) token ids to (B, T, V) logits and supports stepwise
generation through the same two methods, so one sampling loop serves them all:

    state = model.new_state(batch_size, device)      # empty cache / zero (h, c) / empty history
    logits, state = model.step(idx, state)            # idx: (B, t) the tokens after those in state

`model.max_context` is the longest prefix a state may hold (None: unbounded).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

from ..config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.vocab_size <= 0:
        raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a model")
    if cfg.model == "lstm":
        from .lstm import LSTMLM
        return LSTMLM(cfg)
    if cfg.model == "kgram":
        from .kgram import KGramMLP
        return KGramMLP(cfg)
    from .transformer import Transformer
    return Transformer(cfg)


def num_params(model: nn.Module) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@contextmanager
def eval_mode(model: nn.Module):
    """model.eval() for the block, its earlier mode restored afterwards, on an error too."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
