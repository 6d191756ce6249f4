"""torch.compile with a fallback: a compiler failure costs a message, not the run."""

from __future__ import annotations

from typing import Callable

import torch


def maybe_compile(model: torch.nn.Module, log: Callable[[str], None] = print) -> torch.nn.Module:
    """torch.compile(model), or the model itself with a message when compilation is unavailable or fails
    (checked by compiling a tiny forward now rather than failing mid-training)."""
    try:
        compiled = torch.compile(model)
        cfg = getattr(model, "cfg", None) or getattr(getattr(model, "module", None), "cfg", None)
        T = min(8, getattr(cfg, "block_size", 8))
        device = next(model.parameters()).device
        with torch.no_grad():
            compiled(torch.zeros(1, T, dtype=torch.long, device=device))
        return compiled
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
        first = str(e).splitlines()[0][:100] if str(e) else ""
        log(f"note: torch.compile failed ({type(e).__name__}: {first}); running eagerly")
        return model
