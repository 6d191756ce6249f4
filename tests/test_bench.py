"""`pico-llm bench` on shrunken sizes: the JSON has the documented shape and every figure is a real,
positive measurement. (Speed itself is never asserted in a unit test: see bench/RESULTS.md.)"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import picollm.bench as bench
import picollm.models.fused as fused
from picollm.cli import main

TINY_T4 = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=300)
FUSED_SOURCE = Path(fused.__file__).with_name("fused_decode.c")


def c_step_builds_here(tmp_path) -> bool:
    """Whether this machine can build the fused decode step, found out without picollm: compile its C
    source with the system compiler ($CC, else cc) ourselves. (The bench's model is a CPU Transformer in
    fp32 or bf16, which the step serves wherever it builds.)"""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return False
    cmd = [cc, "-O0", "-std=gnu99", "-shared", "-fPIC", "-o", str(tmp_path / "probe.so"), str(FUSED_SOURCE), "-lm"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused decoder's feeds (a prompt, or a step of the Python loop), so a test sees which step
    generation really ran."""
    calls = []
    real = fused.FusedDecoder.feed
    monkeypatch.setattr(fused.FusedDecoder, "feed", lambda self, st, idx, *a: calls.append(idx.size(1)) or real(self, st, idx, *a))
    return calls


def test_bench_json_shape(tmp_path, monkeypatch, capsys, fused_calls):
    monkeypatch.setattr(bench, "T4", TINY_T4)
    monkeypatch.setattr(bench, "KGRAM_LOOP", dict(V=500, k=3, C=32, T=8, B=2))
    monkeypatch.setattr(bench, "TOKENIZE_MB", {True: 0.2, False: 0.2})
    monkeypatch.setattr(bench, "QUALITY_STEPS", {True: 3, False: 3})
    monkeypatch.setattr(bench, "PEAK_MATMUL_N", 256)
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out), "--precision", "bf16"]) == 0
    res = json.loads(out.read_text())
    for fam in ("transformer", "lstm", "kgram"):
        assert res["train"][fam]["tokens_per_s"] > 0 and 0 < res["train"][fam]["mfu"]
        assert res["train"][fam]["precision"] == "bf16"
    assert res["train"]["reference_gpt"]["tokens_per_s"] > 0
    g = res["generate"]
    assert g["kv_cache_tokens_per_s"] > 0 and g["recompute_tokens_per_s"] > 0 and "hf_tokens_per_s" in g
    assert g["precision"] == "bf16" and g["kv_cache_fp32_tokens_per_s"] > 0  # ours in bf16 and in fp32
    # the fused decode step where this machine can build it (and it really ran), and the PyTorch step
    # timed beside it
    assert g["decoder"] == ("fused" if c_step_builds_here(tmp_path) else "torch")
    assert bool(fused_calls) == (g["decoder"] == "fused")
    assert g["kv_cache_torch_tokens_per_s"] > 0 and g["kv_cache_torch_vs_recompute"] > 0
    if g["hf_tokens_per_s"] is not None:  # the hf extra is installed: HF in fp32 and in bf16
        assert g["hf_same_precision_tokens_per_s"] > 0 and g["kv_cache_vs_hf"] > 0
    v = res["variants"]  # GQA, MQA and MoE beside the dense model: training and decoding
    assert set(v) == {"dense", "gqa", "mqa", "moe", "moe_top2"}
    assert all(r["train_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in v.values())
    assert v["dense"]["train_vs_dense"] == v["dense"]["decode_vs_dense"] == 1.0
    assert v["mqa"]["params"] < v["dense"]["params"] < v["moe"]["params"]  # fewer kv heads; more experts
    assert v["moe"]["decoder"] == "torch" and v["gqa"]["decoder"] == g["decoder"]  # the C step declines MoE only
    assert v["moe_top2"]["flops_per_token"] > v["moe"]["flops_per_token"] > v["dense"]["flops_per_token"]
    assert "| moe |" in capsys.readouterr().out.replace("moe_top2", "")
    d = res["decode"]  # the C decode loop: our weights against llama.cpp's (null without it), streams against one
    vs = d["vs_llama_cpp"]
    try:
        import llama_cpp  # noqa: F401  (make test-all installs it)
        assert vs["tokens_per_s"]["pico_int8"] > 0 and vs["tokens_per_s"]["llama_q8_0"] > 0
        assert set(vs["ratios"]) == {"fp32 vs f32", "bf16 vs f16", "int8 vs q8_0"}
    except ImportError:
        assert vs["llama_cpp"] is None and "not installed" in vs["note"]
    assert d["streams"]["streams"] == 8
    assert all(r["one_tokens_per_s"] > 0 and r["streams_tokens_per_s"] > 0 for r in d["streams"]["weights"].values())
    assert set(d["streams"]["weights"]) == {"fp32", "bf16", "int8"}
    assert res["kgram_vs_loop"]["ratio"] > 0
    for kind in ("english", "numeric"):  # bpe tokenization: ours (tiktoken with the bpe's ranks) beside HF's
        d = res["data"][kind]
        assert d["encoder"] == "tiktoken" and d["ids_identical"] is True
        assert d["tokenize_mb_per_s"] > 0 and d["hf_encode_batch_mb_per_s"] > 0 and 0 < d["tokens_per_byte"] < 1
    assert res["peak_gflops"]["fp32"] > 0 and res["peak_gflops"]["bf16"] > 0
    assert res["quality"]["transformer"]["test_loss"] > 0 and res["quality"]["reference_gpt"]["test_loss"] > 0
    assert isinstance(res["device"], str)


@pytest.mark.parametrize("fused_on", [True, False], ids=["fused-step-builds", "no-fused-step"])
def test_generate_bench_labels_the_decode_step_it_timed(monkeypatch, tmp_path, fused_calls, fused_on):
    """The label follows the machine: with the fused step taken away (its build failing, as without a
    compiler) the bench times and labels the PyTorch step; where it builds, the fused one."""
    if fused_on and not c_step_builds_here(tmp_path):
        pytest.skip("no C compiler that builds fused_decode.c here")
    monkeypatch.setattr(bench, "T4", TINY_T4)
    if not fused_on:
        monkeypatch.setattr(fused, "_lib", None)  # forget a library built earlier in this process
        monkeypatch.setattr(fused, "_lib_error", None)
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        monkeypatch.setenv("PICOLLM_CACHE_DIR", str(tmp_path / "cache"))  # nothing built there
    g = bench.bench_generate("cpu", quick=True, precision="fp32")
    assert g["decoder"] == ("fused" if fused_on else "torch")
    assert bool(fused_calls) == fused_on  # the step it names is the step that ran
    if not fused_on:  # no fused step: the KV-cache figure is the PyTorch step's
        assert g["kv_cache_torch_tokens_per_s"] == g["kv_cache_tokens_per_s"]
