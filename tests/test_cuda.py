"""The CUDA paths: bf16 autocast and fp16 loss scaling in training, SDPA's CUDA kernels against the CPU
forward, KV-cache decoding and top-p sampling on the GPU, torch.compile. Skipped, with the reason,
on a machine without a CUDA device (the CPU paths have their own tests)."""

import math

import pytest
import torch
from torch.testing import assert_close

from picollm import checkpoint as ckpt
from picollm.config import DataConfig, ModelConfig, SampleConfig, TrainConfig
from picollm.device import resolve_precision
from picollm.models import build_model
from picollm.sampling import generate, next_token_distribution, sample_next
from picollm.training import train
from picollm.training.compile import maybe_compile

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the CUDA paths are checked where one is present")

TINY = dict(model="transformer", vocab_size=64, block_size=32, n_embd=64, n_layer=2, n_head=4)


def test_auto_precision_on_cuda_is_bf16_where_supported():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert resolve_precision("auto", "cuda") == want
    assert resolve_precision("fp16", "cuda") == torch.float16


@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_training_on_cuda_learns_and_keeps_fp32_master_weights(tmp_path, precision):
    data = DataConfig(dataset="numbers", numbers_count=300, tokenizer="byte", seed=1)
    tcfg = TrainConfig(epochs=1, max_steps_per_epoch=60, batch_size=16, learning_rate=3e-3, warmup_steps=5,
                       eval_batches=2, device="cuda", precision=precision, prompt="0 1 2", max_new_tokens=4)
    mcfg = ModelConfig(model="transformer", block_size=32, n_embd=64, n_layer=2, n_head=4)
    run = str(tmp_path / precision)
    summary = train(mcfg, data, tcfg, run, progress=False, log=lambda s: None)
    assert math.isfinite(summary["test_loss"]) and summary["test_loss"] < math.log(256) - 1.0
    model, _, _ = ckpt.load_run(run)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cuda_forward_matches_the_cpu_forward():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY)).eval()
    idx = torch.randint(64, (3, 32))
    with torch.no_grad():
        ref = model(idx)
        gpu = model.cuda()
        assert_close(gpu(idx.cuda()).cpu(), ref, rtol=1e-4, atol=1e-4)  # fp32: SDPA's CUDA kernels
        if torch.cuda.is_bf16_supported():
            with torch.autocast("cuda", dtype=torch.bfloat16):  # flash attention under bf16
                low = gpu(idx.cuda()).float().cpu()
            assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_kv_cache_decoding_on_cuda_matches_recompute():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY)).cuda().eval()
    prompt = torch.tensor([[1, 2, 3]], device="cuda")
    out = generate(model, prompt, SampleConfig(max_new_tokens=10, greedy=True))
    seq = [1, 2, 3]
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq], device="cuda"))[0, -1].argmax()))
    assert out[0].tolist() == seq


def test_top_p_on_cuda_draws_from_the_nucleus():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    cfg = SampleConfig(top_p=0.6)
    g = torch.Generator(device="cuda").manual_seed(1)
    draws = sample_next(probs.log()[None].expand(40000, 4).cuda(), cfg, g)
    freq = torch.bincount(draws, minlength=4).double().cpu() / draws.numel()
    assert_close(freq, next_token_distribution(probs.log()[None], cfg)[0].double(), atol=0.01, rtol=0)


def test_compile_on_cuda_matches_eager():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY)).cuda().eval()
    compiled = maybe_compile(model, log=pytest.fail)  # a fallback to eager fails the test
    idx = torch.randint(64, (2, 32), device="cuda")
    with torch.no_grad():
        assert_close(compiled(idx), model(idx), rtol=1e-4, atol=1e-4)
