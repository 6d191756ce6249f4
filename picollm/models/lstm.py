"""LSTM language model: embedding -> nn.LSTM (batch-first) -> linear head.
Generation carries (h, c), so each new token costs the same however long the prefix."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..device import cpu_runs_bf16_rnn


class LSTMLM(nn.Module):
    max_context = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.lstm = nn.LSTM(cfg.n_embd, cfg.hidden_size, num_layers=cfg.lstm_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits, _ = self.step(idx, None)
        return logits

    def new_state(self, batch_size: int, device) -> None:
        return None  # nn.LSTM starts from zeros

    def step(self, idx: torch.Tensor, state):
        x = self.embedding(idx)  # (B, t, C)
        if x.is_cpu and torch.is_autocast_enabled("cpu") and not cpu_runs_bf16_rnn():
            with torch.autocast("cpu", enabled=False):  # oneDNN has no bf16 LSTM without AVX-512: fp32 here
                out, state = self.lstm(x.float(), state)
        else:
            out, state = self.lstm(x, state)  # (B, t, H), ((L, B, H), (L, B, H))
        return self.head(out), state  # (B, t, V)

    def flops_per_token(self) -> int:
        """Matmul FLOPs per trained token (forward + backward = 3x forward), embedding lookups excluded."""
        c = self.cfg
        fwd = 0
        for layer in range(c.lstm_layers):
            inp = c.n_embd if layer == 0 else c.hidden_size
            fwd += 2 * 4 * c.hidden_size * (inp + c.hidden_size)
        fwd += 2 * c.hidden_size * c.vocab_size
        return 3 * fwd
