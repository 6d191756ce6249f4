"""pico-llm export --format gguf. Without llama.cpp: the file read back with the gguf package's own reader
holds the run's weights, tokenizer and shape, and the q/k row order is right for llama.cpp's RoPE. With
llama.cpp (llama-cpp-python, `make test-all` installs it; marked slow): it loads the file, tokenizes as we
do, gives our logits and decodes greedily the same tokens."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from scramble import scrambled_copy

from picollm import checkpoint as ckpt
from picollm.cli import main
from picollm.config import EOT, DataConfig, SampleConfig, TrainConfig, resolve_model_config
from picollm.data.tokenizers import byte_alphabet
from picollm.export import export_gguf
from picollm.export.gguf import rope_pairs_adjacent
from picollm.models.transformer import apply_rope, precompute_rope
from picollm.sampling import generate
from picollm.training import train

SHAPE = dict(block_size=64, n_embd=96, n_layer=2, n_head=4)  # SwiGLU hidden 256: every row a multiple of 32
TEXTS = ["0 1 2 3 4 5 6 7", "12 24 48 96 192", "Once upon a time, a dog ran.", "  two  spaces\nand a line",
         "héllo wörld ✓", "tabs\tand 'quotes' don't", "x"]
RUNS = {  # name: (preset, explicit flags, tokenizer)
    "llama": ("llama", {}, "bpe"),  # untied head, no biases: the case
    "tied-bias-byte": ("pico", dict(bias=True), "byte"),
    "llama3-gqa": ("llama3", dict(n_kv_heads=2), "bpe"),  # grouped-query attention: 2 kv heads for 4
}


def train_run(root, name, preset, flags, tokenizer="bpe", steps=20):
    data = DataConfig(dataset="numbers", numbers_count=300, tokenizer=tokenizer, vocab_size=320, seed=1)
    tcfg = TrainConfig(epochs=1, max_steps_per_epoch=steps, batch_size=8, learning_rate=1e-2, warmup_steps=2,
                       eval_batches=1, log_interval=5, prompt="0 1 2", max_new_tokens=2)
    run = str(root / name)
    train(resolve_model_config(preset=preset, **{**SHAPE, **flags}), data, tcfg, run, progress=False,
          log=lambda s: None)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    runs = {name: train_run(root, name, *spec, steps=60) for name, spec in RUNS.items()}
    scrambled = {name + "-scrambled": scrambled_copy(run, run + "-scrambled", seed=i)
                 for i, (name, run) in enumerate(runs.items())}
    return {**runs, **scrambled}


def field(reader, key):
    return reader.fields[key].contents()


def tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


# --------------------------------------------------------------------------- the file, without llama.cpp


def test_file_holds_the_run(runs, tmp_path):
    run = runs["llama"]
    out = str(tmp_path / "m.gguf")
    res = export_gguf(run, out, log=lambda s: None)
    model, tok, (cfg, _, _) = ckpt.load_run(run)
    sd = model.state_dict()
    r = gguf.GGUFReader(out)
    assert field(r, "general.architecture") == "llama" and res["bytes"] == os.path.getsize(out)
    for key, want in (("llama.block_count", 2), ("llama.embedding_length", 96), ("llama.context_length", 64),
                      ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 4),
                      ("llama.feed_forward_length", 256), ("llama.rope.dimension_count", 24),
                      ("tokenizer.ggml.eos_token_id", tok.eot_id), ("tokenizer.ggml.add_bos_token", False)):
        assert field(r, key) == want, key
    assert field(r, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert (field(r, "tokenizer.ggml.model"), field(r, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")

    # the vocabulary: every token's bytes in GPT-2's spelling, end-of-text a control token
    chars = byte_alphabet()
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and tokens[tok.eot_id] == EOT
    assert all(bytes(chars[c] for c in t) == tok.token_bytes(i) for i, t in enumerate(tokens) if i != tok.eot_id)
    types = field(r, "tokenizer.ggml.token_type")
    assert types[tok.eot_id] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.NORMAL) == tok.vocab_size - 1
    merges = field(r, "tokenizer.ggml.merges")
    assert len(merges) == tok.vocab_size - 257  # a merge per token past the 256 bytes and end-of-text
    made = [a + b for a, b in (m.split(" ") for m in merges)]
    assert sorted(made) == sorted(t for i, t in enumerate(tokens) if i != tok.eot_id and len(tok.token_bytes(i)) > 1)

    # the weights, f32 and bit-exact; q and k rows back in our order equal ours
    t = tensors(r)
    assert "output.weight" in t  # untied
    C, hs = 96, 24
    assert np.array_equal(t["token_embd.weight"].data, sd["wte.weight"].numpy())
    assert np.array_equal(t["output.weight"].data, sd["head.weight"].numpy())
    q, k, v = sd["blocks.1.attn.qkv.weight"].split(C)
    back = torch.from_numpy(np.array(t["blk.1.attn_q.weight"].data)).reshape(4, hs // 2, 2, C).transpose(1, 2)
    assert torch.equal(back.reshape(C, C), q)
    assert not torch.equal(torch.from_numpy(np.array(t["blk.1.attn_k.weight"].data)), k)  # reordered
    assert np.array_equal(t["blk.1.attn_v.weight"].data, v.numpy())
    gate, up = sd["blocks.0.mlp.fc.weight"].chunk(2)
    assert np.array_equal(t["blk.0.ffn_gate.weight"].data, gate.numpy())
    assert np.array_equal(t["blk.0.ffn_up.weight"].data, up.numpy())
    assert np.array_equal(t["blk.0.ffn_norm.weight"].data, sd["blocks.0.ln_2.weight"].numpy())
    assert len(t) == 3 + 9 * 2


def test_grouped_query_attention(runs, tmp_path):
    out = str(tmp_path / "m.gguf")
    export_gguf(runs["llama3-gqa"], out, log=lambda s: None)
    sd = ckpt.load_run(runs["llama3-gqa"])[0].state_dict()
    r = gguf.GGUFReader(out)
    assert field(r, "llama.attention.head_count") == 4 and field(r, "llama.attention.head_count_kv") == 2
    assert field(r, "llama.rope.freq_base") == 500000.0
    t = tensors(r)
    k = sd["blocks.0.attn.qkv.weight"][96:144]  # 2 kv heads of 24 rows, after the 4 q heads
    back = torch.from_numpy(np.array(t["blk.0.attn_k.weight"].data)).reshape(2, 12, 2, 96).transpose(1, 2)
    assert torch.equal(back.reshape(48, 96), k)  # reordered per kv head
    assert np.array_equal(t["blk.0.attn_v.weight"].data, sd["blocks.0.attn.qkv.weight"][144:].numpy())


def test_tied_head_and_biases(runs, tmp_path):
    out = str(tmp_path / "m.gguf")
    export_gguf(runs["tied-bias-byte"], out, log=lambda s: None)
    sd = ckpt.load_run(runs["tied-bias-byte"])[0].state_dict()
    r = gguf.GGUFReader(out)
    t = tensors(r)
    assert "output.weight" not in t  # llama.cpp reads the embedding as the head
    assert np.array_equal(t["blk.0.attn_v.bias"].data, sd["blocks.0.attn.qkv.bias"][192:].numpy())
    q_bias = torch.from_numpy(np.array(t["blk.0.attn_q.bias"].data))
    assert torch.equal(q_bias.reshape(4, 12, 2).transpose(1, 2).reshape(96), sd["blocks.0.attn.qkv.bias"][:96])
    assert np.array_equal(t["blk.0.ffn_down.bias"].data, sd["blocks.0.mlp.proj.bias"].numpy())
    # the byte tokenizer: 256 single-byte tokens, end-of-text, no merges
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 257 and tokens[256] == EOT and field(r, "tokenizer.ggml.merges") == []
    assert [byte_alphabet()[c] for c in tokens[:256]] == list(range(256))


def _rope_adjacent(x, theta=10000.0):
    """llama.cpp's LLAMA RoPE, written out here: dims (2i, 2i+1) rotated by pos * theta^(-2i/hs)."""
    T, hs = x.shape[-2], x.shape[-1]
    ang = torch.arange(T)[:, None] * theta ** (-torch.arange(0, hs, 2) / hs)  # (T, hs/2)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_reordered_rows_give_the_same_attention_scores():
    """Our half-split RoPE on our rows and llama.cpp's adjacent-pair RoPE on the exported rows give the same
    q.k for every head and pair of positions."""
    g = torch.Generator().manual_seed(0)
    n_head, hs, C, T = 3, 8, 12, 10
    wq, wk = torch.randn(n_head * hs, C, generator=g), torch.randn(n_head * hs, C, generator=g)
    x = torch.randn(T, C, generator=g)
    cos, sin = precompute_rope(hs, T)

    def scores(q, k):
        return torch.einsum("htd,hsd->hts", q, k)

    heads = lambda w: (x @ w.T).reshape(T, n_head, hs).transpose(0, 1)  # noqa: E731  (nh, T, hs)
    ours = scores(apply_rope(heads(wq), cos, sin), apply_rope(heads(wk), cos, sin))
    theirs = scores(_rope_adjacent(heads(rope_pairs_adjacent(wq, n_head))),
                    _rope_adjacent(heads(rope_pairs_adjacent(wk, n_head))))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)
    unordered = scores(_rope_adjacent(heads(wq)), _rope_adjacent(heads(wk)))
    assert not torch.allclose(unordered, ours, atol=1e-2)  # the reorder is what makes them agree


