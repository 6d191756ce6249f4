"""Hook points: run_with_cache returns the model's own logits and every documented activation with its
documented shape and meaning; run_with_hooks interventions (one head's hook_z, the residual stream) move
exactly what they should; hooks fire on the KV-cache decode step and are gone afterwards, on an error
too; an unhooked HookPoint skips nn.Module's call machinery and keeps attention on its fast paths.
Tiny configs, CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import picollm
from picollm.config import ModelConfig
from picollm.errors import PicoError
from picollm.models import build_model
from picollm.models import transformer as tf
from picollm.models.hooks import HookPoint, any_hooked, hook_points, hooks_attached, run_with_cache, run_with_hooks
from picollm.models.transformer import apply_rope, swiglu_hidden

V, BLOCK, L, C, NH = 53, 24, 2, 32, 4
HS = C // NH
T = 11
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(model: str = "transformer", **kw) -> ModelConfig:
    cfg = dict(model=model, vocab_size=V, block_size=BLOCK, n_layer=L, n_embd=C, n_head=NH)
    cfg.update(kw)
    return ModelConfig(**cfg)


def make(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """An eval-mode model; transformer weights at O(1) scale so attention is far from uniform."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    if cfg.model == "transformer":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 2.0 / p.size(-1) ** 0.5)
                else:
                    p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(B: int = 2, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, t), generator=torch.Generator().manual_seed(seed))


TRANSFORMER_VARIANTS = {  # pre/post norm, both MLPs, every position scheme, bias and tying either way
    "pre-rope-swiglu": dict(norm_placement="pre", pos_emb="rope", mlp="swiglu"),
    "pre-learned-gelu": dict(norm_placement="pre", pos_emb="learned", mlp="gelu", norm="layernorm", bias=True,
                             tie_weights=False),
    "post-sinusoidal-gelu": dict(norm_placement="post", pos_emb="sinusoidal", mlp="gelu", norm="layernorm"),
    "post-rope-swiglu": dict(norm_placement="post", pos_emb="rope", mlp="swiglu", bias=True),
    "pre-none-gelu": dict(norm_placement="pre", pos_emb="none", mlp="gelu"),
}
OTHER_VARIANTS = {
    "lstm-1": ("lstm", dict(lstm_layers=1)),
    "lstm-2": ("lstm", dict(lstm_layers=2, hidden_size=24)),
    "kgram-onehot": ("kgram", dict(kgram_variant="onehot", kgram_k=3)),
    "kgram-embedding": ("kgram", dict(kgram_variant="embedding", kgram_k=3, num_inner_mlp_layers=2)),
    "kgram-conv-chunked": ("kgram", dict(kgram_variant="conv", kgram_k=3, kgram_chunk_size=4)),
}
ALL_CFGS = {**{k: tiny(**v) for k, v in TRANSFORMER_VARIANTS.items()},
            **{k: tiny(m, **v) for k, (m, v) in OTHER_VARIANTS.items()}}


def pattern_names(n_layer: int = L) -> list[str]:
    return [f"blocks.{i}.attn.hook_pattern" for i in range(n_layer)]


# ----------------------------------------------------------------------------- run_with_cache


@pytest.mark.parametrize("cfg", ALL_CFGS.values(), ids=ALL_CFGS.keys())
@torch.no_grad()
def test_run_with_cache_returns_the_models_own_logits(cfg):
    model = make(cfg)
    idx = tokens()
    logits, cache = run_with_cache(model, idx)  # every hook point hooked: the explicit attention path,
    assert_close(logits, model(idx), **TOL)  # the LSTM layer by layer, the k-gram unchunked
    assert set(cache) == set(hook_points(model))


def transformer_shapes(cfg: ModelConfig, B: int, t: int) -> dict[str, tuple]:
    H = swiglu_hidden(C) if cfg.mlp == "swiglu" else 4 * C
    shapes = {"hook_embed": (B, t, C), "ln_final.hook_normalized": (B, t, C)}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        shapes.update({b + "hook_resid_pre": (B, t, C), b + "attn.hook_q": (B, NH, t, HS),
                       b + "attn.hook_k": (B, NH, t, HS), b + "attn.hook_v": (B, NH, t, HS),
                       b + "attn.hook_pattern": (B, NH, t, t), b + "attn.hook_z": (B, t, NH, HS),
                       b + "hook_attn_out": (B, t, C), b + "hook_resid_mid": (B, t, C), b + "mlp.hook_pre": (B, t, H),
                       b + "mlp.hook_post": (B, t, H), b + "hook_mlp_out": (B, t, C), b + "hook_resid_post": (B, t, C)})
    return shapes


