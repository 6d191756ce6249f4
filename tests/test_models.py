"""Model-level tests: causality, cached decoding, attention paths, RMSNorm, k-gram one-hot equivalence,
overfitting one batch, presets and weight tying. Tiny configs, CPU."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from picollm.config import ModelConfig, resolve_model_config
from picollm.models import build_model, num_params
from picollm.models.transformer import RMSNorm, apply_rope, precompute_rope, swiglu_hidden

V = 53
BLOCK = 24
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 reassociation across paths; real bugs move logits by >1e-2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning
    threads per op slow this file from seconds to minutes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(model: str = "transformer", **kw) -> ModelConfig:
    cfg = dict(model=model, vocab_size=V, block_size=BLOCK, n_layer=2, n_embd=32, n_head=4)
    cfg.update(kw)
    return ModelConfig(**cfg)


def make(cfg: ModelConfig, seed: int = 0, sharp: bool = True) -> nn.Module:
    """A model in eval mode. sharp: re-draw transformer weights at O(1) scale, so attention is far from
    uniform and a wrong position or mask moves the logits by more than float tolerance (the 0.02
    init makes every token attend almost evenly, which hides such bugs)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    if sharp and cfg.model == "transformer":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 2.0 / p.size(-1) ** 0.5)
                else:
                    p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(B: int, T: int, seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# every value of every transformer option; bias and tying alternate across the matrix
TRANSFORMER_VARIANTS = [
    dict(pos_emb=p, norm=n, norm_placement=pl, mlp=m, bias=i % 4 in (0, 3), tie_weights=i % 3 != 0)
    for i, (p, n, pl, m) in enumerate(itertools.product(
        ("none", "learned", "sinusoidal", "rope"), ("rmsnorm", "layernorm"), ("pre", "post"), ("gelu", "swiglu")))
]
TRANSFORMER_CFGS = [tiny(**v) for v in TRANSFORMER_VARIANTS]
TRANSFORMER_IDS = ["-".join(str(x) for x in v.values()) for v in TRANSFORMER_VARIANTS]
KGRAM_CFGS = [tiny("kgram", kgram_variant=v, kgram_k=3) for v in ("onehot", "embedding", "conv")]
OTHER_CFGS = [tiny("lstm")] + KGRAM_CFGS
OTHER_IDS = ["lstm", "kgram-onehot", "kgram-embedding", "kgram-conv"]
ALL_CFGS = TRANSFORMER_CFGS + OTHER_CFGS
ALL_IDS = TRANSFORMER_IDS + OTHER_IDS


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("cfg", ALL_CFGS, ids=ALL_IDS)
@torch.no_grad()
def test_changing_a_token_changes_no_earlier_logit(cfg):
    model = make(cfg)
    T = 16
    idx = tokens(2, T)
    base = model(idx)
    assert base.shape == (2, T, V)
    for t in (0, 5, T - 1):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        out = model(changed)
        assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])  # the test can see a dependence
        if cfg.model == "kgram":  # and a k-gram sees nothing more than k tokens back
            assert_close(out[:, t + cfg.kgram_k:], base[:, t + cfg.kgram_k:], rtol=0, atol=0)


# ----------------------------------------------------------------------------- cached decoding


def greedy_cached(model, prompt, n):
    state = model.new_state(prompt.size(0), prompt.device)
    logits, state = model.step(prompt, state)
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        logits, state = model.step(nxt, state)
    return torch.cat(out, dim=1)


def greedy_full(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.size(1):]


@pytest.mark.parametrize("cfg", ALL_CFGS, ids=ALL_IDS)
@torch.no_grad()
def test_stepwise_decoding_matches_full_recomputation(cfg):
    model = make(cfg)
    idx = tokens(3, 20)
    full = model(idx)
    state = model.new_state(3, idx.device)
    pieces = []
    logits, state = model.step(idx[:, :6], state)  # prefill
    pieces.append(logits)
    for t in range(6, 11):  # one token at a time
        logits, state = model.step(idx[:, t:t + 1], state)
        pieces.append(logits)
    logits, state = model.step(idx[:, 11:], state)  # several tokens after a prefix
    pieces.append(logits)
    assert_close(torch.cat(pieces, dim=1), full, **TOL)
    assert torch.equal(greedy_cached(model, idx[:, :5], 12), greedy_full(model, idx[:, :5], 12))


