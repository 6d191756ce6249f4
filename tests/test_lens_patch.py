"""The logit lens (`pico-llm lens`) and activation patching (`pico-llm patch`)."""

import json

import pytest
import torch

from picollm.analysis.lens import lens_logits, logit_lens, unembed
from picollm.analysis.patching import activation_patching, logit_diff, patch_run
from picollm.cli import main
from picollm.config import ModelConfig
from picollm.models import build_model
from picollm.models.hooks import run_with_cache

TINY = dict(vocab_size=13, block_size=8, n_embd=16, n_head=2, n_layer=2)


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **kw})).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lens")
    assert main(["train", "--dataset", "numbers", "--numbers_count", "120", "--tokenizer", "byte", "--models",
                 "transformer", "--embed_size", "16", "--n_heads", "2", "--n_blocks", "2", "--block_size", "16",
                 "--batch_size", "4", "--max_steps_per_epoch", "3", "--output_dir", str(tmp), "--run_name", "r",
                 "--no_progress", "--max_new_tokens", "4"]) == 0
    return tmp / "r"


# ----------------------------------------------------------------------------- the logit lens


@pytest.mark.parametrize("kw", [dict(norm="rmsnorm"), dict(norm="layernorm"), dict(norm_placement="post"),
                                dict(norm="layernorm", norm_placement="post", pos_emb="learned")],
                         ids=["pre-rmsnorm", "pre-layernorm", "post-rmsnorm", "post-layernorm"])
def test_lens_last_layer_is_the_models_logits(kw):
    model = tiny(**kw)
    with torch.no_grad():  # a trained-looking final norm: not the identity its init is
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    idx = torch.randint(0, 13, (2, 8))
    names, lens, logits = lens_logits(model, idx)
    assert names == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with torch.no_grad():
        plain = model(idx)
    assert torch.equal(lens[-1], plain) and torch.equal(logits, plain)
    assert not torch.allclose(lens[-2], plain, atol=1e-3)  # an earlier layer is a different read-out
    if kw.get("norm_placement") == "post":  # the residual is normalised already: no second norm
        _, cache = run_with_cache(model, idx, ["blocks.1.hook_resid_post"])
        assert torch.equal(model.head(cache["blocks.1.hook_resid_post"]), plain)


def test_lens_applies_the_models_own_final_norm():
    model = tiny(norm="rmsnorm")
    with torch.no_grad():
        model.ln_f.weight.mul_(3.0)
    x = torch.randn(1, 4, 16)
    expected = model.head(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * model.ln_f.weight)
    torch.testing.assert_close(unembed(model, x), expected)


def test_lens_lstm_last_layer_is_the_models_logits():
    model = tiny(model="lstm", lstm_layers=2)
    idx = torch.randint(0, 13, (2, 8))
    names, lens, _ = lens_logits(model, idx)
    assert names == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with torch.no_grad():
        torch.testing.assert_close(lens[-1], model(idx), atol=1e-6, rtol=0)


def test_lens_ranks_and_probabilities():
    model = tiny()
    ids = [1, 5, 7, 2, 9]
    r = logit_lens(model, ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    assert torch.equal(r["final"], logits.argmax(-1))
    assert torch.equal(r["rank"][-1], torch.ones(5, dtype=torch.long))
    torch.testing.assert_close(r["prob"][-1], logits.softmax(-1).max(-1).values)
    assert r["rank"].min() >= 1 and (r["prob"] <= r["top_prob"] + 1e-7).all()


def test_lens_cli(run_dir, tmp_path, capsys):
    png, js = tmp_path / "lens.png", tmp_path / "lens.json"
    assert main(["lens", str(run_dir), "--prompt", "1 2 3 4", "--out", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "embed" in out and "block 1" in out and png.stat().st_size > 1000
    data = json.loads(js.read_text())
    assert data["tokens"] == ["1", "\u2423", "2", "\u2423", "3", "\u2423", "4"]
    assert [row["hook"] for row in data["layers"]] == ["hook_embed", "blocks.0.hook_resid_post",
                                                       "blocks.1.hook_resid_post"]
    from picollm.checkpoint import load_run
    model, tok, _ = load_run(str(run_dir))
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("1 2 3 4")]))[0]
    final = logits.argmax(-1).tolist()
    assert [f["id"] for f in data["final_prediction"]] == final
    last = data["layers"][-1]["positions"]
    assert [p["top_id"] for p in last] == final and all(p["final_rank"] == 1 for p in last)
    p_final = logits.softmax(-1).max(-1).values.tolist()
    assert [p["final_prob"] for p in last] == pytest.approx(p_final, abs=1e-6)


# ----------------------------------------------------------------------------- activation patching


