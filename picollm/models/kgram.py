"""k-gram MLP: the logits at position t depend only on the k tokens t-k+1..t (the current one included).

Positions before the start of the sequence are padding, written as the id -1 (PAD) in windows and
state, and contribute a zero vector: no one-hot bit, a zero embedding (an extra all-zero row,
`padding_idx`, that never receives a gradient). So a short prefix is not confused with a real token.

Variants (cfg.kgram_variant), all followed by the same network SiLU -> [Linear -> SiLU] x
num_inner_mlp_layers -> Linear(n_embd, V):
  onehot     the course starter's Linear(k*V, n_embd) on the k concatenated one-hot vectors, computed
             as the sum of k weight rows (an EmbeddingBag), never building the (k*V)-wide input;
  embedding  k token embeddings concatenated (k*n_embd) -> Linear(k*n_embd, n_embd);
  conv       token embeddings -> Conv1d(n_embd, n_embd, kernel k) over the left-padded sequence. Each
             output sees exactly one window, so it is the embedding variant's function class, run as
             a convolution over the sequence instead of over materialised windows.

Hook points (hooks.py), named as the Transformer's where they mean the same. Hidden layer j (0..n, n =
num_inner_mlp_layers) is SiLU(pre_j), with pre_0 the features and pre_j = Linear(post_{j-1}) after:
  hook_embed                (B, T, C)  the features: first-layer pre-activations (the variant's output)
  mlp.{j}.hook_pre          (B, T, C)  hidden layer j before the SiLU (mlp.0.hook_pre sees hook_embed's
                                       output, as a Transformer's resid_post and the next resid_pre do)
  mlp.{j}.hook_post         (B, T, C)  hidden layer j after the SiLU, before its dropout
  ln_final.hook_normalized  (B, T, C)  what the head (the last Linear) reads (there is no norm)
With kgram_chunk_size set, a forward with any hook attached runs unchunked, so that each hook fires once.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig
from .hooks import HookPoint, any_hooked, setup_hook_points

PAD = -1


class KGramMLP(nn.Module):
    max_context = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.k, V, C = cfg.kgram_k, cfg.vocab_size, cfg.n_embd
        self.variant = cfg.kgram_variant
        if self.variant == "onehot":
            # row j*V + v holds the column of Linear(k*V, C) for token v in window slot j; row k*V is PAD
            self.in_proj = nn.EmbeddingBag(self.k * V + 1, C, mode="sum", padding_idx=self.k * V)
            self.in_bias = nn.Parameter(torch.empty(C))
            bound = 1.0 / math.sqrt(self.k * V)  # nn.Linear(k*V, C)'s default init
            nn.init.uniform_(self.in_proj.weight, -bound, bound)
            nn.init.uniform_(self.in_bias, -bound, bound)
            with torch.no_grad():
                self.in_proj.weight[self.k * V].zero_()
        else:
            self.wte = nn.Embedding(V + 1, C, padding_idx=V)  # row V is PAD
            if self.variant == "embedding":
                self.in_proj = nn.Linear(self.k * C, C)
            else:
                self.in_proj = nn.Conv1d(C, C, kernel_size=self.k)
        layers: list[nn.Module] = [nn.SiLU(), nn.Dropout(cfg.dropout)]
        for _ in range(cfg.num_inner_mlp_layers):
            layers += [nn.Linear(C, C), nn.SiLU(), nn.Dropout(cfg.dropout)]
        layers.append(nn.Linear(C, V))
        self.net = nn.Sequential(*layers)
        self.hook_embed = HookPoint()
        self.mlp_hooks = nn.ModuleList(HookPoint(f"mlp.{j}.hook_{w}") for j in range(cfg.num_inner_mlp_layers + 1)
                                       for w in ("pre", "post"))
        self.hook_normalized = HookPoint("ln_final.hook_normalized")
        setup_hook_points(self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        history = idx.new_full((idx.size(0), self.k - 1), PAD)
        return self._logits(torch.cat([history, idx], dim=1))

    def new_state(self, batch_size: int, device) -> torch.Tensor:
        """The last k-1 tokens seen, (B, k-1), PAD where the sequence has not reached yet."""
        return torch.full((batch_size, self.k - 1), PAD, dtype=torch.long, device=device)

    def step(self, idx: torch.Tensor, state: torch.Tensor):
        ctx = torch.cat([state, idx], dim=1)  # (B, k-1+t)
        return self._logits(ctx), ctx[:, ctx.size(1) - (self.k - 1):]

    def _logits(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx (B, k-1+T): k-1 tokens of history (or PAD) then the T positions to predict from."""
        T = ctx.size(1) - (self.k - 1)
        chunk = self.cfg.kgram_chunk_size or T
        if chunk < T and any_hooked(self):
            chunk = T
        out = []
        for s in range(0, T, chunk):  # chunks only bound memory; each one is fully vectorised
            e = min(s + chunk, T)
            out.append(self._mlp(self._features(ctx[:, s:e + self.k - 1])))  # (B, e-s, V)
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        """features (B, t, C) -> logits (B, t, V): self.net layer by layer, between the hook points.
        Hidden layer j is [Linear (j >= 1),] SiLU, Dropout; the last Linear is the head."""
        layers, hooks = iter(self.net), iter(self.mlp_hooks)
        h = self.hook_embed(h)
        for j, (pre, post) in enumerate(zip(hooks, hooks)):  # (mlp.j.hook_pre, mlp.j.hook_post)
            if j:
                h = next(layers)(h)
            act, drop = next(layers), next(layers)
            h = drop(post(act(pre(h))))
        return next(layers)(self.hook_normalized(h))

    def _features(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx (B, k-1+t) -> first-layer pre-activations (B, t, C)."""
        k, V = self.k, self.cfg.vocab_size
        B = ctx.size(0)
        if self.variant == "onehot":
            win = ctx.unfold(1, k, 1)  # (B, t, k)
            rows = win + torch.arange(k, device=ctx.device) * V  # slot j, token v -> row j*V + v
            rows = torch.where(win == PAD, k * V, rows)
            t = rows.size(1)
            return (self.in_proj(rows.reshape(B * t, k)) + self.in_bias).view(B, t, -1)  # (B, t, C)
        x = self.wte(torch.where(ctx == PAD, V, ctx))  # (B, k-1+t, C)
        if self.variant == "embedding":
            win = x.unfold(1, k, 1)  # (B, t, C, k), a view
            win = win.transpose(2, 3).flatten(2)  # (B, t, k*C), slot-major like the one-hot input
            return self.in_proj(win)  # (B, t, C)
        return self.in_proj(x.transpose(1, 2)).transpose(1, 2)  # conv: (B, C, k-1+t) -> (B, t, C)

    def flops_per_token(self) -> int:
        """Matmul FLOPs per trained token (3x forward). Lookups are excluded, so the onehot variant's
        first layer (a sum of k rows) counts nothing; embedding/conv count 2*k*C*C for it."""
        c = self.cfg
        fwd = 2 * c.num_inner_mlp_layers * c.n_embd * c.n_embd + 2 * c.n_embd * c.vocab_size
        if self.variant != "onehot":
            fwd += 2 * self.k * c.n_embd * c.n_embd
        return 3 * fwd