def test_f16_and_q8_0(runs, tmp_path):
    run = runs["llama"]
    sd = ckpt.load_run(run)[0].state_dict()
    want = sd["blocks.0.mlp.proj.weight"].numpy()
    sizes = {}
    for dtype in ("f32", "f16", "q8_0"):
        out = str(tmp_path / f"{dtype}.gguf")
        notes = []
        sizes[dtype] = export_gguf(run, out, dtype=dtype, log=notes.append)["bytes"]
        assert notes == []  # every row is a multiple of 32 long
        t = tensors(gguf.GGUFReader(out))
        assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
        down = t["blk.0.ffn_down.weight"]
        kind = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
        assert down.tensor_type == kind
        got = gguf.quants.dequantize(down.data, down.tensor_type).reshape(want.shape)
        step = np.abs(want.reshape(-1, 32)).max(1, keepdims=True) / 127  # Q8_0: one scale per 32 weights
        err = np.abs(got - want).reshape(-1, 32)
        if dtype == "f16":
            assert np.abs(got - want).max() <= np.abs(want).max() * 2 ** -11
        elif dtype == "q8_0":
            # half a step of rounding, plus the scale's own rounding to f16 (up to 127 steps * 2^-11)
            assert (err <= step * (0.5 + 127 * 2 ** -11)).all() and err.max() > 0
        else:
            assert err.max() == 0
    assert sizes["f32"] > 1.8 * sizes["f16"] and sizes["f16"] > 1.5 * sizes["q8_0"]