@pytest.mark.parametrize("variant", TRANSFORMER_VARIANTS)
@torch.no_grad()
def test_transformer_hook_points_have_the_documented_names_shapes_and_meaning(variant):
    cfg = tiny(**TRANSFORMER_VARIANTS[variant])
    model = make(cfg)
    idx = tokens()
    logits, c = run_with_cache(model, idx)
    assert {n: tuple(t.shape) for n, t in c.items()} == transformer_shapes(cfg, 2, T)
    emb = model.wte(idx)
    if cfg.pos_emb == "learned":
        emb = emb + model.wpe.weight[:T]
    elif cfg.pos_emb == "sinusoidal":
        emb = emb + model.pos_table[:T]
    assert_close(c["hook_embed"], emb)
    assert_close(c["blocks.0.hook_resid_pre"], emb)  # no dropout in eval
    for i, blk in enumerate(model.blocks):
        b = {n[len(f"blocks.{i}."):]: t for n, t in c.items() if n.startswith(f"blocks.{i}.")}  # this block's
        if i:
            assert torch.equal(b["hook_resid_pre"], c[f"blocks.{i - 1}.hook_resid_post"])
        attn_in = blk.ln_1(b["hook_resid_pre"]) if cfg.norm_placement == "pre" else b["hook_resid_pre"]
        qkv = blk.attn.qkv(attn_in).view(2, T, 3, NH, HS)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, nh, T, hs) each
        if cfg.pos_emb == "rope":  # q and k after RoPE
            q, k = (apply_rope(x, model.rope_cos[:T], model.rope_sin[:T]) for x in (q, k))
        for name, x in (("q", q), ("k", k), ("v", v)):
            assert_close(b[f"attn.hook_{name}"], x, **TOL)
        # the pattern is softmax(q k^T / sqrt(hs)) of the cached q and k, and z = pattern v
        scores = (b["attn.hook_q"] @ b["attn.hook_k"].transpose(-2, -1)) / HS ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        assert_close(b["attn.hook_pattern"], scores.softmax(-1), **TOL)
        assert_close(b["attn.hook_z"], (b["attn.hook_pattern"] @ b["attn.hook_v"]).transpose(1, 2), **TOL)
        assert_close(b["hook_attn_out"], blk.attn.proj(b["attn.hook_z"].reshape(2, T, C)), **TOL)
        if cfg.norm_placement == "pre":
            assert_close(b["hook_resid_mid"], b["hook_resid_pre"] + b["hook_attn_out"])
            mlp_in = blk.ln_2(b["hook_resid_mid"])
            assert_close(b["hook_resid_post"], b["hook_resid_mid"] + b["hook_mlp_out"])
        else:  # post-norm: resid_mid is the normed stream the MLP reads, resid_post is after ln_2
            assert_close(b["hook_resid_mid"], blk.ln_1(b["hook_resid_pre"] + b["hook_attn_out"]))
            mlp_in = b["hook_resid_mid"]
            assert_close(b["hook_resid_post"], blk.ln_2(b["hook_resid_mid"] + b["hook_mlp_out"]), **TOL)
        fc = blk.mlp.fc(mlp_in)
        if cfg.mlp == "swiglu":  # pre: the gate; post: silu(gate) * up
            gate, up = fc.chunk(2, dim=-1)
            assert_close(b["mlp.hook_pre"], gate, **TOL)
            assert_close(b["mlp.hook_post"], F.silu(gate) * up, **TOL)
        else:
            assert_close(b["mlp.hook_pre"], fc, **TOL)
            assert_close(b["mlp.hook_post"], F.gelu(fc), **TOL)
        assert_close(b["hook_mlp_out"], blk.mlp.proj(b["mlp.hook_post"]), **TOL)
    last = c[f"blocks.{L - 1}.hook_resid_post"]
    assert_close(c["ln_final.hook_normalized"], model.ln_f(last))  # post-norm: ln_f is the identity
    assert_close(model.head(c["ln_final.hook_normalized"]), logits)


