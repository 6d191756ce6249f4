"""pico-llm export --format hf: the exported model computes what ours computes, in transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from scramble import scrambled_copy

from picollm import checkpoint as ckpt
from picollm.cli import main
from picollm.config import DataConfig, SampleConfig, TrainConfig, resolve_model_config
from picollm.errors import PicoError
from picollm.export import export_hf, hf_architecture
from picollm.sampling import generate
from picollm.training import train

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[hf])")

TINY = dict(block_size=24, n_embd=32, n_layer=2, n_head=4)
TEXTS = ["0 1 2 3 4 5 6 7", "12 24 48 96 192", "3 3 3 3", "Once upon a time, a dog ran.", "  two  spaces\nand a line",
         "héllo wörld ✓", "1 2<|endoftext|>3 4", ""]
# (run name, preset, explicit flags, tokenizer): every tie / bias combination of both targets
RUNS = {
    "llama": ("llama", {}, "bpe"),  # untied, no bias
    "llama-tied-bias": ("pico", dict(bias=True), "bpe"),
    "gpt2": ("gpt2", {}, "bpe"),  # tied, biases
    "gpt2-untied-nobias": ("mingpt", dict(bias=False), "byte"),
    # the newer attention and MLP parts
    "llama3-gqa": ("llama3", dict(n_kv_heads=2), "bpe"),
    "llama3-mqa-tied-bias": ("llama3", dict(tie_weights=True, bias=True), "byte"),  # 4 heads: 1 kv head
    "qwen3-qk-norm": ("pico", dict(qk_norm=True, n_kv_heads=2), "bpe"),
    "gpt-oss": ("gpt-oss", dict(sliding_window=8, n_experts=4), "bpe"),
    "gpt-oss-plain": ("gpt-oss", dict(bias=False, attn_sinks=False, window_pattern="all", sliding_window=6,
                                      experts_per_token=1, n_kv_heads=2, n_experts=3), "byte"),
}
HF_CLASS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt-oss": "GptOssForCausalLM",
            "gpt2": "GPT2LMHeadModel"}


def train_run(root, name, preset, flags, tokenizer="bpe"):
    data = DataConfig(dataset="numbers", numbers_count=200, tokenizer=tokenizer, vocab_size=300, seed=1)
    tcfg = TrainConfig(epochs=1, max_steps_per_epoch=20, batch_size=8, learning_rate=1e-2, warmup_steps=2,
                       eval_batches=1, log_interval=3, prompt="0 1 2", max_new_tokens=2)
    mcfg = resolve_model_config(preset=preset, **{**TINY, **flags})
    run = str(root / name)
    train(mcfg, data, tcfg, run, progress=False, log=lambda s: None)
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (run dir, export dir, HF class, notes)} for every run in RUNS, trained and scrambled."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, (name, (preset, flags, tok)) in enumerate(RUNS.items()):
        run = train_run(root, name, preset, flags, tok)
        for variant, src in (("", run), ("-scrambled", None)):
            src = src or scrambled_copy(run, str(root / f"{name}{variant}"), seed=i)
            notes = []
            cls = export_hf(src, str(root / f"{name}{variant}-hf"), log=notes.append)
            out[name + variant] = (src, str(root / f"{name}{variant}-hf"), cls, notes)
    return out


@pytest.mark.parametrize("name", [n + v for n in RUNS for v in ("", "-scrambled")])
def test_logits_and_greedy_generation_match(exported, name):
    run, hf_dir, cls, _ = exported[name]
    ours, tok, (cfg, _, _) = ckpt.load_run(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    want_cls = next(c for prefix, c in HF_CLASS.items() if name.startswith(prefix))
    assert type(theirs).__name__ == cls == want_cls
    assert theirs.dtype == torch.float32
    assert theirs.config.tie_word_embeddings == cfg.tie_weights
    assert (theirs.lm_head.weight.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()) == cfg.tie_weights

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=g)  # random prompts, full context
    with torch.no_grad():
        a, b = ours(idx), theirs(idx).logits
    # fp32; ours multiplies attention out on the CPU, HF through SDPA: equal up to summation order
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert a.std() > 0.1  # the trained weights, not a degenerate model

    prompts = [tok.encode("0 1 2 3"), tok.encode("5 10 15"), idx[0, :5].tolist(), idx[1, :1].tolist()]
    generated = set()
    for prompt in prompts:
        n = cfg.block_size - len(prompt)  # within block_size: no sliding window on our side
        x = torch.tensor([prompt])
        want = generate(ours, x, SampleConfig(max_new_tokens=n, greedy=True, stop_at_eot=True), eot_id=tok.eot_id)
        want = want[0].tolist()
        if tok.eot_id in want[len(prompt):]:  # HF stops at eos (inclusive); ours pads with eot after it
            want = want[: len(prompt) + want[len(prompt):].index(tok.eot_id) + 1]
        with torch.no_grad():
            got = theirs.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
        assert got[0].tolist() == want
        generated |= set(want[len(prompt):])
    if name.endswith("-scrambled"):
        assert len(generated) >= 5, generated  # varied output: the comparison can tell caches apart


@pytest.mark.parametrize("name", [n for n, r in RUNS.items() if r[2] == "bpe"])
def test_bpe_tokenizer_loads_and_encodes_identically(exported, name):
    run, hf_dir, _, notes = exported[name]
    assert notes == []
    ours = ckpt.load_run(run)[1]
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert theirs.eos_token == theirs.bos_token == "<|endoftext|>" and theirs.eos_token_id == ours.eot_id
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == ours.decode(ids), text


def test_byte_tokenizer_run_exports_the_model_alone(exported):
    run, hf_dir, _, notes = exported["gpt2-untied-nobias"]
    assert sorted(os.listdir(hf_dir)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert len(notes) == 1 and "no tokenizer files" in notes[0] and "byte" in notes[0]
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert cfg["activation_function"] == "gelu"  # exact GELU, as F.gelu in our MLP (gelu_new is tanh)
    assert cfg["eos_token_id"] == 256 and cfg["n_positions"] == TINY["block_size"]


def _gpt2_files(d):
    """A tiny GPT-2 vocabulary in the original formats (encoder.json, vocab.bpe): 256 bytes, merges, eot."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [chr(b) for b in keep], 0
    for b in range(256):
        if b not in keep:
            chars.append(chr(256 + extra))
            extra += 1
    merges = [("Ġ", "1"), ("Ġ", "2"), ("1", "2"), ("Ġ1", "2"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    encoder = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    d.mkdir()
    (d / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return d


def test_gpt2_tokenizer_files_are_exported(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOLLM_GPT2_DIR", str(_gpt2_files(tmp_path / "gpt2files")))
    run = train_run(tmp_path, "g", "gpt2", dict(n_layer=1), tokenizer="gpt2")
    assert export_hf(run, str(tmp_path / "hf"), log=lambda s: None) == "GPT2LMHeadModel"
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "hf"))
    ours = ckpt.load_run(run)[1]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs.eos_token_id == ours.eot_id == 263
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text), text


@pytest.mark.parametrize("cfg, setting", [
    (dict(logit_softcap=5.0), "logit_softcap=5"),
    (dict(mlp="relu2"), "mlp=relu2 with pos_emb=rope"),
    (dict(attn_sinks=True), "norm=rmsnorm with pos_emb=rope"[:0] + "mlp=swiglu with pos_emb=rope"),
    (dict(attn_sinks=True, mlp="swiglu_oss"), "a dense MLP with windows, sinks or mlp=swiglu_oss"),
    (dict(n_experts=2, mlp="swiglu_oss", qk_norm=True), "qk_norm with experts, windows or sinks"),
    (dict(qk_norm=True, bias=True), "bias=True with qk_norm"),
    (dict(pos_emb="learned", norm="layernorm", mlp="gelu", n_kv_heads=2), "n_kv_heads with pos_emb=learned"),
    (dict(norm_placement="post"), "norm_placement=post"),
    (dict(pos_emb="sinusoidal"), "pos_emb=sinusoidal"),
    (dict(pos_emb="none"), "pos_emb=none"),
    (dict(norm="layernorm"), "norm=layernorm with pos_emb=rope"),
    (dict(mlp="gelu"), "mlp=gelu with pos_emb=rope"),
    (dict(pos_emb="learned"), "norm=rmsnorm with pos_emb=learned"),
    (dict(model="kgram"), "model=kgram"),
])
def test_unrepresentable_settings_are_named(cfg, setting):
    with pytest.raises(PicoError, match=f"cannot export to hf: {setting} has no Hugging Face equivalent"):
        hf_architecture(resolve_model_config(preset="pico", **cfg))
    assert hf_architecture(resolve_model_config(preset="pico")) == "LlamaForCausalLM"
    assert hf_architecture(resolve_model_config(preset="mingpt")) == "GPT2LMHeadModel"


def test_refused_export_exits_2_with_one_line(tmp_path, capsys):
    post = train_run(tmp_path, "post", "gpt2", dict(norm_placement="post", n_layer=1), tokenizer="byte")
    lstm = train_run(tmp_path, "lstm", "pico", dict(model="lstm"), tokenizer="byte")
    for run, setting in ((post, "norm_placement=post"), (lstm, "model=lstm")):
        capsys.readouterr()
        assert main(["export", run, "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and setting in err, err
        assert not (tmp_path / "hf").exists()
    assert main(["export", post, "--format", "onnx", "--out", str(tmp_path / "hf")]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_export_and_out_dir_rules(exported, tmp_path, capsys):
    run = exported["llama"][0]
    out = tmp_path / "hf"
    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "model.safetensors" in printed and "tokenizer.json" in printed
    before = (out / "model.safetensors").read_bytes()

    assert main(["export", run, "--format", "hf", "--out", str(out)]) == 2  # exists: refused, untouched
    assert "--overwrite" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == before
    (out / "stale.txt").write_text("x")
    assert main(["export", run, "--format", "hf", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").read_bytes() == before

    for target in (run, str(tmp_path)):  # never replace a run, nor a folder that is not an export
        (tmp_path / "keep.txt").write_text("keep")
        assert main(["export", run, "--format", "hf", "--out", target, "--overwrite"]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert ckpt.is_run(run) and (tmp_path / "keep.txt").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary folders left


def test_core_does_not_import_transformers():
    code = ("import sys, picollm, picollm.training, picollm.cli, picollm.export; "
            "bad = [m for m in ('transformers',) if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
