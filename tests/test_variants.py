"""The Transformer's newer parts: grouped-query attention, sliding windows, attention sinks, QK-norm,
logit soft-capping, ReLU^2 and a mixture of experts. Each is checked against what it must reduce to,
for causality, for KV-cache decoding against full recomputation, and against the fused C step."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from picollm.cli import main
from picollm.config import ModelConfig, SampleConfig, resolve_model_config
from picollm.errors import PicoError
from picollm.metrics import moe_aux_loss
from picollm.models import build_model
from picollm.models.fused import FusedDecoder, bf16_rounded, fused_unavailable, int8_rounded
from picollm.models.transformer import MLP, MoE
from picollm.sampling import generate

BASE = dict(model="transformer", vocab_size=61, block_size=16, n_embd=32, n_head=4, n_layer=2)
VARIANTS = {  # name: ModelConfig fields on top of BASE (the pico preset: RoPE, RMSNorm, SwiGLU)
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "window": dict(sliding_window=5),
    "window-alternate": dict(sliding_window=4, window_pattern="alternate", n_kv_heads=2),
    "sinks": dict(attn_sinks=True),
    "qk-norm": dict(qk_norm=True),
    "softcap": dict(logit_softcap=3.0),
    "relu2": dict(mlp="relu2", pos_emb="learned", norm="layernorm", bias=True),
    "moe": dict(n_experts=4, experts_per_token=2),
    "moe-k1-bias": dict(n_experts=3, experts_per_token=1, bias=True, mlp="gelu"),
    "gpt-oss-like": dict(n_kv_heads=2, sliding_window=4, window_pattern="alternate", attn_sinks=True, n_experts=4,
                         bias=True, tie_weights=False),
    "everything-dense": dict(n_kv_heads=2, sliding_window=6, attn_sinks=True, qk_norm=True, logit_softcap=5.0,
                             mlp="relu2"),
}


def model_of(seed=0, **fields):
    torch.manual_seed(seed)
    m = build_model(resolve_model_config(preset="pico", **{**BASE, **fields})).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # large random weights (and sinks, norms) so that every part matters
        for name, p in m.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("sinks") else 0.2))
    return m


def ids(B=2, T=16, seed=0):
    return torch.randint(0, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def copy_into(dst, src):
    """src's parameters into dst wherever the names and shapes match; the names that did not."""
    theirs = src.state_dict()
    missing = []
    with torch.no_grad():
        for k, v in dst.state_dict().items():
            if k in theirs and theirs[k].shape == v.shape:
                v.copy_(theirs[k])
            else:
                missing.append(k)
    return missing


# --------------------------------------------------------------------------- equivalences


def naive_attention_logits(m, x):
    """Multi-head attention written out, independent of CausalSelfAttention, for the default pico model."""
    c = m.cfg
    B, T = x.shape
    hs, nh = c.head_size, c.n_head
    h = m.wte(x)
    pos = torch.arange(T).float()
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hs, 2).float() / hs))
    ang = pos[:, None] * inv  # (T, hs/2)

    def rot(t):  # (B, nh, T, hs), pairs i, i + hs/2
        a, b = t[..., : hs // 2], t[..., hs // 2:]
        return torch.cat((a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()), -1)

    for blk in m.blocks:
        a = blk.ln_1(h)
        q, k, v = (a @ blk.attn.qkv.weight.T).split(c.n_embd, -1)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
        att = rot(q) @ rot(k).transpose(-1, -2) / hs ** 0.5
        att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
        h = h + ((att @ v).transpose(1, 2).reshape(B, T, -1)) @ blk.attn.proj.weight.T
        h = h + blk.mlp(blk.ln_2(h))
    return m.head(m.ln_f(h))


def test_n_kv_heads_equal_to_n_heads_is_todays_attention():
    plain, explicit = model_of(), model_of(n_kv_heads=BASE["n_head"])
    assert plain.cfg.n_kv_heads == BASE["n_head"]  # the default is multi-head
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in explicit.state_dict().items()}
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), plain(x), rtol=0, atol=0)
        torch.testing.assert_close(plain(x), naive_attention_logits(plain, x), rtol=1e-5, atol=1e-4)


