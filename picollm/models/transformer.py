"""Decoder-only Transformer. One file, read top to bottom: positional encodings and RMSNorm as free
functions / small modules, then attention, MLP, block, and the model with its KV cache.

Every architectural choice is a ModelConfig field: pos_emb (none | learned | sinusoidal | rope),
norm (rmsnorm | layernorm), norm_placement (pre | post), mlp (gelu | swiglu | relu2 | swiglu_oss), bias,
tie_weights; attention: n_kv_heads (grouped-query), sliding_window and window_pattern, attn_sinks, qk_norm;
logit_softcap; n_experts and experts_per_token (a mixture of experts instead of the dense MLP).

Hook points (hooks.py; TransformerLens names, shapes for a forward over T tokens):
  hook_embed                  (B, T, C)  token embedding plus the learned / sinusoidal positions, before
                                         the embedding dropout (RoPE is applied to q and k instead)
  blocks.{i}.hook_resid_pre   (B, T, C)  the block's input
  blocks.{i}.attn.hook_q      (B, nh, T, hs)  q after QK-norm and RoPE
  blocks.{i}.attn.hook_k/v    (B, n_kv_heads, T, hs)  k (after QK-norm and RoPE) and v, one per kv head
  blocks.{i}.attn.hook_pattern (B, nh, T, T_keys)  the softmax weights before dropout; hooking it
                                         switches that layer to the explicit softmax path
  blocks.{i}.attn.hook_z      (B, T, nh, hs)  each head's output before the output projection (every
                                         attention path has it: hooking z keeps SDPA / the CPU product)
  blocks.{i}.hook_attn_out    (B, T, C)  the attention's output (after the projection and its dropout)
  blocks.{i}.hook_resid_mid   (B, T, C)  pre-norm: x + attn_out; post-norm: ln_1(x + attn_out), the
                                         stream the MLP reads and adds to
  blocks.{i}.mlp.hook_pre     (B, T, H)  before the nonlinearity: fc(x) for gelu, the gate for swiglu
  blocks.{i}.mlp.hook_post    (B, T, H)  after it: gelu(fc(x)), or silu(gate) * up for swiglu
                                         (an MoE: (n, H) per expert, over the n tokens routed to it)
  blocks.{i}.mlp.hook_router  (B, T, E)  an MoE's router logits (the load-balancing loss reads them)
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


def causal_mask(t: int, start: int, device=None, window: int = 0) -> torch.Tensor:
    """(t, start + t) bool, True where query start+i may attend to key j: j <= start + i, and with a
    window W also j > start + i - W (the query's last W keys, itself included)."""
    mask = torch.ones(t, start + t, dtype=torch.bool, device=device).tril(diagonal=start)
    if window:
        mask = mask.triu(diagonal=start - window + 1)
    return mask


def explicit_attention(q, k, v, mask: torch.Tensor, dropout_p: float = 0.0, hook_pattern=None, sinks=None):
    """softmax(q k^T / sqrt(hs)) v with a boolean mask; hook_pattern(weights) sees (and may replace) the
    weights before dropout. sinks (nh,): a logit per head that joins each row's softmax and is then
    dropped, so a row's weights sum to less than 1 (gpt-oss). Returns y (B, nh, t, hs)."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, t, Tk)
    att = att.masked_fill(~mask, float("-inf")).float()
    if sinks is None:
        att = F.softmax(att, dim=-1)
    else:
        sink = sinks.float().view(1, -1, 1, 1).expand(*att.shape[:-1], 1)  # (B, nh, t, 1)
        att = F.softmax(torch.cat((att, sink), dim=-1), dim=-1)[..., :-1]
    att = att.type_as(q)
    if hook_pattern is not None:
        att = hook_pattern(att)
    return F.dropout(att, p=dropout_p) @ v  # (B, nh, t, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head, grouped-query (n_kv_heads < n_head: each kv head serves n_head / n_kv_heads query
    heads) or multi-query (n_kv_heads = 1) attention; optionally a sliding window, attention sinks and
    QK-norm. One Linear makes q, k and v: n_head q heads, then n_kv_heads k heads, then n_kv_heads v heads
    (with n_kv_heads = n_head, the C -> 3C layout of plain multi-head attention)."""

    # Whole-sequence attention on a CPU: the written-out product (False: SDPA everywhere)
    written_out_on_cpu = True

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = cfg.n_head, cfg.n_kv_heads, cfg.head_size
        self.n_embd = cfg.n_embd
        self.window = cfg.window(layer)
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_heads) * cfg.head_size, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm else None
        self.sinks = nn.Parameter(torch.zeros(cfg.n_head)) if cfg.attn_sinks else None
        self.dropout = cfg.dropout  # attention weights and the residual branch
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()

    def forward(self, x, rope=None, kv=None, start: int = 0):
        """x: (B, t, C) at positions start..start+t-1. rope: (cos, sin) for those positions.
        kv: this layer's (k, v) cache buffers (B, n_kv, block_size, hs), written in place; without
        one, start must be 0. Returns y (B, t, C); the attention weights are hook_pattern's."""
        B, t, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        heads = self.qkv(x).view(B, t, nh + 2 * nkv, hs)  # q heads, k heads, v heads
        qk = heads[:, :, : nh + nkv]  # (B, t, nh + nkv, hs)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, :nh]), self.k_norm(qk[:, :, nh:])), dim=2)
        if rope is not None:  # q and k heads rotated together
            qk = apply_rope(qk, *rope)
        q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)  # (B, nh, t, hs), (B, nkv, t, hs)
        v = heads[:, :, nh + nkv:].transpose(1, 2)  # (B, nkv, t, hs)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if kv is not None:
            k_buf, v_buf = kv
            k_buf[:, :, start:start + t] = k
            v_buf[:, :, start:start + t] = v
            k, v = k_buf[:, :, :start + t], v_buf[:, :, :start + t]  # (B, nkv, start+t, hs)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        if nkv != nh:  # each kv head serves nh / nkv consecutive query heads
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        window = self.window if self.window and self.window < start + t else 0  # a window past every key: none
        if self.hook_pattern.hooked or self.sinks is not None:  # only the explicit path computes the weights
            mask = causal_mask(t, start, x.device, window)
            y = explicit_attention(q, k, v, mask, dropout_p, self.hook_pattern, self.sinks)
        elif start == 0 and x.device.type == "cpu" and self.written_out_on_cpu:
            # On CPUs the written-out product is faster than SDPA's kernels at these sizes (measured on
            # T4 under bf16 autocast: ~15% of a training step); same math, no weights kept
            allowed = causal_mask(t, 0, x.device, window)
            att_bias = torch.zeros(t, t, dtype=q.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs)) + att_bias  # (B, nh, t, t)
            y = F.dropout(att.softmax(dim=-1), p=dropout_p) @ v  # (B, nh, t, hs)
        elif start == 0 and not window:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # after a cached prefix, or with a window: the mask of the offset triangle (is_causal would align
            # it to the top-left corner); one new query with no window sees every key
            mask = None if t == 1 and not window else causal_mask(t, start, x.device, window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        z = self.hook_z(y.transpose(1, 2))  # (B, t, nh, hs)
        y = self.proj(z.reshape(B, t, C))  # (B, t, C)
        return maybe_dropout(y, self.dropout, self.training)


# ----------------------------------------------------------------------------- MLP and block


def swiglu_hidden(n_embd: int) -> int:
    """8/3 * n_embd (same parameter count as a 4x GELU MLP) rounded up to a multiple of 16."""
    return 16 * math.ceil(8 * n_embd / 3 / 16)


GATED = ("swiglu", "swiglu_oss")  # MLPs whose fc makes a gate and an up half
OSS_ALPHA, OSS_LIMIT = 1.702, 7.0  # gpt-oss's SwiGLU: sigmoid(1.702 g) and the clamp at 7


def mlp_hidden(cfg: ModelConfig) -> int:
    """The hidden width of a (dense or expert) MLP: swiglu_hidden for the gated ones, else 4C."""
    return swiglu_hidden(cfg.n_embd) if cfg.mlp in GATED else 4 * cfg.n_embd


def activation(h: torch.Tensor, kind: str, hook_pre, hook_post) -> torch.Tensor:
    """The MLP's nonlinearity on fc's output h (B, T, H), or (B, T, 2H) for the gated kinds: gate, then up.
    swiglu_oss is gpt-oss's: the gate clamped above and up on both sides at 7, then
    g * sigmoid(1.702 g) * (up + 1)."""
    if kind in GATED:
        gate, up = h.chunk(2, dim=-1)  # (B, T, H) each
        gate = hook_pre(gate)
        if kind == "swiglu":
            return hook_post(F.silu(gate) * up)
        gate, up = gate.clamp(max=OSS_LIMIT), up.clamp(-OSS_LIMIT, OSS_LIMIT)
        return hook_post(gate * torch.sigmoid(OSS_ALPHA * gate) * (up + 1))
    if kind == "relu2":
        return hook_post(F.relu(hook_pre(h)).square())
    return hook_post(F.gelu(hook_pre(h)))


class MLP(nn.Module):
    """gelu: proj(gelu(fc(x))), hidden 4C. relu2: proj(relu(fc(x))^2), hidden 4C (modded-nanogpt).
    swiglu: proj(silu(gate(x)) * up(x)), hidden swiglu_hidden(C); gate and up share one Linear
    (C -> 2H), gate first. swiglu_oss: gpt-oss's variant of it (see activation)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = mlp_hidden(cfg)
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.kind in GATED else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x):
        h = activation(self.fc(x), self.kind, self.hook_pre, self.hook_post)  # (B, T, H)
        return maybe_dropout(self.proj(h), self.dropout, self.training)  # (B, T, C)


class MoE(nn.Module):
    """A routed mixture of n_experts MLPs (each as MLP, of the same width): the router's logits pick each
    token's experts_per_token experts, whose outputs are summed with the softmax of those K logits as
    weights (Mixtral, gpt-oss). Every token goes to its K experts: none is dropped for capacity.

    The load-balancing loss is computed outside the model (training/loop.py, `moe_aux_loss`) from
    hook_router, the router's logits (B, T, E): nothing else leaves forward but the logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.n_experts, self.k = cfg.mlp, cfg.n_experts, cfg.experts_per_token
        hidden = mlp_hidden(cfg)
        fc_out = 2 * hidden if self.kind in GATED else hidden
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=cfg.bias)
        # expert e: x (n, C) @ fc[e] (C, fc_out) -> activation -> @ proj[e] (H, C)
        self.fc = nn.Parameter(torch.empty(cfg.n_experts, cfg.n_embd, fc_out))
        self.proj = nn.Parameter(torch.empty(cfg.n_experts, hidden, cfg.n_embd))
        self.fc_bias = nn.Parameter(torch.zeros(cfg.n_experts, fc_out)) if cfg.bias else None
        self.proj_bias = nn.Parameter(torch.zeros(cfg.n_experts, cfg.n_embd)) if cfg.bias else None
        self.dropout = cfg.dropout
        self.hook_router, self.hook_pre, self.hook_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x):
        B, T, C = x.size()
        logits = self.hook_router(self.router(x))  # (B, T, E)
        top, chosen = logits.topk(self.k, dim=-1)  # (B, T, K) each
        weights = F.softmax(top.float(), dim=-1).type_as(x).view(-1, self.k)  # (N, K), N = B*T
        chosen = chosen.view(-1, self.k)
        xf = x.reshape(-1, C)  # (N, C)
        out = torch.zeros_like(xf)
        for e in range(self.n_experts):  # the tokens routed to e, in one matmul each way
            tok, slot = (chosen == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = xf[tok] @ self.fc[e].to(x.dtype)  # (n, fc_out)
            if self.fc_bias is not None:
                h = h + self.fc_bias[e].to(x.dtype)
            h = activation(h, self.kind, self.hook_pre, self.hook_post) @ self.proj[e].to(x.dtype)  # (n, C)
            if self.proj_bias is not None:
                h = h + self.proj_bias[e].to(x.dtype)
            out.index_add_(0, tok, h * weights[tok, slot, None])
        return maybe_dropout(out.view(B, T, C), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.hook_resid_pre = HookPoint()  # hook points registered in forward order, so listed in it
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint()
        self.ln_2 = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
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

    k: torch.Tensor  # (L, B, n_kv_heads, block_size, hs)
    v: torch.Tensor  # (L, B, n_kv_heads, block_size, hs)
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
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        # post-norm blocks end in a norm already; pre-norm needs one before the head
        self.ln_f = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.hook_normalized = HookPoint("ln_final.hook_normalized")  # ln_f may be a plain nn.LayerNorm
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # no bias, as in GPT-2 / Llama
        if cfg.tie_weights:
            self.head.weight = self.wte.weight

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight", "mlp.proj")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        setup_hook_points(self)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, MoE):  # as the dense MLP's Linears: fc at 0.02, proj scaled by depth below
            nn.init.normal_(module.fc, mean=0.0, std=0.02)

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
        shape = (c.n_layer, batch_size, c.n_kv_heads, c.block_size, c.head_size)
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
        if self.cfg.pos_emb == "rope":  # (t, 1, hs/2): broadcast over batch and the q and k heads
            rope = (self.rope_cos[start:start + t, None], self.rope_sin[start:start + t, None])
        for i, block in enumerate(self.blocks):
            x = block(x, rope, (cache.k[i], cache.v[i]) if cache is not None else None, start)
        logits = self.head(self.hook_normalized(self.ln_f(x)))  # (B, t, V)
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def flops_per_token(self) -> int:
        """Exact matmul FLOPs per trained token, 3x forward (backward = 2x forward): every Linear
        (head included, embedding and position lookups excluded) plus the attention matmuls
        q k^T and att v over the keys a query sees at full context: block_size, or the layer's window
        (not halved for the causal mask). With no MoE and no window this equals nanoGPT's
        6N + 12 L H Q T with N the Linear parameter count. An MoE counts its active parameters: the
        router and experts_per_token of its experts (what one token goes through)."""
        c = self.cfg
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        for m in self.modules():
            if isinstance(m, MoE):
                linear += m.k * (m.fc[0].numel() + m.proj[0].numel())
        keys = [min(c.window(i) or c.block_size, c.block_size) for i in range(c.n_layer)]
        attention = sum(2 * (2 * n * c.n_embd) for n in keys)  # q k^T and att v, 2 FLOPs per MAC
        return 3 * (2 * linear + attention)