def test_patching_everything_restores_clean_and_nothing_restores_nothing():
    model = tiny(n_layer=2, norm="layernorm")
    clean, corrupt = torch.tensor([[3, 4, 5, 6, 7]]), torch.tensor([[3, 9, 5, 11, 7]])
    names = ["blocks.0.hook_resid_pre"]
    clean_logits, cache = run_with_cache(model, clean, names)
    corrupt_logits, _ = run_with_cache(model, corrupt, [])
    everything = patch_run(model, corrupt, {names[0]: lambda a: cache[names[0]]})
    assert torch.equal(everything, clean_logits)
    assert torch.equal(patch_run(model, corrupt, {}), corrupt_logits)
    r = activation_patching(model, clean[0].tolist(), corrupt[0].tolist())
    target, foil = r["target"], r["foil"]
    assert target == int(clean_logits[0, -1].argmax()) and target != foil
    m = logit_diff(everything, target, foil)[0]
    assert (m - r["m_corrupt"]) / (r["m_clean"] - r["m_corrupt"]) == pytest.approx(1.0, abs=1e-6)
    s = r["scores"]
    assert s["resid_pre"].shape == (2, 5) and s["heads"].shape == (2, 2)
    # the positions where the prompts agree restore nothing at the embedding; the last layer's MLP writes
    # to the logits of its own position only
    assert s["resid_pre"][0, [0, 2, 4]].abs().max() < 1e-5
    assert s["mlp_out"][1, :-1].abs().max() < 1e-5 and s["resid_pre"][:, -1].abs().max() > 1e-3


def one_head_copies_previous_token(V=3, P=4):
    """A 1-layer Transformer, weights set by hand: head 1 attends from each position to the previous one
    and writes that token's identity to an answer subspace the head reads; head 0 computes attention
    too, but its output projection columns are zero; the MLP writes nothing."""
    C, hs = V + P + V, (V + P + V) // 2
    model = build_model(ModelConfig(vocab_size=V, block_size=P, n_embd=C, n_head=2, n_layer=1, pos_emb="learned",
                                    norm="rmsnorm", mlp="gelu", tie_weights=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte.weight[:, :V] = torch.eye(V)
        model.wpe.weight[:, V:V + P] = torch.eye(P)
        for n in ("ln_1", "ln_2"):
            getattr(model.blocks[0], n).weight.fill_(1.0)
        model.ln_f.weight.fill_(1.0)
        q, k, v = model.blocks[0].attn.qkv.weight.view(3, C, C)  # rows: head h's dims h*hs .. h*hs+hs-1
        torch.manual_seed(1)
        q[:hs], k[:hs], v[:hs] = torch.randn(3, hs, C)  # head 0: busy, but its output is dropped
        for j in range(P - 1):
            q[hs + j, V + j + 1] = 30.0  # a query at position j+1 ...
            k[hs + j, V + j] = 1.0  # ... matches the key at position j
        for t in range(V):
            v[hs + t, t] = 1.0  # the value: the token's identity
            model.blocks[0].attn.proj.weight[V + P + t, hs + t] = 1.0
            model.head.weight[t, V + P + t] = 10.0
    return model


def test_patching_finds_the_head_that_carries_the_answer():
    model = one_head_copies_previous_token()
    clean, corrupt = [2, 0, 1, 2], [2, 0, 2, 2]
    r = activation_patching(model, clean, corrupt)
    assert (r["target"], r["foil"]) == (1, 2)  # the clean and the corrupt previous tokens
    heads = r["scores"]["heads"][0]
    assert heads[1] >= 0.9 and abs(heads[0]) <= 0.1, heads
    resid = r["scores"]["resid_pre"][0]
    assert resid[2] >= 0.9 and resid[[0, 1, 3]].abs().max() <= 0.1, resid  # the token that differs
    assert r["scores"]["attn_out"][0, 3] >= 0.9  # written at the last position


def test_patch_cli(run_dir, tmp_path, capsys):
    png, js = tmp_path / "p.png", tmp_path / "p.json"
    assert main(["patch", str(run_dir), "--clean", "1 2 3", "--corrupt", "1 5 3", "--target", "4",
                 "--out", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "resid_pre" in out and "heads" in out and png.stat().st_size > 1000
    data = json.loads(js.read_text())
    assert data["target_token"] == "4" and data["tokens"][2] == "2/5"
    assert set(data["scores"]) == {"resid_pre", "attn_out", "mlp_out", "heads"}
    assert len(data["scores"]["resid_pre"]) == 2 and len(data["scores"]["resid_pre"][0]) == 5
    assert len(data["scores"]["heads"][0]) == 2


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, message", [
    (["lens", "{run}", "--prompt", "1 2 3 4 5 6 7 8 9"], "longer than the model's block_size 16"),
    (["patch", "{run}", "--clean", "1 2 3", "--corrupt", "1 22 3"], "same token length"),
    (["patch", "{run}", "--clean", "1 2 3", "--corrupt", "1 5 3", "--target", "xyz"], "not one token"),
    (["patch", "{lstm}", "--clean", "1 2 3", "--corrupt", "1 5 3"], "needs a transformer"),
    (["lens", "{kgram}", "--prompt", "1 2"], "needs a transformer or an LSTM"),
    (["patch", "{run}", "--clean", "1 2 3", "--corrupt", "1 2 3"], "the same on both prompts"),
])
def test_bad_input_is_one_line(argv, message, run_dir, other_runs, tmp_path, capsys):
    runs = {"run": str(run_dir), **other_runs}
    argv = [a.format(**runs) for a in argv] + ["--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("others")
    out = {}
    for kind in ("lstm", "kgram"):
        assert main(["train", "--dataset", "numbers", "--numbers_count", "60", "--tokenizer", "byte", "--models",
                     kind, "--embed_size", "8", "--block_size", "8", "--batch_size", "4", "--max_steps_per_epoch",
                     "1", "--output_dir", str(tmp), "--run_name", kind, "--no_progress", "--max_new_tokens", "2"]) == 0
        out[kind] = str(tmp / kind)
    return out
