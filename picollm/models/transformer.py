"""Decoder-only Transformer. One file, read top to bottom: positional encodings and RMSNorm as free
functions / small modules, then attention, MLP, block, and the model with its KV cache.

Every architectural choice is a ModelConfig field: pos_emb (none | learned | sinusoidal | rope),
norm (rmsnorm | layernorm), norm_placement (pre | post), mlp (gelu | swiglu), bias, tie_weights.

Hook points (hooks.py; TransformerLens names, shapes for a forward over T tokens):
  hook_embed                  (B, T, C)  token embedding plus the learned / sinusoidal positions, before
                                         the embedding dropout (RoPE is applied to q and k instead)
  blocks.{i}.hook_resid_pre   (B, T, C)  the block's input
  blocks.{i}.attn.hook_q/k/v  (B, nh, T, hs)  q and k after RoPE
  blocks.{i}.attn.hook_pattern (B, nh, T, T_keys)  the softmax weights before dropout; hooking it
                                         switches that layer to the explicit softmax path
  blocks.{i}.attn.hook_z      (B, T, nh, hs)  each head's output before the output projection (every
                                         attention path has it: hooking z keeps SDPA / the CPU product)
  blocks.{i}.hook_attn_out    (B, T, C)  the attention's output (after the projection and its dropout)
  blocks.{i}.hook_resid_mid   (B, T, C)  pre-norm: x + attn_out; post-norm: ln_1(x + attn_out), the
                                         stream the MLP reads and adds to
  blocks.{i}.mlp.hook_pre     (B, T, H)  before the nonlinearity: fc(x) for gelu, the gate for swiglu
  blocks.{i}.mlp.hook_post    (B, T, H)  after it: gelu(fc(x)), or silu(gate) * up for swiglu
  blocks.{i}.hook_mlp_out     (B, T, C)  the MLP's output (after its dropout)
  blocks.{i}.hook_resid_post  (B, T, C)  the block's output (post-norm: after ln_2)
  ln_final.hook_normalized    (B, T, C)  what the head reads: ln_f's output (post-norm: the last block's)
In a KV-cache step() they fire too, over the t new tokens (q/k/v before they are written to the cache;
the pattern (B, nh, t, pos + t) over every cached key).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .hooks import HookPoint, setup_hook_points

# ----------------------------------------------------------------------------- positions


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed table of "Attention Is All You Need": even dims sin, odd dims cos. (n_pos, dim)"""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]  # (n_pos, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = pos * inv_freq  # (n_pos, ceil(dim/2))
    pe = torch.zeros(n_pos, dim)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return pe


def precompute_rope(head_size: int, n_pos: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles pos * theta^(-2i/hs), each (n_pos, hs/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)  # (n_pos, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hs) by position; cos/sin (..., hs/2) broadcast against x's halves, e.g. (T, hs/2)
    for x (B, nh, T, hs), or (T, 1, 1, hs/2) for the attention's (B, T, 2, nh, hs) q-and-k pair.

    Dimension i is paired with i + hs/2 (the "rotate half" layout of GPT-NeoX and HF Llama, so q/k
    weights export to HF without a permutation). Computed in x's dtype, as HF Llama does (under bf16
    autocast a float32 round trip here cost ~10% of a CPU training step).
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs/2) each
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., hs)


# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:  # torch's fused kernel: the same float32 math in one op
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


# ----------------------------------------------------------------------------- attention


def maybe_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that costs nothing when off (eval, or p = 0): no op is dispatched per token."""
    return F.dropout(x, p=p) if training and p else x


def causal_mask(t: int, start: int, device=None) -> torch.Tensor:
    """(t, start + t) bool, True where query start+i may attend to key j (j <= start + i)."""
    return torch.ones(t, start + t, dtype=torch.bool, device=device).tril(diagonal=start)


def explicit_attention(q, k, v, mask: torch.Tensor, dropout_p: float = 0.0, hook_pattern=None):
    """softmax(q k^T / sqrt(hs)) v with a boolean mask; hook_pattern(weights) sees (and may replace) the
    weights before dropout. Returns y (B, nh, t, hs)."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, t, Tk)
    att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att.float(), dim=-1).type_as(q)
    if hook_pattern is not None:
        att = hook_pattern(att)
    return F.dropout(att, p=dropout_p) @ v  # (B, nh, t, hs)