@pytest.mark.parametrize("layers", [1, 2])
@torch.no_grad()
def test_lstm_hook_points(layers):
    model = make(tiny("lstm", lstm_layers=layers, hidden_size=24))
    idx = tokens()
    logits, c = run_with_cache(model, idx)
    expected = {"hook_embed": (2, T, C), "ln_final.hook_normalized": (2, T, 24),
                **{f"blocks.{i}.hook_resid_post": (2, T, 24) for i in range(layers)}}
    assert {n: tuple(t.shape) for n, t in c.items()} == expected
    assert_close(c["hook_embed"], model.embedding(idx))
    single = nn.LSTM(C, 24, batch_first=True)  # layer 0's output, from its own weights
    single.load_state_dict({k: v for k, v in model.lstm.state_dict().items() if k.endswith("_l0")})
    assert_close(c["blocks.0.hook_resid_post"], single(c["hook_embed"])[0], **TOL)
    assert torch.equal(c[f"blocks.{layers - 1}.hook_resid_post"], c["ln_final.hook_normalized"])
    assert_close(model.head(c["ln_final.hook_normalized"]), logits)


@pytest.mark.parametrize("variant,chunk", [("onehot", 0), ("embedding", 0), ("conv", 0), ("conv", 4)])
@torch.no_grad()
def test_kgram_hook_points(variant, chunk):
    model = make(tiny("kgram", kgram_variant=variant, kgram_k=3, num_inner_mlp_layers=2, kgram_chunk_size=chunk))
    idx = tokens()
    logits, c = run_with_cache(model, idx)
    expected = {"hook_embed": (2, T, C), "ln_final.hook_normalized": (2, T, C),
                **{f"mlp.{j}.hook_{w}": (2, T, C) for j in range(3) for w in ("pre", "post")}}
    assert {n: tuple(t.shape) for n, t in c.items()} == expected
    pad = idx.new_full((2, 2), -1)
    assert_close(c["hook_embed"], model._features(torch.cat([pad, idx], 1)))
    assert torch.equal(c["mlp.0.hook_pre"], c["hook_embed"])
    for j in range(3):
        assert_close(c[f"mlp.{j}.hook_post"], F.silu(c[f"mlp.{j}.hook_pre"]))
        if j:
            assert_close(c[f"mlp.{j}.hook_pre"], model.net[3 * j - 1](c[f"mlp.{j - 1}.hook_post"]))
    assert torch.equal(c["ln_final.hook_normalized"], c["mlp.2.hook_post"])  # no dropout in eval
    assert_close(model.net[-1](c["ln_final.hook_normalized"]), logits)


@pytest.mark.parametrize("variant", ["pre-rope-swiglu", "post-sinusoidal-gelu"])
def test_patterns_are_causal_distributions(variant):
    cfg = tiny(**TRANSFORMER_VARIANTS[variant])
    _, c = run_with_cache(make(cfg), tokens(3, 17), pattern_names())
    assert list(c) == pattern_names()
    for att in c.values():
        assert att.shape == (3, NH, 17, 17)
        assert_close(att.sum(-1), torch.ones(3, NH, 17))
        assert torch.all(att.triu(diagonal=1) == 0)
        assert att.tril(-1).max() > 0.5  # far from uniform: the check above is not vacuous


def test_names_select_by_list_string_and_predicate():
    model = make(tiny())
    idx = tokens()
    assert list(run_with_cache(model, idx, "hook_embed")[1]) == ["hook_embed"]
    assert set(run_with_cache(model, idx, ["blocks.1.hook_resid_post", "hook_embed"])[1]) == {
        "blocks.1.hook_resid_post", "hook_embed"}
    assert set(run_with_cache(model, idx, lambda n: n.endswith("hook_z"))[1]) == {
        "blocks.0.attn.hook_z", "blocks.1.attn.hook_z"}


def test_run_with_cache_uses_eval_mode_and_no_grad_and_restores_the_mode():
    model = make(tiny(dropout=0.3)).train()
    idx = tokens()
    logits, c = run_with_cache(model, idx, ["ln_final.hook_normalized"])
    assert model.training  # restored
    assert not logits.requires_grad and not c["ln_final.hook_normalized"].requires_grad
    model.eval()
    assert_close(logits, model(idx).detach())  # computed without dropout


