"""What every model family shares: counting parameters and switching to eval mode for a block."""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


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
