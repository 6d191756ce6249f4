"""`pico-llm bench` on shrunken sizes: the JSON has the documented shape and every figure is a real,
positive measurement. (Speed itself is never asserted in a unit test: see bench/RESULTS.md.)"""

import json

import picollm.bench as bench
from picollm.cli import main


def test_bench_json_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "T4", dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=300))
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
    from picollm.models.fused import fused_unavailable

    # the fused decode step where this machine can build it, and the PyTorch step timed beside it
    assert g["decoder"] == ("torch" if fused_unavailable(bench.build_model(bench.t4_model_configs()["transformer"]))
                            else "fused")
    assert g["kv_cache_torch_tokens_per_s"] > 0 and g["kv_cache_torch_vs_recompute"] > 0
    if g["hf_tokens_per_s"] is not None:  # the hf extra is installed: HF in fp32 and in bf16
        assert g["hf_same_precision_tokens_per_s"] > 0 and g["kv_cache_vs_hf"] > 0
    assert res["kgram_vs_loop"]["ratio"] > 0
    assert res["data"]["tokenize_mb_per_s"] > 0
    assert res["peak_gflops"]["fp32"] > 0 and res["peak_gflops"]["bf16"] > 0
    assert res["quality"]["transformer"]["test_loss"] > 0 and res["quality"]["reference_gpt"]["test_loss"] > 0
    assert isinstance(res["device"], str) and "transformer" in capsys.readouterr().out