def test_gqa_equals_mha_with_each_kv_head_repeated():
    gqa = model_of(n_kv_heads=2)
    mha = model_of(seed=1)
    assert copy_into(mha, gqa) == [f"blocks.{i}.attn.qkv.weight" for i in range(2)]
    hs, nh, nkv = 8, 4, 2
    with torch.no_grad():
        for b_gqa, b_mha in zip(gqa.blocks, mha.blocks):
            q, k, v = b_gqa.attn.qkv.weight.split([nh * hs, nkv * hs, nkv * hs])
            rep = lambda w: w.view(nkv, hs, -1).repeat_interleave(nh // nkv, 0).reshape(nh * hs, -1)  # noqa: E731
            b_mha.attn.qkv.weight.copy_(torch.cat((q, rep(k), rep(v))))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)
    assert gqa.blocks[0].attn.qkv.weight.shape == ((nh + 2 * nkv) * hs, 32)  # fewer k/v parameters


def test_window_at_least_block_size_is_full_attention():
    full = model_of()
    for w in (16, 40):
        windowed = model_of(seed=1, sliding_window=w)
        assert copy_into(windowed, full) == []
        x = ids()
        with torch.no_grad():
            torch.testing.assert_close(windowed(x), full(x), rtol=0, atol=0)


def test_window_limits_what_a_query_sees():
    """One layer, window 4: position 10's logits depend on tokens 7..10 and on nothing before."""
    m = model_of(sliding_window=4, n_layer=1)
    x = ids(B=1)
    y = x.clone()
    y[0, :7] = (y[0, :7] + 1) % BASE["vocab_size"]  # change everything before the window
    z = x.clone()
    z[0, 7] = (z[0, 7] + 1) % BASE["vocab_size"]  # change the window's oldest key
    with torch.no_grad():
        lx, ly, lz = m(x)[0, 10], m(y)[0, 10], m(z)[0, 10]
        torch.testing.assert_close(ly, lx, rtol=0, atol=0)
        assert not torch.allclose(lz, lx)
        full = model_of(n_layer=1)
        copy_into(full, m)
        assert not torch.allclose(full(y)[0, 10], full(x)[0, 10])  # without the window it would matter


def test_alternate_pattern_slides_even_layers_only():
    m = model_of(sliding_window=4, window_pattern="alternate", n_layer=3)
    assert [b.attn.window for b in m.blocks] == [4, 0, 4]
    assert [model_of(sliding_window=4).cfg.window(i) for i in range(2)] == [4, 4]


def test_sinks_at_minus_infinity_are_no_sinks():
    sinks, plain = model_of(attn_sinks=True), model_of(seed=1)
    assert sorted(copy_into(plain, sinks)) == []
    with torch.no_grad():
        for b in sinks.blocks:
            b.attn.sinks.fill_(float("-inf"))
        x = ids()
        torch.testing.assert_close(sinks(x), plain(x), rtol=1e-5, atol=1e-5)
        for b in sinks.blocks:
            b.attn.sinks.fill_(2.0)
        assert not torch.allclose(sinks(x), plain(x), atol=1e-3)  # a real sink takes weight away


def test_sink_weights_sum_below_one():
    from picollm.models.hooks import run_with_cache

    m = model_of(attn_sinks=True)
    _, cache = run_with_cache(m, ids(), ["blocks.0.attn.hook_pattern"])
    total = cache["blocks.0.attn.hook_pattern"].sum(-1)  # (B, nh, T)
    assert (total < 1).all() and (total > 0).all()