class CausalSelfAttention(nn.Module):
    # Whole-sequence attention on a CPU: the written-out product (False: SDPA everywhere)
    written_out_on_cpu = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd, self.head_size = cfg.n_head, cfg.n_embd, cfg.head_size
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout  # attention weights and the residual branch
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()

    def forward(self, x, rope=None, kv=None, start: int = 0):
        """x: (B, t, C) at positions start..start+t-1. rope: (cos, sin) for those positions.
        kv: this layer's (k, v) cache buffers (B, nh, block_size, hs), written in place; without
        one, start must be 0. Returns y (B, t, C); the attention weights are hook_pattern's."""
        B, t, C = x.size()
        qkv = self.qkv(x).view(B, t, 3, self.n_head, self.head_size)  # q, k, v heads side by side
        if rope is not None:  # q and k rotated together: (B, t, 2, nh, hs)
            qk = apply_rope(qkv[:, :, :2], *rope)
            q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)  # (B, nh, t, hs) each
        else:
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, nh, t, hs) each
        v = qkv[:, :, 2].transpose(1, 2)  # (B, nh, t, hs)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if kv is not None:
            k_buf, v_buf = kv
            k_buf[:, :, start:start + t] = k
            v_buf[:, :, start:start + t] = v
            k, v = k_buf[:, :, :start + t], v_buf[:, :, :start + t]  # (B, nh, start+t, hs)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if self.hook_pattern.hooked:  # only the explicit path computes the weights
            y = explicit_attention(q, k, v, causal_mask(t, start, x.device), dropout_p, self.hook_pattern)
        elif start == 0 and x.device.type == "cpu" and self.written_out_on_cpu:
            # On CPUs the written-out product is faster than SDPA's kernels at these sizes (measured on
            # T4 under bf16 autocast: ~15% of a training step); same math, no weights kept
            att_bias = torch.full((t, t), float("-inf"), dtype=q.dtype, device=x.device).triu(1)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size)) + att_bias  # (B, nh, t, t)
            y = F.dropout(att.softmax(dim=-1), p=dropout_p) @ v  # (B, nh, t, hs)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # after a cached prefix: one new query sees every key; t > 1 queries need the offset mask
            # (is_causal would align the triangle to the top-left corner, which is wrong here)
            mask = None if t == 1 else causal_mask(t, start, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        z = self.hook_z(y.transpose(1, 2))  # (B, t, nh, hs)
        y = self.proj(z.reshape(B, t, C))  # (B, t, C)
        return maybe_dropout(y, self.dropout, self.training)


# ----------------------------------------------------------------------------- MLP and block


def swiglu_hidden(n_embd: int) -> int:
    """8/3 * n_embd (same parameter count as a 4x GELU MLP) rounded up to a multiple of 16."""
    return 16 * math.ceil(8 * n_embd / 3 / 16)


class MLP(nn.Module):
    """gelu: proj(gelu(fc(x))), hidden 4C. swiglu: proj(silu(gate(x)) * up(x)), hidden
    swiglu_hidden(C); gate and up share one Linear (C -> 2H), gate first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = swiglu_hidden(cfg.n_embd) if self.swiglu else 4 * cfg.n_embd
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x):
        h = self.fc(x)  # (B, T, H) or (B, T, 2H)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)  # (B, T, H) each
            h = self.hook_post(F.silu(self.hook_pre(gate)) * up)
        else:
            h = self.hook_post(F.gelu(self.hook_pre(h)))
        return maybe_dropout(self.proj(h), self.dropout, self.training)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.hook_resid_pre = HookPoint()  # hook points registered in forward order, so listed in it
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint()
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x, rope=None, kv=None, start: int = 0):
        x = self.hook_resid_pre(x)
        if self.pre_norm:
            a = self.attn(self.ln_1(x), rope, kv, start)
            x = self.hook_resid_mid(x + self.hook_attn_out(a))
            x = x + self.hook_mlp_out(self.mlp(self.ln_2(x)))
        else:
            a = self.attn(x, rope, kv, start)
            x = self.hook_resid_mid(self.ln_1(x + self.hook_attn_out(a)))
            x = self.ln_2(x + self.hook_mlp_out(self.mlp(x)))
        return self.hook_resid_post(x)


# ----------------------------------------------------------------------------- model


@dataclass
class KVCache:
    """Generation state: keys/values of every layer, preallocated to block_size, filled in place."""

    k: torch.Tensor  # (L, B, nh, block_size, hs)
    v: torch.Tensor  # (L, B, nh, block_size, hs)
    pos: int = 0  # tokens seen so far


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.max_context = cfg.block_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        if cfg.pos_emb == "sinusoidal":
            # scaled to the token embeddings' RMS (init std 0.02; sin/cos have RMS 1/sqrt 2): unscaled, the
            # table drowns the tokens out at the start of training and the model barely learns
            table = sinusoidal_positions(cfg.block_size, cfg.n_embd) * (0.02 * math.sqrt(2.0))
            self.register_buffer("pos_table", table, persistent=False)
        if cfg.pos_emb == "rope":
            cos, sin = precompute_rope(cfg.head_size, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        # post-norm blocks end in a norm already; pre-norm needs one before the head
        self.ln_f = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.hook_normalized = HookPoint("ln_final.hook_normalized")  # ln_f may be a plain nn.LayerNorm
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # no bias, as in GPT-2 / Llama
        if cfg.tie_weights:
            self.head.weight = self.wte.weight

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        setup_hook_points(self)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> torch.Tensor:
        return self.wte.weight  # (V, C)

    def get_output_embeddings(self) -> torch.Tensor:
        return self.head.weight  # (V, C); the same tensor as the input embeddings when tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V). Activations: the hook points (module docstring, hooks.py)."""
        T = idx.size(1)
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}; "
                             f"feed at most the last {self.cfg.block_size} tokens")
        return self._run(idx, None, 0)

    def new_state(self, batch_size: int, device) -> KVCache:
        c = self.cfg
        shape = (c.n_layer, batch_size, c.n_head, c.block_size, c.head_size)
        dtype = self.wte.weight.dtype
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def step(self, idx: torch.Tensor, state: KVCache):
        """Feed idx (B, t), the tokens after the state.pos already cached; returns (logits (B, t, V),
        state). The cache is updated in place (the returned state is the same object); inference only."""
        t = idx.size(1)
        if state.pos + t > self.cfg.block_size:
            raise ValueError(f"KV cache full: {state.pos} cached + {t} new tokens > block_size "
                             f"{self.cfg.block_size}; start a new state with the last tokens")
        if idx.size(0) != state.k.size(1):
            raise ValueError(f"batch size {idx.size(0)} does not match the state's {state.k.size(1)}")
        logits = self._run(idx, state, state.pos)
        state.pos += t
        return logits, state

    def _run(self, idx, cache, start: int):
        t = idx.size(1)
        x = self.wte(idx)  # (B, t, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + t, device=idx.device))  # (t, C) broadcast
        elif self.cfg.pos_emb == "sinusoidal":
            x = x + self.pos_table[start:start + t].to(x.dtype)
        x = maybe_dropout(self.hook_embed(x), self.cfg.dropout, self.training)
        rope = None
        if self.cfg.pos_emb == "rope":  # (t, 1, 1, hs/2): broadcast over batch, {q, k} and heads
            rope = (self.rope_cos[start:start + t, None, None], self.rope_sin[start:start + t, None, None])
        for i, block in enumerate(self.blocks):
            x = block(x, rope, (cache.k[i], cache.v[i]) if cache is not None else None, start)
        return self.head(self.hook_normalized(self.ln_f(x)))  # (B, t, V)

    def flops_per_token(self) -> int:
        """Exact matmul FLOPs per trained token, 3x forward (backward = 2x forward): every Linear
        (head included, embedding and position lookups excluded) plus the attention matmuls
        q k^T and att v over the full block_size (not halved for the causal mask). This equals
        nanoGPT's 6N + 12 L H Q T with N the Linear parameter count."""
        c = self.cfg
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attention = c.n_layer * 2 * (2 * c.block_size * c.n_embd)  # q k^T and att v, 2 FLOPs per MAC
        return 3 * (2 * linear + attention)
