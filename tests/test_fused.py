"""The fused CPU decode step (models/fused_decode.c) against the PyTorch Transformer it stands in for."""

import copy
import itertools

import pytest
import torch

import picollm.models.fused as fused
from picollm.config import ModelConfig, SampleConfig
from picollm.errors import PicoError
from picollm.models import build_model
from picollm.models.fused import FusedDecoder, fused_unavailable
from picollm.sampling import decoder_for, generate


@pytest.fixture(autouse=True, scope="module")
def fused_built():
    """Skip the module where the fused step cannot be built. A fixture, not a skipif mark: deciding
    compiles fused_decode.c, and collecting the tests must compile nothing."""
    reason = fused_unavailable(build_model(ModelConfig(vocab_size=8, n_embd=8, n_head=2)))
    if reason is not None:
        pytest.skip(f"no fused decode step here: {reason}")


# bias and weight tying are independent axes: untied without bias, tied with bias, ... all run
VARIANTS = list(itertools.product(["rope", "learned", "sinusoidal", "none"], ["rmsnorm", "layernorm"], ["pre", "post"],
                                  ["swiglu", "gelu"], [False, True], [False, True]))


def perturbed(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A model whose norms, biases and positions are not at their init values, so each one matters."""
    torch.manual_seed(seed)
    m = build_model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def stepped_logits(stepper, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits (B, T - prefill + 1, V) at positions prefill-1 .. T-1: the prefix in one call, then a token
    at a time."""
    state = stepper.new_state(idx.size(0), "cpu")
    logits, state = stepper.step(idx[:, :prefill], state)
    out = [logits[:, -1].clone()]
    for i in range(prefill, idx.size(1)):
        logits, state = stepper.step(idx[:, i:i + 1], state)
        out.append(logits[:, -1].clone())
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("pos,norm,placement,mlp,bias,tie", VARIANTS)
def test_fused_step_matches_the_model_for_every_architecture(pos, norm, placement, mlp, bias, tie):
    cfg = ModelConfig(vocab_size=61, block_size=24, n_embd=32, n_layer=2, n_head=4, pos_emb=pos, norm=norm,
                      norm_placement=placement, mlp=mlp, bias=bias, tie_weights=tie)
    m = perturbed(cfg)
    assert (m.head.weight is m.wte.weight) == tie  # an untied head has its own (perturbed) weights
    idx = torch.randint(61, (3, 24))
    want = m(idx)[:, 9:]  # (B, 15, V): the full-sequence forward, positions 9..23
    got = stepped_logits(FusedDecoder(m), idx, prefill=10)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_fused_step_with_bf16_weights_is_the_float32_math_on_the_rounded_weights():
    cfg = ModelConfig(vocab_size=97, block_size=32, n_embd=64, n_layer=2, n_head=4)
    m = perturbed(cfg)
    bf = copy.deepcopy(m).to(torch.bfloat16)
    rounded = build_model(cfg).eval()
    rounded.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})
    rounded.rope_cos.copy_(bf.rope_cos.float())  # buffers (not in the state dict) rounded as well
    rounded.rope_sin.copy_(bf.rope_sin.float())
    idx = torch.randint(97, (2, 32))
    got = stepped_logits(FusedDecoder(bf), idx, prefill=5)
    torch.testing.assert_close(got, rounded(idx)[:, 4:], atol=2e-5, rtol=1e-4)
    # and it really read bf16: the float32 model's logits differ by more than that
    assert (got - m(idx)[:, 4:]).abs().max() > 1e-3


def test_generate_draws_the_same_tokens_through_either_decoder(monkeypatch):
    cfg = ModelConfig(vocab_size=50, block_size=16, n_embd=32, n_layer=2, n_head=2)
    m = perturbed(cfg, seed=3)
    prompt = torch.randint(50, (2, 5))
    fused_steps, real_step = [], FusedDecoder.step
    monkeypatch.setattr(FusedDecoder, "step", lambda self, idx, st: fused_steps.append(idx.size(1)) or real_step(self, idx, st))
    for scfg in (SampleConfig(max_new_tokens=40, greedy=True),  # 40 > block_size: the window slides
                 SampleConfig(max_new_tokens=40, top_p=0.9, temperature=1.3, seed=7),
                 SampleConfig(max_new_tokens=40, top_k=5, seed=11)):
        fused_steps.clear()
        a = generate(m, prompt, scfg, decoder="fused")
        # the prefix, then one call per new token but the last: single tokens, or the window rebuilt
        # from the last block_size // 2 tokens
        assert fused_steps[0] == 5 and len(fused_steps) == 40 and set(fused_steps[1:]) == {1, 8}
        b = generate(m, prompt, scfg, decoder="torch")
        assert len(fused_steps) == 40  # the PyTorch path never touched it
        assert a.shape == (2, 45)
        assert torch.equal(a, b), scfg