# ----------------------------------------------------------------------------- run_with_hooks


def zero_head(h: int):
    def fn(z, hook):  # z: (B, T, nh, hs)
        z = z.clone()
        z[:, :, h] = 0
        return z

    return fn


@torch.no_grad()
def test_zeroing_one_heads_z_changes_the_logits_exactly_when_the_head_matters():
    model = make(tiny(pos_emb="learned"))
    idx = tokens()
    base = model(idx)
    ablated = run_with_hooks(model, idx, {"blocks.0.attn.hook_z": zero_head(1)})
    assert (ablated - base).abs().max() > 1e-2  # head 1 of layer 0 matters
    # zeroing every head's z is the same as zeroing the output projection's weight (its bias stays)
    def zero_all(z, hook):
        return torch.zeros_like(z)

    every = run_with_hooks(model, idx, {"blocks.0.attn.hook_z": zero_all})
    proj = model.blocks[0].attn.proj.weight
    saved = proj.clone()
    proj.zero_()
    assert_close(every, model(idx), **TOL)
    proj.copy_(saved)
    # now make head 1 irrelevant by construction: its slice of the output projection is zero
    proj[:, 1 * HS:2 * HS] = 0
    base = model(idx)
    assert torch.equal(run_with_hooks(model, idx, {"blocks.0.attn.hook_z": zero_head(1)}), base)
    assert (run_with_hooks(model, idx, {"blocks.0.attn.hook_z": zero_head(2)}) - base).abs().max() > 1e-2


@torch.no_grad()
def test_a_replaced_pattern_is_what_attention_uses():
    model = make(tiny())
    seen = {}

    def attend_to_first(att, hook):  # every query looks at key 0 only
        new = torch.zeros_like(att)
        new[..., 0] = 1.0
        return new

    def record(x, hook):
        seen[hook.name] = x

    a = "blocks.0.attn."
    with hooks_attached(model, {a + "hook_pattern": attend_to_first, a + "hook_v": record, a + "hook_z": record}):
        model(tokens())
    v0 = seen[a + "hook_v"][:, :, :1].expand(-1, -1, T, -1)  # (B, nh, T, hs): v of position 0 everywhere
    assert_close(seen[a + "hook_z"], v0.transpose(1, 2))


