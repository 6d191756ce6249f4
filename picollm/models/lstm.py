"""LSTM language model: embedding -> nn.LSTM (batch-first) -> linear head.
Generation carries (h, c), so each new token costs the same however long the prefix.

Hook points (hooks.py), named as the Transformer's where they mean the same:
  hook_embed                  (B, T, C)  the token embedding
  blocks.{i}.hook_resid_post  (B, T, H)  layer i's output (before the dropout between layers); hooking
                                         one runs the layers one at a time (the same weights and math),
                                         otherwise the stack is a single nn.LSTM call
  ln_final.hook_normalized    (B, T, H)  what the head reads: the top layer's output (there is no norm)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..device import cpu_runs_bf16_rnn
from .hooks import HookPoint, setup_hook_points


class LSTMLM(nn.Module):
    max_context = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.lstm = nn.LSTM(cfg.n_embd, cfg.hidden_size, num_layers=cfg.lstm_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.hook_embed = HookPoint()
        self.hook_layers = nn.ModuleList(HookPoint(f"blocks.{i}.hook_resid_post") for i in range(cfg.lstm_layers))
        self.hook_normalized = HookPoint("ln_final.hook_normalized")
        setup_hook_points(self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits, _ = self.step(idx, None)
        return logits

    def new_state(self, batch_size: int, device) -> None:
        return None  # nn.LSTM starts from zeros

    def step(self, idx: torch.Tensor, state):
        x = self.hook_embed(self.embedding(idx))  # (B, t, C)
        run = self._layer_by_layer if any(hp.hooked for hp in self.hook_layers) else self.lstm
        if x.is_cpu and torch.is_autocast_enabled("cpu") and not cpu_runs_bf16_rnn():
            with torch.autocast("cpu", enabled=False):  # oneDNN has no bf16 LSTM without AVX-512: fp32 here
                out, state = run(x.float(), state)
        else:
            out, state = run(x, state)  # (B, t, H), ((L, B, H), (L, B, H))
        return self.head(self.hook_normalized(out)), state  # (B, t, V)

    def _layer_by_layer(self, x, state):
        """self.lstm(x, state), one layer at a time through its own weights, so that each layer's output
        passes through its hook point."""
        lstm = self.lstm
        if state is None:
            zeros = x.new_zeros(lstm.num_layers, x.size(0), lstm.hidden_size)
            state = (zeros, zeros)
        hs, cs = [], []
        for i, hook in enumerate(self.hook_layers):
            if i:
                x = nn.functional.dropout(x, lstm.dropout, self.training)
            weights = [getattr(lstm, f"{w}_l{i}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            x, h, c = torch.lstm(x, (state[0][i:i + 1], state[1][i:i + 1]), weights, True, 1, 0.0,
                                 self.training, False, True)  # (B, t, H), (1, B, H) x 2
            x = hook(x)
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs), torch.cat(cs))

    def flops_per_token(self) -> int:
        """Matmul FLOPs per trained token (forward + backward = 3x forward), embedding lookups excluded."""
        c = self.cfg
        fwd = 0
        for layer in range(c.lstm_layers):
            inp = c.n_embd if layer == 0 else c.hidden_size
            fwd += 2 * 4 * c.hidden_size * (inp + c.hidden_size)
        fwd += 2 * c.hidden_size * c.vocab_size
        return 3 * fwd
