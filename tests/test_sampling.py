import math

import pytest
import torch

from picollm.config import ModelConfig, SampleConfig
from picollm.errors import PicoError
from picollm.models import build_model
from picollm.sampling import generate, next_token_distribution, parse_p_list, top_p_filter

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1])
LOGITS = PROBS.log()[None]


def dist(p):
    return next_token_distribution(LOGITS, SampleConfig(top_p=p))[0]


def test_tiny_p_is_argmax():
    torch.testing.assert_close(dist(1e-6), torch.tensor([1.0, 0, 0, 0]))


def test_p_one_is_the_full_distribution():
    torch.testing.assert_close(dist(1.0), PROBS)


def test_the_crossing_token_is_kept():
    # 0.5 < 0.6: the second token crosses p and is kept; the rest are dropped
    torch.testing.assert_close(dist(0.6), torch.tensor([0.5, 0.25, 0, 0]) / 0.75)
    # exactly reaching p with the first two: nothing more is needed
    torch.testing.assert_close(dist(0.75), torch.tensor([0.5, 0.25, 0, 0]) / 0.75)
    torch.testing.assert_close(dist(0.76), torch.tensor([0.5, 0.25, 0.15, 0]) / 0.9)


def test_top_p_keeps_order_per_row_and_at_least_one():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    out = top_p_filter(logits, 0.01)
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1]
    assert out.argmax(-1).tolist() == [1, 0]


def reference_distribution(probs: list[float], temperature: float = 1.0, top_k=None, top_p=None) -> list[float]:
    """The sampling distribution written out in plain Python, independently of picollm: temperature
    (p ** (1/T), renormalised), then the k most probable, then the smallest most-probable set whose mass
    reaches top_p (the token that crosses it kept), renormalised."""
    w = [p ** (1.0 / temperature) for p in probs]
    w = [x / sum(w) for x in w]
    ranked = sorted(range(len(w)), key=lambda i: -w[i])
    keep = ranked[:top_k] if top_k is not None else ranked
    mass = sum(w[i] for i in keep)
    if top_p is not None:
        nucleus, acc = [], 0.0
        for i in keep:
            nucleus.append(i)
            acc += w[i] / mass
            if acc >= top_p - 1e-12:
                break
        keep = nucleus
    total = sum(w[i] for i in keep)
    return [w[i] / total if i in keep else 0.0 for i in range(len(w))]


def production_frequencies(logits: torch.Tensor, cfg: SampleConfig, n: int, seed: int) -> torch.Tensor:
    """Counts (V,) of n draws by sample_next, the sampler generate() calls for every token."""
    from picollm.sampling import sample_next

    draws = sample_next(logits.expand(n, logits.size(-1)), cfg, torch.Generator().manual_seed(seed))
    return torch.bincount(draws, minlength=logits.size(-1)).double()


def chi_square(counts: torch.Tensor, want: list[float]) -> float:
    """Pearson's statistic over the tokens the reference can draw; any draw outside them is infinite."""
    n = counts.sum().item()
    stat = 0.0
    for c, p in zip(counts.tolist(), want):
        if p == 0:
            if c:
                return math.inf
            continue
        stat += (c - n * p) ** 2 / (n * p)
    return stat


def test_sampling_frequencies_follow_the_nucleus():
    cfg = SampleConfig(top_p=0.6)
    counts = production_frequencies(LOGITS, cfg, 20000, seed=0)
    freq = counts / counts.sum()
    assert freq[2] == 0 and freq[3] == 0
    assert math.isclose(freq[0].item(), 2 / 3, abs_tol=0.02)
    assert chi_square(counts, reference_distribution(PROBS.tolist(), top_p=0.6)) < CHI2_LIMIT


# Pearson's statistic for <= 6 free cells exceeds 30 with probability < 2e-5 when the sampler is right;
# a nucleus that drops the crossing token, or one not renormalised, scores in the hundreds or infinity.
CHI2_LIMIT = 30.0
WIDE = torch.tensor([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05])