def test_auto_picks_fused_for_small_cpu_transformer_batches_only():
    from picollm.sampling import FUSED_MAX_BATCH

    t = build_model(ModelConfig(vocab_size=20, block_size=8, n_embd=16, n_head=2))
    lstm = build_model(ModelConfig(model="lstm", vocab_size=20, n_embd=16))
    assert isinstance(decoder_for(t), FusedDecoder)
    assert decoder_for(t, "auto", FUSED_MAX_BATCH + 1) is t
    assert isinstance(decoder_for(t, "fused", FUSED_MAX_BATCH + 1), FusedDecoder)
    assert decoder_for(t, "torch") is t
    assert decoder_for(lstm) is lstm
    with pytest.raises(PicoError, match="Transformer only"):
        decoder_for(lstm, "fused")
    assert "float32 or bfloat16" in fused_unavailable(t.half())


def test_bad_token_ids_and_a_full_cache_are_refused_without_writing():
    m = build_model(ModelConfig(vocab_size=20, block_size=8, n_embd=16, n_head=2)).eval()
    dec = FusedDecoder(m)
    state = dec.new_state(1)
    dec.step(torch.tensor([[1, 2, 3]]), state)
    k_before = state.k.clone()
    with pytest.raises(IndexError, match=r"\[0, 20\)"):
        dec.step(torch.tensor([[4, 20]]), state)
    with pytest.raises(IndexError):
        dec.step(torch.tensor([[-1]]), state)
    assert state.pos == 3 and torch.equal(state.k, k_before)
    with pytest.raises(ValueError, match="KV cache full"):
        dec.step(torch.zeros(1, 6, dtype=torch.long), state)


def test_each_failure_of_the_c_step_names_its_own_cause():
    """pico_forward returns a distinct code per failure (bad token, position, no tokens, missing weight);
    each surfaces as its own message, never all as "bad token ids"."""
    m = build_model(ModelConfig(vocab_size=20, block_size=8, n_embd=16, n_head=2)).eval()
    dec = FusedDecoder(m)
    state = dec.new_state(1)
    dec.step(torch.tensor([[1, 2]]), state)
    k_before = state.k.clone()
    with pytest.raises(IndexError, match=r"\[0, 20\), got 20 at row 0, position 1"):
        dec.step(torch.tensor([[4, 20]]), state)
    with pytest.raises(ValueError, match="nothing to feed"):
        dec.step(torch.zeros(1, 0, dtype=torch.long), state)
    state.pos = -1  # past what the Python check guards: the C step's own position check
    with pytest.raises(ValueError, match=r"positions -1\.\.-1 are outside the KV cache \[0, 8\)"):
        dec.step(torch.tensor([[3]]), state)
    state.pos = 2
    dec.weights[0] = None  # the token embedding's pointer
    with pytest.raises(RuntimeError, match="weight the fused step reads is missing"):
        dec.step(torch.tensor([[3]]), state)
    assert state.pos == 2 and torch.equal(state.k, k_before)


def test_without_a_compiler_generation_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_lib_error", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PICOLLM_CACHE_DIR", str(tmp_path / "cache"))  # nothing built there yet
    m = build_model(ModelConfig(vocab_size=20, block_size=8, n_embd=16, n_head=2))
    assert "no C compiler" in fused_unavailable(m)
    assert decoder_for(m) is m
    out = generate(m, torch.tensor([[1, 2]]), SampleConfig(max_new_tokens=5, greedy=True))
    assert out.shape == (1, 7)
    with pytest.raises(PicoError, match="--decoder fused: no C compiler"):
        generate(m, torch.tensor([[1, 2]]), SampleConfig(max_new_tokens=5), decoder="fused")