def test_q8_0_keeps_short_rows_in_f16(tmp_path):
    run = train_run(tmp_path, "short", "llama", dict(n_embd=64, n_layer=1), steps=2)  # SwiGLU hidden 176
    notes = []
    export_gguf(run, str(tmp_path / "m.gguf"), dtype="q8_0", log=notes.append)
    t = tensors(gguf.GGUFReader(str(tmp_path / "m.gguf")))
    assert t["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # rows of 176
    assert t["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # rows of 64
    assert len(notes) == 1 and "blk.0.ffn_down.weight" in notes[0] and "f16" in notes[0]


def _gpt2_files(d):
    """A tiny GPT-2 vocabulary in the original formats (encoder.json, vocab.bpe): 256 bytes, merges, eot."""
    merges = [("Ġ", "1"), ("Ġ", "2"), ("1", "2"), ("Ġ1", "2"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    encoder = {c: i for i, c in enumerate(byte_alphabet())}  # GPT-2's order: printable bytes first
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder[EOT] = len(encoder)
    d.mkdir()
    (d / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return d, [f"{a} {b}" for a, b in merges]


@pytest.fixture
def gpt2_run(tmp_path, monkeypatch):
    d, merges = _gpt2_files(tmp_path / "gpt2files")
    monkeypatch.setenv("PICOLLM_GPT2_DIR", str(d))
    run = train_run(tmp_path, "g", "llama", {}, tokenizer="gpt2")
    return scrambled_copy(run, str(tmp_path / "g-scrambled"), seed=7), merges


def test_gpt2_merges_rebuilt_from_tiktoken_ranks(gpt2_run, tmp_path):
    run, merges = gpt2_run
    export_gguf(run, str(tmp_path / "m.gguf"), log=lambda s: None)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert field(r, "tokenizer.ggml.merges") == merges  # the files' merges, in their order
    assert len(field(r, "tokenizer.ggml.tokens")) == 264


# --------------------------------------------------------------------------- refusals and files


def test_refusals_exit_2_with_one_line(tmp_path, capsys):
    gpt2 = train_run(tmp_path, "gpt2", "gpt2", dict(n_layer=1), tokenizer="byte", steps=2)
    post = train_run(tmp_path, "post", "llama", dict(norm_placement="post", n_layer=1), tokenizer="byte", steps=2)
    lstm = train_run(tmp_path, "lstm", "pico", dict(model="lstm"), tokenizer="byte", steps=2)
    out = tmp_path / "m.gguf"
    oss = train_run(tmp_path, "oss", "gpt-oss", dict(n_layer=1, n_experts=2), tokenizer="byte", steps=2)
    for run, words in ((gpt2, "only Llama-style runs export"), (post, "norm_placement=post"), (lstm, "model=lstm"),
                       (oss, "GptOssForCausalLM-style (--format hf exports it)")):
        capsys.readouterr()
        assert main(["export", run, "--format", "gguf", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot export to gguf" in err and words in err, err
        assert not out.exists()
    assert main(["export", gpt2, "--format", "hf", "--dtype", "f16", "--out", str(tmp_path / "hf")]) == 2
    assert "--dtype is for --format gguf" in capsys.readouterr().err
    assert main(["export", gpt2, "--format", "gguf", "--dtype", "q4", "--out", str(out)]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_out_file_rules(runs, tmp_path, capsys, monkeypatch):
    run = runs["llama"]
    out = tmp_path / "m.gguf"
    assert main(["export", run, "--format", "gguf", "--out", str(out), "--dtype", "f16"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "GGUF (llama, f16)" in printed
    before = out.read_bytes()
    assert main(["export", run, "--format", "gguf", "--out", str(out)]) == 2  # exists: refused, untouched
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    (tmp_path / "file").write_text("x")
    for target, words in ((tmp_path, "is a directory"), (tmp_path / "file" / "m.gguf", "cannot create")):
        assert main(["export", run, "--format", "gguf", "--out", str(target)]) == 2
        assert words in capsys.readouterr().err

    assert main(["export", run, "--format", "gguf", "--out", str(tmp_path / "new" / "m.gguf")]) == 0  # parents made
    shutil.rmtree(tmp_path / "new")

    def fail(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)  # a failure part-way through
    assert main(["export", run, "--format", "gguf", "--out", str(out), "--overwrite"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert out.read_bytes() == before  # the earlier export intact, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m.gguf"]


# --------------------------------------------------------------------------- in llama.cpp


def _llama(path, n_ctx=64):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-all installs it)")
    # an f32 KV cache (type 0): llama.cpp's default f16 cache alone moves these logits by ~0.05
    return llama_cpp.Llama(path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0, type_k=0, type_v=0)


def _ours_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


# The largest |logit difference| allowed. f32, on the scrambled runs (logits up to ~15): the 1e-3.
# f16 and q8_0 round the weights, and llama.cpp the activations too (q8_0 x q8_0 dot products), so they are
# compared on the trained runs (logits up to ~9). Measured: f32 8e-5, f16 1.0e-3, q8_0 1.9e-2 at most;
# the bounds leave room for other builds of llama.cpp.
TOLERANCE = {"f32": 1e-3, "f16": 5e-3, "q8_0": 5e-2}
CASES = [(n + "-scrambled", "f32") for n in RUNS] + [(n, d) for n in RUNS for d in ("f16", "q8_0")]


@pytest.mark.slow
@pytest.mark.parametrize("name,dtype", CASES)
def test_llama_cpp_logits_and_greedy_tokens(runs, tmp_path, name, dtype):
    run = runs[name]
    path = str(tmp_path / "m.gguf")
    export_gguf(run, path, dtype=dtype, log=lambda s: None)
    model, tok, _ = ckpt.load_run(run)
    llm = _llama(path)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    prompt = tok.encode("0 1 2 3")
    mine = generate(model, torch.tensor([prompt]), SampleConfig(max_new_tokens=32, greedy=True))[0].tolist()
    llm.reset()
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == 32:
            break
    assert theirs == mine[len(prompt):]  # greedy: the same 32 tokens
    ids = mine[:-1]  # prompt and 31 generated tokens: every position's logits
    diff = np.abs(_llama_logits(llm, ids) - _ours_logits(model, ids)).max()
    assert diff <= TOLERANCE[dtype], diff
    assert np.abs(_ours_logits(model, ids)).max() > 1  # the logits are not all near zero


@pytest.mark.slow
def test_llama_cpp_gpt2_tokenizer(gpt2_run, tmp_path):
    run, _ = gpt2_run
    path = str(tmp_path / "m.gguf")
    export_gguf(run, path, log=lambda s: None)
    model, tok, _ = ckpt.load_run(run)
    llm = _llama(path)
    for text in TEXTS + [" the 12 cat", "the12 1212"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    ids = tok.encode(" the 12 then 1 2 12")
    assert np.abs(_llama_logits(llm, ids) - _ours_logits(model, ids)).max() <= 1e-3