@pytest.mark.parametrize("variant", ["pre-rope-swiglu", "post-rope-swiglu"])
@torch.no_grad()
def test_a_replaced_residual_moves_the_logits_downstream_only(variant):
    model = make(tiny(**TRANSFORMER_VARIANTS[variant]))
    idx = tokens()
    _, c = run_with_cache(model, idx)
    d = torch.zeros(C)
    d[3] = 5.0

    def shift_last_position(x, hook):
        x = x.clone()
        x[:, -1] += d
        return x

    name = f"blocks.{L - 1}.hook_resid_post"
    logits = run_with_hooks(model, idx, {name: shift_last_position})
    expected = model.head(model.ln_f(shift_last_position(c[name], None)))
    assert_close(logits, expected, **TOL)
    assert (logits[:, -1] - model(idx)[:, -1]).abs().max() > 1e-2
    assert torch.equal(logits[:, :-1], model(idx)[:, :-1])
    # earlier in the stack: block 1 reads the shifted stream, so its output moves
    moved = run_with_hooks(model, idx, {"blocks.0.hook_resid_post": shift_last_position})
    assert (moved[:, -1] - model(idx)[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("cfg", [tiny(), tiny("lstm", lstm_layers=2), tiny("kgram", kgram_k=3)],
                         ids=["transformer", "lstm", "kgram"])
@torch.no_grad()
def test_replacing_what_the_head_reads(cfg):
    model = make(cfg)
    logits = run_with_hooks(model, tokens(), {"ln_final.hook_normalized": lambda x, hook: torch.zeros_like(x)})
    head = model.net[-1] if cfg.model == "kgram" else model.head
    bias = head.bias if head.bias is not None else torch.zeros(V)
    assert_close(logits, bias.expand_as(logits))


@torch.no_grad()
def test_a_hook_returning_none_keeps_the_activation_and_a_wrong_shape_is_refused():
    model = make(tiny())
    idx = tokens()
    seen = []
    logits = run_with_hooks(model, idx, {"blocks.0.hook_resid_mid": lambda x, hook: seen.append(hook.name)})
    assert seen == ["blocks.0.hook_resid_mid"]
    assert torch.equal(logits, model(idx))
    with pytest.raises(PicoError, match=r"blocks\.0\.hook_resid_mid returned shape \(2, 11, 31\)"):
        run_with_hooks(model, idx, {"blocks.0.hook_resid_mid": lambda x, hook: x[..., :-1]})


# ----------------------------------------------------------------------------- lifetime, errors


def test_hooks_are_removed_afterwards_on_an_error_too():
    model = make(tiny()).train()
    idx = tokens()
    run_with_cache(model, idx)
    run_with_hooks(model, idx, {"blocks.1.attn.hook_z": zero_head(0)})
    assert not any_hooked(model)

    def boom(x, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        run_with_hooks(model, idx, {"hook_embed": lambda x, hook: None, "blocks.1.hook_resid_pre": boom})
    assert not any_hooked(model)
    assert model.training  # eval_mode restored the mode on the error too
    with pytest.raises(RuntimeError, match="inside a hook"):
        with hooks_attached(model, {"blocks.0.mlp.hook_post": boom}):
            model(idx)
    assert not any_hooked(model)
    logits, cache = run_with_cache(model, idx, ["hook_embed"])  # and the model still works
    assert list(cache) == ["hook_embed"]


def test_an_unknown_name_raises_pico_error_listing_the_valid_ones():
    model = make(tiny())
    idx = tokens()
    for call in (lambda: run_with_cache(model, idx, ["blocks.0.attn.hook_patern"]),
                 lambda: run_with_hooks(model, idx, {"hook_embed": lambda x, h: None, "blocks.9.hook_z": None})):
        with pytest.raises(PicoError) as e:
            call()
        msg = str(e.value)
        assert "unknown hook point" in msg
        assert "blocks.{0..1}.attn.hook_pattern" in msg and "ln_final.hook_normalized" in msg
    assert "'blocks.9.hook_z'" in msg and "'hook_embed'" not in msg
    assert not any_hooked(model)  # names are checked before anything is attached
    with pytest.raises(PicoError, match=r"hook_embed, blocks\.\{0\.\.1\}\.hook_resid_post, ln_final"):
        run_with_cache(make(tiny("lstm", lstm_layers=2)), idx, ["blocks.0.attn.hook_q"])


# ----------------------------------------------------------------------------- the decode step


@torch.no_grad()
def test_transformer_hooks_fire_on_the_kv_cache_decode_step():
    model = make(tiny())
    idx = tokens(1, 8)
    seen: dict[str, list] = {"blocks.1.attn.hook_pattern": [], "blocks.1.attn.hook_k": [], "hook_embed": []}

    def record(x, hook):
        seen[hook.name].append(x.clone())

    plain = model.new_state(1, "cpu")  # a prefill of 5, then 3 decode steps: SDPA, no pattern
    refs = [model.step(idx[:, :5], plain)[0]] + [model.step(idx[:, p:p + 1], plain)[0] for p in range(5, 8)]
    hooked = model.new_state(1, "cpu")
    with hooks_attached(model, {n: record for n in seen}):  # the explicit path: the pattern exists
        outs = [model.step(idx[:, :5], hooked)[0]] + [model.step(idx[:, p:p + 1], hooked)[0] for p in range(5, 8)]
    for out, ref in zip(outs, refs):
        assert_close(out, ref, **TOL)
    assert [tuple(a.shape) for a in seen["blocks.1.attn.hook_pattern"]] == [
        (1, NH, 5, 5), (1, NH, 1, 6), (1, NH, 1, 7), (1, NH, 1, 8)]
    for a in seen["blocks.1.attn.hook_pattern"]:
        assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    assert [a.size(2) for a in seen["blocks.1.attn.hook_k"]] == [5, 1, 1, 1]  # the new tokens only
    _, c = run_with_cache(model, idx, ["blocks.1.attn.hook_pattern"])  # the decode rows are the full run's
    for p, a in zip(range(5, 8), seen["blocks.1.attn.hook_pattern"][1:]):
        assert_close(a[0, :, 0], c["blocks.1.attn.hook_pattern"][0, :, p, :p + 1], **TOL)
    assert len(seen["hook_embed"]) == 4
    assert not any_hooked(model)
    # an intervention on a decode step reaches its logits
    with hooks_attached(model, {"ln_final.hook_normalized": lambda x, hook: torch.zeros_like(x)}):
        out, _ = model.step(idx[:, :1], model.new_state(1, "cpu"))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("cfg", [tiny("lstm", lstm_layers=2, hidden_size=24), tiny("kgram", kgram_k=3)],
                         ids=["lstm", "kgram"])
@torch.no_grad()
def test_lstm_and_kgram_hooks_fire_on_the_decode_step(cfg):
    model = make(cfg)
    idx = tokens(2, 6)
    name = "blocks.1.hook_resid_post" if cfg.model == "lstm" else "mlp.1.hook_post"
    seen = []
    plain, hooked = model.new_state(2, "cpu"), model.new_state(2, "cpu")
    refs = []
    for p in range(6):
        ref, plain = model.step(idx[:, p:p + 1], plain)
        refs.append(ref)
    with hooks_attached(model, {name: lambda x, hook: seen.append(tuple(x.shape))}):
        for p in range(6):  # the LSTM runs layer by layer here: same logits and (h, c) as nn.LSTM's stack
            out, hooked = model.step(idx[:, p:p + 1], hooked)
            assert_close(out, refs[p], **TOL)
    if cfg.model == "lstm":
        assert_close(hooked, plain, **TOL)
    assert len(seen) == 6 and seen[0][:2] == (2, 1)


# ----------------------------------------------------------------------------- free when unused


def test_an_unhooked_hook_point_skips_the_module_call_machinery():
    hp = HookPoint("x")
    x = torch.randn(3)
    assert hp(x) is x
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m)))
    try:
        model = make(tiny())
        model(tokens())
        assert HookPoint not in calls and calls  # other modules went through nn.Module.__call__
    finally:
        handle.remove()
    h = hp.register_forward_hook(lambda m, i, o: o + 1)
    assert hp.hooked and torch.equal(hp(x), x + 1)
    h.remove()
    assert not hp.hooked and hp(x) is x