@torch.no_grad()
def test_kv_cache_is_preallocated_and_written_in_place():
    cfg = tiny()
    model = make(cfg)
    state = model.new_state(2, "cpu")
    assert state.k.shape == (cfg.n_layer, 2, cfg.n_head, cfg.block_size, cfg.head_size)
    ptr = state.k.data_ptr()
    _, state = model.step(tokens(2, 5), state)
    _, state = model.step(tokens(2, 1), state)
    assert state.pos == 6 and state.k.data_ptr() == ptr
    assert state.k[:, :, :, :6].abs().sum() > 0 and state.k[:, :, :, 6:].abs().sum() == 0


@torch.no_grad()
def test_transformer_context_limits_raise():
    model = make(tiny(pos_emb="learned"))
    assert model.max_context == BLOCK
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, BLOCK + 1))
    state = model.new_state(1, "cpu")
    model.step(tokens(1, BLOCK - 2), state)
    with pytest.raises(ValueError, match="block_size"):
        model.step(tokens(1, 3), state)
    model.step(tokens(1, 2), state)  # exactly full is fine
    assert state.pos == BLOCK


# ----------------------------------------------------------------------------- attention paths


@pytest.mark.parametrize("cfg", TRANSFORMER_CFGS, ids=TRANSFORMER_IDS)
@torch.no_grad()
def test_sdpa_path_equals_explicit_attention_path(cfg, monkeypatch):
    from picollm.models.hooks import run_with_cache
    from picollm.models.transformer import CausalSelfAttention

    model = make(cfg)
    idx = tokens(2, 17)
    logits, cache = run_with_cache(model, idx, lambda name: name.endswith("hook_pattern"))  # the explicit path
    attn = list(cache.values())
    written_out = model(idx)  # the CPU fast path
    monkeypatch.setattr(CausalSelfAttention, "written_out_on_cpu", False)
    sdpa = model(idx)  # F.scaled_dot_product_attention
    assert_close(logits, sdpa, **TOL)
    assert_close(written_out, sdpa, **TOL)
    assert len(attn) == cfg.n_layer
    for att in attn:
        assert att.shape == (2, cfg.n_head, 17, 17)
        assert_close(att.sum(-1), torch.ones(2, cfg.n_head, 17))
        assert torch.all(att.triu(diagonal=1) == 0)


def test_dropout_is_active_in_training_only():
    from picollm.models.hooks import hooks_attached, run_with_cache

    model = make(tiny(dropout=0.2)).train()
    idx = tokens(2, 12)
    assert not torch.allclose(model(idx), model(idx))
    explicit = {f"blocks.{i}.attn.hook_pattern": lambda t, hook: None for i in range(2)}  # hooked: explicit path
    with hooks_attached(model, explicit):
        assert not torch.allclose(model(idx), model(idx))
    model.eval()
    assert_close(model(idx), run_with_cache(model, idx, list(explicit))[0])


@pytest.mark.parametrize("placement", ["pre", "post"])
@torch.no_grad()
def test_block_composes_norm_attention_mlp_as_configured(placement):
    model = make(tiny(pos_emb="none", norm="layernorm", norm_placement=placement, bias=True))
    blk = model.blocks[0]
    x = torch.randn(2, 9, 32)
    if placement == "pre":  # x + attn(norm(x)), then + mlp(norm(.)); a final norm before the head
        h = x + blk.attn(blk.ln_1(x))
        ref = h + blk.mlp(blk.ln_2(h))
        assert not isinstance(model.ln_f, nn.Identity)
    else:  # norm(x + attn(x)), then norm(. + mlp(.)); the last block already ends in a norm
        h = blk.ln_1(x + blk.attn(x))
        ref = blk.ln_2(h + blk.mlp(h))
        assert isinstance(model.ln_f, nn.Identity)
    assert_close(blk(x), ref)