def test_one_expert_with_k_1_is_the_dense_mlp():
    for mlp, bias in (("swiglu", False), ("gelu", True), ("relu2", False)):
        dense = model_of(mlp=mlp, bias=bias)
        moe = model_of(seed=1, mlp=mlp, bias=bias, n_experts=1, experts_per_token=1)
        copy_into(moe, dense)
        with torch.no_grad():
            for bd, bm in zip(dense.blocks, moe.blocks):
                bm.mlp.fc[0].copy_(bd.mlp.fc.weight.T)
                bm.mlp.proj[0].copy_(bd.mlp.proj.weight.T)
                if bias:
                    bm.mlp.fc_bias[0].copy_(bd.mlp.fc.bias)
                    bm.mlp.proj_bias[0].copy_(bd.mlp.proj.bias)
        x = ids()
        with torch.no_grad():
            torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


def test_moe_routes_each_token_to_its_top_k_experts():
    """The MoE layer against a per-token loop over experts written here."""
    m = model_of(n_experts=4, experts_per_token=2, n_layer=1)
    moe = m.blocks[0].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = moe(x)
        want = torch.zeros_like(x)
        for b in range(2):
            for t in range(5):
                logits = moe.router(x[b, t])
                top, chosen = logits.topk(2)
                for w, e in zip(top.softmax(-1), chosen.tolist()):
                    gate, up = (x[b, t] @ moe.fc[e]).chunk(2)
                    want[b, t] += w * ((F.silu(gate) * up) @ moe.proj[e])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_qk_norm_and_softcap_do_what_they_say():
    from picollm.models.hooks import run_with_cache

    m = model_of(qk_norm=True, pos_emb="none")
    _, cache = run_with_cache(m, ids(), ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k"])
    w = m.blocks[0].attn.q_norm.weight
    q = cache["blocks.0.attn.hook_q"]  # (B, nh, T, hs): RMS-normalised, then scaled by the norm's weight
    torch.testing.assert_close((q / w).pow(2).mean(-1), torch.ones(q.shape[:-1]), rtol=1e-3, atol=1e-3)
    capped = model_of(logit_softcap=2.0)
    with torch.no_grad():
        out = capped(ids())
        assert out.abs().max() < 2.0
        uncapped = model_of(seed=1)
        copy_into(uncapped, capped)
        torch.testing.assert_close(out, 2.0 * torch.tanh(uncapped(ids()) / 2.0), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- causality and decoding


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causal(name):
    m = model_of(**VARIANTS[name])
    x = ids(B=1)
    y = x.clone()
    y[0, 9:] = (y[0, 9:] + 7) % BASE["vocab_size"]
    with torch.no_grad():
        # (not bit-exact: an MoE's per-expert matmuls change shape with the routing of the later tokens)
        torch.testing.assert_close(m(y)[0, :9], m(x)[0, :9], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m(y)[0, 9:], m(x)[0, 9:])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_decoding_equals_recomputation(name):
    """Prefix in one step, then a token at a time: each step's logits equal a full forward's last row."""
    m = model_of(**VARIANTS[name])
    x = ids(B=2)
    with torch.no_grad():
        state = m.new_state(2, "cpu")
        assert state.k.shape[2] == m.cfg.n_kv_heads  # the cache holds the kv heads only
        logits, state = m.step(x[:, :5], state)
        torch.testing.assert_close(logits, m(x[:, :5]), rtol=1e-4, atol=1e-4)
        for t in range(5, 16):
            logits, state = m.step(x[:, t:t + 1], state)
            torch.testing.assert_close(logits[:, -1], m(x[:, : t + 1])[:, -1], rtol=1e-4, atol=1e-4)
        # greedy generation past block_size (the window slides) equals recomputation token by token
        cfg = SampleConfig(max_new_tokens=24, greedy=True)
        got = generate(m, x[:, :4], cfg, decoder="torch")
        want = x[:, :4]
        for _ in range(24):
            nxt = m(want[:, -16:])[:, -1].argmax(-1, keepdim=True)
            want = torch.cat((want, nxt), 1)
        # a slid window restarts from the last 8 tokens where recomputation keeps 16: compare up to the slide
        assert torch.equal(got[:, :16], want[:, :16])


DENSE = [n for n in VARIANTS if "moe" not in n and "oss" not in n]


@pytest.mark.parametrize("name", DENSE)
def test_fused_step_equals_pytorch_step(name):
    m = model_of(**VARIANTS[name])
    if fused_unavailable(m):
        pytest.skip(fused_unavailable(m))
    dec = FusedDecoder(m)
    x = ids(B=2)
    with torch.no_grad():
        fs, ts = dec.new_state(2), m.new_state(2, "cpu")
        assert fs.k.shape == ts.k.shape
        lf, fs = dec.step(x[:, :6], fs)
        lt, ts = m.step(x[:, :6], ts)
        torch.testing.assert_close(lf[:, -1], lt[:, -1], rtol=1e-4, atol=1e-4)
        for t in range(6, 16):
            lf, fs = dec.step(x[:, t:t + 1], fs)
            lt, ts = m.step(x[:, t:t + 1], ts)
            torch.testing.assert_close(lf[:, -1], lt[:, -1], rtol=1e-4, atol=1e-4)
    cfg = SampleConfig(max_new_tokens=30, greedy=True)
    assert torch.equal(generate(m, x[:, :3], cfg, decoder="fused"), generate(m, x[:, :3], cfg, decoder="torch"))


@pytest.mark.parametrize("weights", ["bf16", "int8"])
@pytest.mark.parametrize("name", DENSE)
def test_fused_bf16_and_int8_steps_compute_their_pytorch_views(name, weights):
    """Every variant through the bf16 and int8 steps (head size 8: attention's plain-C path over the bf16
    KV cache) equals PyTorch on what that step reads (bf16_rounded, int8_rounded), position by position,
    except where a value rounds to the other bf16 or int8 neighbour than in PyTorch (their float sums
    differ in the last bits): a position or two may then move by about a step. And it is not float32 math."""
    m = model_of(**VARIANTS[name])
    if fused_unavailable(m):
        pytest.skip(fused_unavailable(m))
    if weights == "bf16":
        model = copy.deepcopy(m).to(torch.bfloat16)
        dec, ref = FusedDecoder(model), bf16_rounded(model)
    else:
        dec, ref = FusedDecoder(m, "int8"), int8_rounded(m)
    x = ids(B=4)
    with torch.no_grad():
        st = dec.new_state(4)
        steps = [dec.step(x[:, :6], st)[0][:, -1].clone()]
        steps += [dec.step(x[:, t:t + 1], st)[0][:, -1].clone() for t in range(6, 16)]
        got = torch.stack(steps, 1)  # positions 5..15
        want = ref(x)[:, 5:]
        per_position = (got - want).abs().amax(-1)
        assert (per_position < 1e-4).float().mean() >= 0.9 and per_position.max() < 0.03 * want.abs().max(), per_position
        assert (got - m(x)[:, 5:]).abs().amax(-1).median() > 1e-3


@pytest.mark.parametrize("name", ["moe", "gpt-oss-like"])
def test_fused_step_declines_a_mixture_of_experts(name):
    m = model_of(**VARIANTS[name])
    assert "mixture of experts" in fused_unavailable(m)
    cfg = SampleConfig(max_new_tokens=8, greedy=True)
    assert torch.equal(generate(m, ids()[:, :3], cfg, decoder="auto"), generate(m, ids()[:, :3], cfg, decoder="torch"))
    with pytest.raises(PicoError, match="mixture of experts"):
        generate(m, ids()[:, :3], cfg, decoder="fused")


# --------------------------------------------------------------------------- MoE training, FLOPs, flags


def test_aux_loss_is_one_when_balanced_and_grows_when_not():
    E = 4
    balanced = torch.eye(E).repeat(16, 1) * 1e-3  # each expert first for a quarter of the tokens
    assert moe_aux_loss([balanced], k=1).item() == pytest.approx(1.0, abs=1e-3)
    skewed = torch.zeros(64, E)
    skewed[:, 0] = 5.0
    assert moe_aux_loss([skewed], k=1).item() > 3.0
    logits = skewed.clone().requires_grad_()
    moe_aux_loss([logits], k=1).backward()
    assert logits.grad[:, 0].sum() > 0  # gradient descent lowers the favoured expert's logits


def test_training_logs_the_aux_loss_apart(tmp_path, numbers_file):
    import json

    assert main(["train", "--input_files", str(numbers_file), "--models", "transformer", "--n_experts", "4",
                 "--experts_per_token", "2", "--n_blocks", "1", "--embed_size", "32", "--block_size", "16",
                 "--epochs", "1", "--max_steps_per_epoch", "6", "--log_interval", "2", "--output_dir", str(tmp_path),
                 "--run_name", "moe", "--vocab_size", "300", "--no_progress", "--moe_aux_weight", "0.05"]) == 0
    records = [json.loads(line) for line in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert len(steps) == 6 and all(r["aux_loss"] >= 0.99 for r in steps)  # >= 1 up to rounding
    assert all(abs(r["train_loss"] - r["aux_loss"]) > 1e-6 for r in steps)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["model"]["n_experts"] == 4 and cfg["train"]["moe_aux_weight"] == 0.05


def test_flops_count_active_parameters():
    dense = model_of()
    moe1 = model_of(n_experts=4, experts_per_token=1)
    moe2 = model_of(n_experts=4, experts_per_token=2)
    router = 2 * 3 * (2 * 32 * 4)  # per layer: a (4, 32) router, 2 FLOPs per MAC, x3 for training
    assert moe1.flops_per_token() == dense.flops_per_token() + router
    mlp = sum(p.numel() for p in MLP(dense.cfg).parameters())
    assert moe2.flops_per_token() == moe1.flops_per_token() + 2 * 3 * 2 * mlp
    windowed = model_of(sliding_window=4)
    assert windowed.flops_per_token() == dense.flops_per_token() - 2 * 3 * 2 * (2 * (16 - 4) * 32)


@pytest.mark.parametrize("flags, words", [
    (["--n_heads", "4", "--n_kv_heads", "3"], "multiple of --n_kv_heads"),
    (["--n_experts", "2", "--experts_per_token", "3"], "--experts_per_token must be in 1..2"),
    (["--sliding_window", "-1"], "--sliding_window must be >= 0"),
    (["--logit_softcap", "-2"], "--logit_softcap must be >= 0"),
    (["--window_pattern", "odd"], "unknown window_pattern 'odd'; choose one of: all, alternate"),
    (["--moe_aux_weight", "-1"], "--moe_aux_weight must be >= 0"),
])
def test_bad_flags_one_line(tmp_path, capsys, flags, words):
    assert main(["train", "--dataset", "numbers", "--output_dir", str(tmp_path), "--embed_size", "32", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and err.strip().count("\n") == 0, err
    assert list(tmp_path.iterdir()) == []


def test_llama3_preset_and_overrides():
    cfg = resolve_model_config(preset="llama3", n_head=8, n_embd=64)
    assert (cfg.n_kv_heads, cfg.rope_theta, cfg.tie_weights, cfg.mlp) == (2, 500000.0, False, "swiglu")
    assert resolve_model_config(preset="llama3", n_head=3, n_embd=48).n_kv_heads == 1  # a divisor, at least 1
    assert resolve_model_config(preset="llama3", n_head=8, n_embd=64, n_kv_heads=8).n_kv_heads == 8
    again = ModelConfig.from_dict(dataclasses.asdict(cfg))
    assert again == cfg  # the resolved count is what config.json keeps