def test_attention_takes_the_explicit_path_only_when_the_pattern_is_hooked(monkeypatch):
    model = make(tiny())
    idx = tokens()
    calls = []
    real = tf.explicit_attention
    monkeypatch.setattr(tf, "explicit_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(idx)
    run_with_hooks(model, idx, {"blocks.0.attn.hook_z": lambda z, hook: None,
                                "blocks.0.attn.hook_q": lambda q, hook: None})
    assert calls == []  # the fast paths, with q and z hooked too
    run_with_cache(model, idx, ["blocks.1.attn.hook_pattern"])
    assert calls == [1]  # that layer only


def test_hook_points_add_nothing_to_the_state_dict():
    for cfg in (tiny(), tiny("lstm", lstm_layers=2), tiny("kgram", kgram_k=3, num_inner_mlp_layers=2)):
        keys = list(build_model(cfg).state_dict())
        assert not any("hook" in k for k in keys)
    keys = list(build_model(tiny("lstm", lstm_layers=2)).state_dict())
    assert "lstm.weight_ih_l1" in keys and "lstm.bias_hh_l0" in keys


# ----------------------------------------------------------------------------- wrappers, public API


def test_a_compiled_model_runs_its_hooks_eagerly():
    model = make(tiny())
    idx = tokens()
    compiled = torch.compile(model, backend="eager")
    assert_close(compiled(idx), model(idx))
    logits = run_with_hooks(compiled, idx, {"ln_final.hook_normalized": lambda x, hook: torch.zeros_like(x)})
    assert torch.equal(logits, torch.zeros_like(logits))
    assert set(run_with_cache(compiled, idx, pattern_names())[1]) == set(pattern_names())


def test_public_api():
    model = make(tiny())
    idx = tokens()
    logits, cache = picollm.run_with_cache(model, idx, pattern_names())
    assert_close(logits, model(idx), **TOL) and set(cache) == set(pattern_names())
    ablated = picollm.run_with_hooks(model, idx, {"blocks.0.attn.hook_z": zero_head(0)})
    assert (ablated - logits).abs().max() > 1e-2
