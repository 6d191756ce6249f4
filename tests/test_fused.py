"""The fused CPU decode step (models/fused_decode.c) against the PyTorch Transformer it stands in for."""

import copy
import dataclasses
import itertools
import subprocess

import pytest
import torch

import picollm.models.fused as fused
from picollm import sampling
from picollm.config import ModelConfig, SampleConfig
from picollm.errors import PicoError
from picollm.models import build_model
from picollm.models.fused import FusedDecoder, FusedRows, bf16_rounded, fused_unavailable
from picollm.sampling import decode_steps, decoder_for, generate


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


def test_fused_step_with_bf16_weights_is_the_float32_math_on_bf16_matmul_operands():
    """bf16 weights take bf16 inputs (as PyTorch's bf16 model and llama.cpp's f16 do; _mm512_dpbf16_ps multiplies
    them): the step equals float32 PyTorch on the rounded weights with every matmul's input rounded to bf16
    (the products are exact in float32; only the order of the sums differs), and with K and V rounded to
    bf16 as the step's KV cache holds them. Norms, residual and attention stay float32."""
    sinusoidal = ModelConfig(vocab_size=97, block_size=32, n_embd=64, n_layer=2, n_head=4, pos_emb="sinusoidal")
    s = copy.deepcopy(perturbed(sinusoidal)).to(torch.bfloat16)  # its position table (a buffer) rounded too
    idx = torch.randint(97, (2, 32))
    diff = (stepped_logits(FusedDecoder(s), idx, prefill=5) - bf16_rounded(s)(idx)[:, 4:]).abs()
    assert diff.max() < 5e-3 and (diff.amax(-1) < 1e-5).float().mean() >= 0.8, diff.amax(-1)
    cfg = ModelConfig(vocab_size=97, block_size=32, n_embd=64, n_layer=2, n_head=4)
    m = perturbed(cfg)
    bf = copy.deepcopy(m).to(torch.bfloat16)
    rounded = bf16_rounded(bf)
    idx = torch.randint(97, (2, 32))
    got = stepped_logits(FusedDecoder(bf), idx, prefill=5)
    # where the two float32 sums differ in their last bits an input (or a K or V element) may round to the
    # other bf16 neighbour: that position's logits then move by up to ~3e-3; the others agree to float32
    # rounding
    diff = (got - rounded(idx)[:, 4:]).abs()
    per_position = diff.amax(-1)
    assert diff.max() < 5e-3 and diff.median() < 1e-5 and (per_position < 1e-5).float().mean() >= 0.85, per_position
    # and it really read bf16 weights and inputs: the float32 model's logits differ by far more than that
    assert (got - m(idx)[:, 4:]).abs().median() > 100 * diff.median()
    unrounded = build_model(cfg).eval()
    unrounded.load_state_dict(rounded.state_dict())
    unrounded.rope_cos.copy_(rounded.rope_cos)
    unrounded.rope_sin.copy_(rounded.rope_sin)
    assert (got - unrounded(idx)[:, 4:]).abs().median() > 20 * diff.median()  # the inputs are rounded too


def test_a_rows_logits_do_not_depend_on_the_batch():
    """Every dot product sums in one order whatever the batch: a row stepped alone and beside 2..7 others
    (at other positions, in other slots) gets bit-identical logits, for each weight type."""
    cfg = ModelConfig(vocab_size=150, block_size=40, n_embd=96, n_layer=2, n_head=4)
    m = perturbed(cfg, seed=2)
    for weights in ("fp32", "bf16", "int8"):
        dec = FusedDecoder(m, weights)
        idx = torch.randint(150, (8, 12))
        alone = []
        for r in range(8):
            st = dec.new_state(1)
            alone.append(dec.step(idx[r:r + 1], st)[0][0, 0].clone())
        for B in (2, 3, 5, 8):
            st = dec.new_state(8)
            slots = torch.randperm(8)[:B]
            dec.feed(st, idx[:B], torch.zeros(B, dtype=torch.int32), slots)
            for r in range(B):
                assert torch.equal(st.logits[slots[r], 0], alone[r]), (weights, B, r)