@pytest.mark.parametrize("kw", [dict(top_p=0.6), dict(top_p=0.9), dict(top_p=0.4), dict(top_p=0.7),
                                dict(top_k=3), dict(top_k=4, top_p=0.7), dict(temperature=2.0, top_p=0.8),
                                dict(temperature=0.5, top_k=5), dict()], ids=str)
def test_production_sampler_matches_an_independent_reference(kw):
    """20000 draws by sample_next against the distribution computed by hand: chi-square within bounds."""
    counts = production_frequencies(WIDE.log()[None], SampleConfig(**kw), 20000, seed=5)
    want = reference_distribution(WIDE.tolist(), **kw)
    assert chi_square(counts, want) < CHI2_LIMIT, (counts.tolist(), want)


@pytest.mark.parametrize("p", [0.6, 0.9, 1.0, None])
def test_sample_next_draws_from_the_nucleus(p):
    """sample_next (inverse CDF) draws each token with the probability next_token_distribution gives it."""
    from picollm.sampling import sample_next

    cfg = SampleConfig(top_p=p)
    g = torch.Generator().manual_seed(1)
    draws = sample_next(LOGITS.expand(40000, 4), cfg, g)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, next_token_distribution(LOGITS, cfg)[0].double(), atol=0.01, rtol=0)


def test_parse_p_list():
    assert parse_p_list("greedy,0.2,1.0") == [None, 0.2, 1.0]
    with pytest.raises(PicoError):
        parse_p_list("0.5,1.5")


@pytest.mark.parametrize("family", ["lstm", "kgram", "transformer"])
def test_generate_is_seeded_and_runs_past_the_context(family):
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=family, vocab_size=30, block_size=8, n_embd=16, n_layer=1, n_head=2))
    prompt = torch.tensor([[1, 2, 3]])
    cfg = SampleConfig(max_new_tokens=20, top_p=0.9, seed=7)
    a, b = generate(model, prompt, cfg), generate(model, prompt, cfg)
    assert a.shape == (1, 23) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)


def test_greedy_generation_matches_full_recompute():
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="transformer", vocab_size=30, block_size=8, n_embd=16, n_layer=1, n_head=2))
    model.eval()
    out = generate(model, torch.tensor([[1, 2, 3]]), SampleConfig(max_new_tokens=5, greedy=True))
    seq = [1, 2, 3]
    for _ in range(5):  # within block_size: identical to argmax of a full forward
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out[0].tolist() == seq


def test_stop_at_eot():
    class Eot(torch.nn.Module):  # a model that always predicts token 0
        max_context = None

        def new_state(self, b, device):
            return None

        def step(self, idx, state):
            logits = torch.full((idx.size(0), idx.size(1), 5), -10.0)
            logits[..., 0] = 10.0
            return logits, state

    out = generate(Eot(), torch.tensor([[3, 4]]), SampleConfig(max_new_tokens=10, greedy=True, stop_at_eot=True), eot_id=0)
    assert out[0].tolist() == [3, 4, 0]


@pytest.mark.parametrize("scale, width", [(8.0, 256), (0.1, 4096)])  # peaked: nucleus in the top 256; flat: not
def test_top_p_over_a_large_vocabulary_matches_the_full_sort(monkeypatch, scale, width):
    """On a CPU top-p first looks among the top NUCLEUS_PROBE ids and sorts everything only when the
    nucleus is wider: the draws are the same as with a full sort, for the same uniform numbers."""
    import picollm.sampling as sampling

    torch.manual_seed(0)
    logits = torch.randn(64, 4096) * scale  # distinct values: no ties to order differently
    cfg = SampleConfig(top_p=0.9)
    widths = []
    real = sampling._nucleus_prefix
    monkeypatch.setattr(sampling, "_nucleus_prefix", lambda probs, p: widths.append(real(probs, p)[0].size(-1)) or real(probs, p))
    fast = sampling.sample_next(logits, cfg, torch.Generator().manual_seed(3))
    assert widths == [width]
    monkeypatch.setattr(sampling, "NUCLEUS_PROBE", 10 ** 9)  # always the full sort
    full = sampling.sample_next(logits, cfg, torch.Generator().manual_seed(3))
    assert widths[-1] == 4096
    assert torch.equal(fast, full)
    assert len(set(fast.tolist())) > 1