def test_rope_scores_depend_only_on_relative_position():
    hs, n = 16, 40
    cos, sin = precompute_rope(hs, n, theta=10000.0)
    q, k = torch.randn(1, 1, 1, hs).expand(1, 1, n, hs), torch.randn(1, 1, 1, hs).expand(1, 1, n, hs)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # the same q and k placed at every position
    scores = rq[0, 0] @ rk[0, 0].T  # (n, n): q at position m, k at position j
    for offset in (0, 3, -5):
        diag = torch.diagonal(scores, offset)
        assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)
    assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation
    assert_close(rq[:, :, 0], q[:, :, 0])  # position 0 is the identity
    assert not torch.allclose(scores[0, 1], scores[0, 3])
    # reference: pair (i, i + hs/2) as a complex number, rotated by angle m * theta^(-2i/hs)
    x = torch.randn(2, 3, n, hs)
    angle = torch.arange(n)[:, None] * 10000.0 ** (-2 * torch.arange(hs // 2) / hs)  # (n, hs/2)
    z = torch.complex(x[..., :hs // 2], x[..., hs // 2:]) * torch.polar(torch.ones_like(angle), angle)
    assert_close(apply_rope(x, cos, sin), torch.cat([z.real, z.imag], dim=-1), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- RMSNorm


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    ours, ref = RMSNorm(32, eps=1e-6), nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32))
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 32) * 3
    assert_close(ours(x), ref(x))
    assert ours(x.bfloat16()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- k-gram


def test_onehot_kgram_equals_a_literal_onehot_linear():
    k, vocab = 3, 7
    model = make(tiny("kgram", vocab_size=vocab, kgram_k=k, kgram_variant="onehot", n_embd=16,
                      num_inner_mlp_layers=2))
    idx = tokens(2, 10, vocab=vocab)
    # the starter's formulation: k one-hot vectors (zeros before the start) flattened into Linear(k*V, C)
    padded = torch.cat([torch.full((2, k - 1), vocab), idx], dim=1)  # class `vocab` marks padding
    onehot = F.one_hot(padded.unfold(1, k, 1), vocab + 1)[..., :vocab].float()  # (B, T, k, V)
    first = nn.Linear(k * vocab, 16)
    with torch.no_grad():
        first.weight.copy_(model.in_proj.weight[:k * vocab].T)
        first.bias.copy_(model.in_bias)
    with torch.no_grad():
        ref = model.net(first(onehot.flatten(2)))  # (B, T, V)
        assert_close(model(idx), ref)


@pytest.mark.parametrize("cfg", KGRAM_CFGS, ids=OTHER_IDS[1:])
@torch.no_grad()
def test_kgram_chunk_size_does_not_change_outputs(cfg):
    whole = make(cfg)
    chunked = build_model(tiny("kgram", kgram_variant=cfg.kgram_variant, kgram_k=3, kgram_chunk_size=5)).eval()
    chunked.load_state_dict(whole.state_dict())
    idx = tokens(2, 17)
    assert_close(chunked(idx), whole(idx))
    state = chunked.new_state(2, "cpu")
    logits, _ = chunked.step(idx[:, 4:16], chunked.step(idx[:, :4], state)[1])
    assert_close(logits, whole(idx[:, :16])[:, 4:])


@pytest.mark.parametrize("k", [1, 2, 4])
@torch.no_grad()
def test_kgram_state_holds_the_last_k_minus_1_tokens(k):
    model = make(tiny("kgram", kgram_k=k, kgram_variant="embedding"))
    state = model.new_state(2, "cpu")
    assert state.shape == (2, k - 1) and torch.all(state == -1)
    idx = tokens(2, 6)
    _, state = model.step(idx, state)
    assert torch.equal(state, idx[:, 6 - (k - 1):])


# ----------------------------------------------------------------------------- training


OVERFIT = [
    (tiny(), 3e-3),
    (tiny(pos_emb="learned", norm="layernorm", norm_placement="post", mlp="gelu", bias=True), 3e-3),
    (tiny("lstm"), 1e-2),
] + [(c, 3e-3) for c in KGRAM_CFGS]


@pytest.mark.parametrize("cfg,lr", OVERFIT, ids=["transformer-pico", "transformer-post-gelu"] + OTHER_IDS)
def test_each_family_overfits_one_batch(cfg, lr):
    model = make(cfg, sharp=False).train()
    x = tokens(4, 17, seed=3)
    inp, tgt = x[:, :-1], x[:, 1:]
    windows = torch.cat([torch.full((4, 2), -1), inp], 1).unfold(1, 3, 1).reshape(-1, 3)
    assert len(torch.unique(windows, dim=0)) == windows.size(0)  # a 3-gram can fit this batch exactly
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(300):
        loss = F.cross_entropy(model(inp).flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05
    if cfg.model == "kgram" and cfg.kgram_variant == "onehot":  # the padding row stays exactly zero
        assert torch.all(model.in_proj.weight[cfg.kgram_k * V] == 0)


# ----------------------------------------------------------------------------- presets, tying, flops


def test_llama_preset_and_explicit_overrides():
    cfg = resolve_model_config(preset="llama", vocab_size=V)
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_weights) == ("rope", "rmsnorm", "swiglu", False, False)
    model = build_model(cfg)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert any(isinstance(m, RMSNorm) for m in model.modules())
    assert model.blocks[0].mlp.proj.in_features == swiglu_hidden(cfg.n_embd)
    over = resolve_model_config(preset="llama", vocab_size=V, pos_emb="learned", bias=True, tie_weights=None)
    assert (over.pos_emb, over.bias, over.tie_weights, over.norm) == ("learned", True, False, "rmsnorm")


def test_tied_head_shares_the_embedding_tensor():
    tied = build_model(resolve_model_config(preset="gpt2", vocab_size=V, n_embd=32, n_head=4))
    untied = build_model(resolve_model_config(preset="mingpt", vocab_size=V, n_embd=32, n_head=4))
    assert tied.get_output_embeddings() is tied.get_input_embeddings()
    assert tied.get_input_embeddings().shape == (V, 32)
    assert untied.get_output_embeddings().data_ptr() != untied.get_input_embeddings().data_ptr()
    assert num_params(untied) - num_params(tied) == V * 32


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_transformer_flops_formula(mlp):
    cfg = tiny(mlp=mlp, tie_weights=False)
    C, L = cfg.n_embd, cfg.n_layer
    mlp_params = 8 * C * C if mlp == "gelu" else 3 * C * swiglu_hidden(C)
    n = L * (4 * C * C + mlp_params) + V * C  # every matmul weight: qkv, proj, mlp, head
    assert build_model(cfg).flops_per_token() == 6 * n + 12 * L * cfg.block_size * C


@pytest.mark.parametrize("cfg", OTHER_CFGS, ids=OTHER_IDS)
def test_other_families_report_flops_and_context(cfg):
    model = build_model(cfg)
    assert isinstance(model.flops_per_token(), int) and model.flops_per_token() > 0
    assert model.max_context is None
    # counted by hand from the config: 2 FLOPs per multiply-add of every matmul, forward + backward = 3x
    # forward; lookups (embeddings, the one-hot k-gram's first layer) and biases count nothing. A second
    # config per family makes the layers and widths differ (layer 1's LSTM input is hidden, not n_embd).
    wider = (tiny("lstm", lstm_layers=2, hidden_size=48) if cfg.model == "lstm" else
             tiny("kgram", kgram_variant=cfg.kgram_variant, kgram_k=4, num_inner_mlp_layers=2))
    for c in (cfg, wider):
        V, C = c.vocab_size, c.n_embd
        if c.model == "lstm":
            H = c.hidden_size
            inputs = [C] + [H] * (c.lstm_layers - 1)
            forward = sum(4 * (i + H) * H * 2 for i in inputs) + H * V * 2  # 4 gates x (input + hidden) x hidden
        else:
            first = 0 if c.kgram_variant == "onehot" else c.kgram_k * C * C * 2  # Linear(k*C, C) / Conv1d kernel k
            forward = first + c.num_inner_mlp_layers * C * C * 2 + C * V * 2
        assert build_model(c).flops_per_token() == 3 * forward, c