def test_generate_draws_the_same_tokens_through_either_decoder(monkeypatch):
    """generate() through the fused decoder runs the whole loop in C (one FusedRows.run call for every
    token); the tokens equal the Python loop's over the PyTorch step, and over the fused step."""
    cfg = ModelConfig(vocab_size=50, block_size=16, n_embd=32, n_layer=2, n_head=2)
    m = perturbed(cfg, seed=3)
    prompt = torch.randint(50, (2, 5))
    runs, real_run = [], FusedRows.run
    monkeypatch.setattr(FusedRows, "run", lambda self, n, u, keep=False: runs.append(n) or real_run(self, n, u, keep))
    for scfg in (SampleConfig(max_new_tokens=40, greedy=True),  # 40 > block_size: the window slides
                 SampleConfig(max_new_tokens=40, top_p=0.9, temperature=1.3, seed=7),
                 SampleConfig(max_new_tokens=40, top_k=5, seed=11),
                 SampleConfig(max_new_tokens=40, top_k=7, top_p=0.6, temperature=0.8, seed=5)):
        runs.clear()
        a = generate(m, prompt, scfg, decoder="fused")
        assert runs == [40]  # one call into C for the whole loop
        b = generate(m, prompt, scfg, decoder="torch")
        assert runs == [40]  # the PyTorch path never touched it
        with torch.no_grad():
            c = torch.stack([t for t, _ in sampling._decode(FusedDecoder(m), prompt, scfg, None)], dim=1)
        assert a.shape == (2, 45)
        assert torch.equal(a, b), scfg
        assert torch.equal(a[:, 5:], c), scfg


def test_the_c_loop_streams_in_chunks_with_the_logits_of_each_draw():
    """decode_steps with chunk k: the same tokens in calls of k positions; each yielded logits row is the
    distribution the token was drawn from (greedy: its argmax); stop at end-of-text ends every row."""
    cfg = ModelConfig(vocab_size=40, block_size=12, n_embd=32, n_layer=2, n_head=2)
    m = perturbed(cfg, seed=4)
    prompt = torch.randint(40, (3, 4))
    scfg = SampleConfig(max_new_tokens=30, top_p=0.8, seed=3)
    whole = torch.stack([t for t, _ in decode_steps(m, prompt, scfg, decoder="fused", chunk=30, logits=False)])
    for k in (1, 7):
        got = list(decode_steps(m, prompt, scfg, decoder="fused", chunk=k))
        assert torch.equal(torch.stack([t for t, _ in got]), whole)
    greedy = SampleConfig(max_new_tokens=30, greedy=True)
    for t, lg in decode_steps(m, prompt, greedy, decoder="fused", chunk=4):
        assert torch.equal(t, lg.argmax(-1))
    eot = int(whole[:, :2].flatten().mode().values)  # drawn by rows 0 and 1 at least
    stop = SampleConfig(max_new_tokens=30, top_p=0.8, seed=3, stop_at_eot=True)
    a = torch.stack([t for t, _ in decode_steps(m, prompt, stop, eot_id=eot, decoder="fused", chunk=30)])
    b = torch.stack([t for t, _ in sampling._decode(FusedDecoder(m), prompt, stop, eot)])
    assert torch.equal(a, b)
    assert a.size(0) == 30 or bool((a[-1] == eot).all())  # it ends when every row has finished
    for r in range(3):
        hits = (a[:, r] == eot).nonzero()
        assert r == 2 or len(hits)
        if len(hits):  # a finished row stays finished
            assert bool((a[int(hits[0]):, r] == eot).all())


def test_auto_picks_fused_for_a_cpu_transformer():
    t = build_model(ModelConfig(vocab_size=20, block_size=8, n_embd=16, n_head=2))
    lstm = build_model(ModelConfig(model="lstm", vocab_size=20, n_embd=16))
    assert isinstance(decoder_for(t), FusedDecoder)
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
    k_before = state.k[:, :, :, :8].clone()  # the cache's positions (uninitialized past the written ones)
    with pytest.raises(IndexError, match=r"\[0, 20\)"):
        dec.step(torch.tensor([[4, 20]]), state)
    with pytest.raises(IndexError):
        dec.step(torch.tensor([[-1]]), state)
    assert state.pos == 3 and torch.equal(state.k[:, :, :, :8].nan_to_num(), k_before.nan_to_num())
    with pytest.raises(ValueError, match="KV cache full"):
        dec.step(torch.zeros(1, 6, dtype=torch.long), state)


def test_each_failure_of_the_c_step_names_its_own_cause():
    """pico_forward returns a distinct code per failure (bad token, position, no tokens, missing weight);
    each surfaces as its own message, never all as "bad token ids"."""
    m = build_model(ModelConfig(vocab_size=20, block_size=8, n_embd=16, n_head=2)).eval()
    dec = FusedDecoder(m)
    state = dec.new_state(1)
    dec.step(torch.tensor([[1, 2]]), state)
    k_before = state.k[:, :, :, :8].clone()  # the cache's positions (uninitialized past the written ones)
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
    assert state.pos == 2 and torch.equal(state.k[:, :, :, :8].nan_to_num(), k_before.nan_to_num())


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


