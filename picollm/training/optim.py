"""The optimisers and the learning-rate schedule.

    adamw  AdamW on every parameter; weight decay on matrices only (not on biases and norm weights), as nanoGPT
    auto   (the default) muon for the Transformer, adamw for the LSTM and the k-gram MLP: Muon reached a lower
           test loss than AdamW at equal steps and at equal wall-clock on English text (bench/RESULTS.md)
    muon   torch.optim.Muon (momentum, Newton-Schulz orthogonalised updates) on the Transformer blocks' 2-D
           matrices, AdamW on the rest: embeddings, head, norms, biases, sinks, the experts' 3-D weights
           (the split of the modded-nanogpt speedrun). Muon's learning rate is adjusted to match AdamW's
           update RMS (adjust_lr_fn="match_rms_adamw"), so one --learning_rate and schedule serve both.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import TrainConfig
from ..errors import PicoError


def _adamw(params: list, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def muon_params(model: torch.nn.Module) -> Optional[list[torch.nn.Parameter]]:
    """The parameters Muon takes: the 2-D matrices inside the Transformer's blocks (None: a model with
    no blocks, which Muon does not serve)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return None
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


class MuonAdamW:
    """Muon and AdamW stepped as one optimizer: what the loop, GradScaler and checkpoints use of one
    (param_groups, step, zero_grad, state_dict, load_state_dict)."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd) != {"muon", "adamw"}:
            raise PicoError("the checkpoint's optimizer state is AdamW's alone; this run uses --optimizer muon")
        self.muon.load_state_dict(sd["muon"])
        self.adamw.load_state_dict(sd["adamw"])


def optimizer_name(model: torch.nn.Module, cfg: TrainConfig) -> str:
    """adamw or muon: --optimizer, with auto resolved (muon for the Transformer, adamw for the others)."""
    if cfg.optimizer == "auto":
        return "muon" if muon_params(model) is not None else "adamw"
    return cfg.optimizer


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str):
    """The run's optimizer (module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name(model, cfg) == "adamw":
        return _adamw(params, cfg, device)
    hidden = muon_params(model)
    if hidden is None:
        raise PicoError(f"--optimizer muon is for the Transformer's hidden matrices; {type(model).__name__} "
                        "trains with --optimizer adamw")
    ids = {id(p) for p in hidden}
    muon = torch.optim.Muon(hidden, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, _adamw([p for p in params if id(p) not in ids], cfg, device))


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr (or constant)."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    warm = min(cfg.warmup_steps, max(0, total_steps - 1))
    if step < warm:
        return cfg.learning_rate * (step + 1) / warm
    progress = (step - warm) / max(1, total_steps - warm)
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.learning_rate - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