SAMPLERS = [SampleConfig(greedy=True), SampleConfig(), SampleConfig(temperature=0.7), SampleConfig(top_k=1),
            SampleConfig(top_k=20, temperature=1.5), SampleConfig(top_p=0.9), SampleConfig(top_p=0.3, temperature=0.6),
            SampleConfig(top_p=0.95, top_k=50), SampleConfig(top_p=0.999, temperature=2.0)]


@pytest.mark.parametrize("scfg", SAMPLERS, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}-g{int(c.greedy)}")
def test_the_c_sampler_draws_what_sample_next_draws(scfg):
    """Over 400 seeds of 8 rows each, peaked and flat rows, vocabularies of 37 and 4096: the C sampler given
    the uniform numbers sample_next draws picks its token. The C softmax's exp is not torch's bit for bit,
    so where u lands within float rounding (1e-6) of the boundary between two neighbouring tokens of the
    cumulative distribution either may be picked: the only difference allowed, and it must be rare."""
    from picollm.models.fused import sample_rows
    from picollm.sampling import sample_next

    boundary = total = 0
    for V in (37, 4096):
        for seed in range(200):
            g = torch.Generator().manual_seed(seed)
            scale = (0.5, 2.0, 6.0)[seed % 3]  # flat to peaked
            logits = torch.randn(8, V, generator=g) * scale
            logits[seed % 8, : V // 5] = logits[seed % 8, 0]  # ties among the leaders
            want = sample_next(logits, scfg, torch.Generator().manual_seed(seed))
            u = None if scfg.greedy else torch.rand(8, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
            got = sample_rows(logits, scfg, u)
            total += 8
            for r in (~(logits[torch.arange(8), want] == logits[torch.arange(8), got])).nonzero()[:, 0].tolist():
                assert _at_a_boundary(logits[r], scfg, float(u[r]), int(want[r]), int(got[r])), (V, seed, r)
                boundary += 1
    assert boundary <= total // 1000, f"{boundary} of {total} draws fell on a boundary"


def _at_a_boundary(logits, scfg, u: float, a: int, b: int) -> bool:
    """Tokens a and b neighbour in the draw's order (by id without top-p, by probability with it) and u
    times the kept mass is within 1e-6 of the cumulative probability between them."""
    from picollm.sampling import next_token_distribution

    full = next_token_distribution(logits[None], dataclasses.replace(scfg, top_p=None))[0].double()
    if scfg.top_p is None:
        order = torch.arange(full.numel())
        mass = 1.0
    else:
        order = torch.argsort(full, descending=True, stable=True)
        kept = next_token_distribution(logits[None], scfg)[0] > 0
        mass = float(full[kept].sum())
    rank = {int(t): i for i, t in enumerate(order.tolist())}
    ra, rb = rank[a], rank[b]
    if abs(ra - rb) != 1:
        return False
    edge = float(full[order[: max(ra, rb)]].sum())
    return abs(u * mass - edge) < 1e-6


def test_int8_weights_compute_the_float_math_on_the_rounded_weights_and_inputs():
    """--weights int8: the C step equals PyTorch on the int8 round trip of the same weights with every
    matmul's input quantized the same way (int8_rounded: so the kernel reads each group's scale right, and
    the partial last groups of a 48-wide model), and it really is int8: the float32 logits differ by far
    more than that."""
    from picollm.models.fused import int8_rounded, quantize_int8

    cfg = ModelConfig(vocab_size=97, block_size=32, n_embd=64, n_layer=2, n_head=4, mlp="gelu", bias=True)
    m = perturbed(cfg)
    assert m.blocks[0].mlp.proj.weight.size(1) % 32 == 0
    idx = torch.randint(97, (2, 32))
    got = stepped_logits(FusedDecoder(m, "int8"), idx, prefill=6)
    torch.testing.assert_close(got, int8_rounded(m)(idx)[:, 5:], atol=1e-5, rtol=1e-5)
    assert (got - m(idx)[:, 5:]).abs().max() > 1e-2
    q, scale = quantize_int8(torch.randn(5, 48))  # 48 inputs: a group of 32, a partial one of 16
    assert q.dtype == torch.int8 and scale.shape == (5, 2) and int(q.abs().max()) == 127
    swiglu = ModelConfig(vocab_size=61, block_size=16, n_embd=48, n_layer=1, n_head=2)  # n_embd 48: partial groups
    s = perturbed(swiglu)
    idx = torch.randint(61, (1, 16))
    torch.testing.assert_close(stepped_logits(FusedDecoder(s, "int8"), idx, 4), int8_rounded(s)(idx)[:, 3:],
                               atol=1e-5, rtol=1e-5)


def test_int8_scales_are_per_row_group_and_per_input_group():
    """Outlier weight rows (x50) and the outlier activations they make: each row's and each input group's own
    scale keeps the rest exact. An input that lands within float rounding of a quantization step's midpoint
    may round the other way in C than in PyTorch (their float sums differ in the last bit): that moves its
    position's logits by about one step, so a few positions may differ by that much, the rest match."""
    from picollm.models.fused import int8_rounded

    cfg = ModelConfig(vocab_size=97, block_size=32, n_embd=64, n_layer=2, n_head=4, mlp="gelu", bias=True)
    m = perturbed(cfg)
    m.blocks[0].mlp.fc.weight.data[:8] *= 50
    idx = torch.randint(97, (2, 32))
    got = stepped_logits(FusedDecoder(m, "int8"), idx, prefill=6)
    with torch.no_grad():
        err = (got - int8_rounded(m)(idx)[:, 5:]).abs().amax(-1)  # per position
    assert float((err < 1e-5).float().mean()) >= 0.8, err
    assert float(err.max()) < 1e-2, err
    assert (got - m(idx)[:, 5:]).abs().max() > 2e-2


def test_int8_logits_stay_within_one_and_a_half_percent_of_the_bf16_steps():
    """The stated tolerance of --weights int8: on a model whose logits span about +-10, the int8 step's
    logits are within 1.5% of the largest |logit| of the bf16 step's (bench/RESULTS.md: 0.8% on a trained
    T4 run, test loss +0.0000 nats), and greedy decoding picks the same tokens nearly everywhere."""
    cfg = ModelConfig(vocab_size=512, block_size=64, n_embd=128, n_layer=3, n_head=4)
    m = perturbed(cfg, seed=1)
    with torch.no_grad():
        m.head.weight.mul_(4)  # logits of a trained model's size
    idx = torch.randint(512, (2, 64))
    bf = stepped_logits(FusedDecoder(m, "bf16"), idx, prefill=8)
    q8 = stepped_logits(FusedDecoder(m, "int8"), idx, prefill=8)
    span = bf.abs().max()
    assert span > 5
    assert (q8 - bf).abs().max() <= 0.015 * span
    assert (q8.argmax(-1) == bf.argmax(-1)).float().mean() >= 0.95


def test_generate_batch_decodes_ragged_prompts_alike_through_both_paths():
    """Prompts of 2, 9 and 5 tokens in one batch: the C loop (a slot and position per row) and the PyTorch
    path (a state per row) give the same tokens for a seed; greedy rows equal each prompt decoded alone;
    a row that draws end-of-text ends there while the others go on."""
    from picollm.sampling import generate_batch

    cfg = ModelConfig(vocab_size=60, block_size=16, n_embd=32, n_layer=2, n_head=2)
    m = perturbed(cfg, seed=6)
    prompts = [[1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]]
    for scfg in (SampleConfig(max_new_tokens=30, greedy=True), SampleConfig(max_new_tokens=30, top_p=0.9, seed=2),
                 SampleConfig(max_new_tokens=30, top_k=8, temperature=0.8, seed=9)):
        fused_rows = generate_batch(m, prompts, scfg, decoder="fused")
        torch_rows = generate_batch(m, prompts, scfg, decoder="torch")
        assert fused_rows == torch_rows, scfg
        assert [len(r) - len(p) for r, p in zip(fused_rows, prompts)] == [30, 30, 30]
        if scfg.greedy:  # no random numbers: each row as it decodes alone (past block_size: the window slides)
            for p, row in zip(prompts, fused_rows):
                assert generate(m, torch.tensor([p]), scfg, decoder="fused")[0].tolist() == row
    eot = fused_rows[1][len(prompts[1]) + 3]  # the 4th token of row 1: make it end-of-text
    stop = SampleConfig(max_new_tokens=30, top_k=8, temperature=0.8, seed=9, stop_at_eot=True)
    a = generate_batch(m, prompts, stop, eot_id=eot, decoder="fused")
    assert a == generate_batch(m, prompts, stop, eot_id=eot, decoder="torch")
    assert a[1][-1] == eot and len(a[1]) <= len(prompts[1]) + 4
    assert all(row[len(p):].count(eot) <= 1 for p, row in zip(prompts, a))


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_a_prompt_goes_through_the_layers_in_chunks(monkeypatch, placement):
    """The prefill feeds up to the scratch's rows of (row, position) pairs at once: with room for 3, a
    10-token prompt of 2 rows goes in chunks of 1 position (2 rows) and 12 tokens of 1 row in chunks of 3;
    the logits equal the full-sequence forward either way (fp32), and equal the same decoder's with room
    for every position (bf16, int8: a layer's MLP residual is added in the next layer's first loop, the
    last layer's only for the positions the head reads)."""
    cfg = ModelConfig(vocab_size=61, block_size=24, n_embd=48, n_layer=3, n_head=4, sliding_window=5,
                      norm_placement=placement)
    m = perturbed(cfg, seed=7)
    bf = copy.deepcopy(m).to(torch.bfloat16)
    for B, prefill in ((2, 10), (1, 12)):
        idx = torch.randint(61, (B, 20))
        whole = {w: stepped_logits(FusedDecoder(model, w), idx, prefill) for w, model in (("model", bf), ("int8", m))}
        with monkeypatch.context() as mp:
            mp.setattr(fused, "PREFILL_ROWS", 3)
            dec = FusedDecoder(m)
            assert dec.new_state(B).rows == 3
            torch.testing.assert_close(stepped_logits(dec, idx, prefill), m(idx)[:, prefill - 1:], atol=2e-5, rtol=1e-4)
            for w, model in (("model", bf), ("int8", m)):
                assert torch.equal(stepped_logits(FusedDecoder(model, w), idx, prefill), whole[w]), w


def test_generate_reuses_the_decoder_until_a_weight_changes():
    """decoder_for keeps one FusedDecoder per model (its weight copies and KV caches reused across calls)
    while no parameter changes; a training step's in-place update, or a cast, makes a new one, whose
    logits follow the new weights."""
    cfg = ModelConfig(vocab_size=50, block_size=16, n_embd=32, n_layer=1, n_head=2)
    m = perturbed(cfg, seed=8)
    d1 = decoder_for(m)
    assert decoder_for(m) is d1
    idx = torch.randint(50, (1, 6))
    before = generate(m, idx, SampleConfig(max_new_tokens=8, greedy=True))
    with torch.no_grad():
        m.ln_f.weight.mul_(-1.0)  # a norm weight: the decoder holds a float32 copy of it
    d2 = decoder_for(m)
    assert d2 is not d1
    after = generate(m, idx, SampleConfig(max_new_tokens=8, greedy=True))
    torch.testing.assert_close(stepped_logits(d2, idx, 6)[:, 0], m(idx)[:, -1], atol=2e-5, rtol=1e-4)
    assert not torch.equal(before, after)


def test_the_plain_c_build_computes_the_same_math(monkeypatch):
    """Built without -march=native (a CPU without AVX-512: every kernel's plain-C branch), the step still
    computes PyTorch's math on what it reads: fp32 to float32 rounding; bf16 and int8 against their
    references (bf16_rounded, int8_rounded) except where a value rounds to the other bf16 or int8
    neighbour than in PyTorch (the float sums differ in the last bits). Such a flip moves its position's
    logits by about a step, and through the KV cache the rest of its row: one row of four at most here."""
    from picollm.models.fused import int8_rounded

    cfg = ModelConfig(vocab_size=97, block_size=32, n_embd=48, n_layer=2, n_head=4)  # 48: partial int8 groups
    m = perturbed(cfg, seed=3)
    bf = copy.deepcopy(m).to(torch.bfloat16)
    idx = torch.randint(97, (4, 20))
    native_lib = fused._library()
    monkeypatch.setattr(fused, "_FLAGS", [["-O3", "-fopenmp"], ["-O3"]])
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_lib_error", None)
    plain_lib = fused._library()
    assert plain_lib._name != native_lib._name
    code = subprocess.run(["objdump", "-d", plain_lib._name], capture_output=True, text=True, check=True).stdout
    assert "zmm" not in code  # no AVX-512 instruction: the plain-C branches
    with torch.no_grad():
        torch.testing.assert_close(stepped_logits(FusedDecoder(m, "fp32"), idx, 5), m(idx)[:, 4:], atol=2e-5, rtol=1e-4)
        for model, weights, ref in ((bf, "model", bf16_rounded(bf)), (m, "int8", int8_rounded(m))):
            diff = (stepped_logits(FusedDecoder(model, weights), idx, 5) - ref(idx)[:, 4:]).abs()
            per_position = diff.amax(-1)
            assert diff.max() < 5e-3 and (per_position < 1e-5).float().mean() >= 0.7, (weights, per_position)
