"""Metrics against values computed by hand: continuation accuracy on sequences whose score is known,
bits per byte from the token losses of a small model on a small text."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from picollm.config import ModelConfig
from picollm.data.batches import Source, tokenize_split
from picollm.data.sources import generate_numbers
from picollm.data.tokenizers import ByteTokenizer
from picollm.metrics import continuation_accuracy, evaluate_sources
from picollm.models import build_model

TOK = ByteTokenizer()  # one token per UTF-8 byte, eot 256
V = TOK.vocab_size


# ----------------------------------------------------------------------------- continuation accuracy


class Bigram(nn.Module):
    """A tiny model whose next token is a fixed function of the last one: after a space "7", after
    anything else a space. So it greedily continues any prompt of numbers with " 7 7 7 ..."."""

    max_context = None

    def __init__(self):
        super().__init__()
        nxt = torch.full((V,), ord(" "))
        nxt[ord(" ")] = ord("7")
        self.table = nn.Parameter(F.one_hot(nxt, V).float() * 20.0, requires_grad=False)  # (V, V) logits

    def forward(self, idx):
        return self.table[idx]  # (B, T, V)

    def new_state(self, batch_size, device):
        return None

    def step(self, idx, state):
        return self.table[idx], state


class Oracle(nn.Module):
    """Knows some texts and continues a prefix of one of them byte by byte, then emits eot (and eot for
    a prefix it does not know)."""

    max_context = None

    def __init__(self, texts):
        super().__init__()
        self.texts = [TOK.encode(t) for t in texts]

    def new_state(self, batch_size, device):
        return [[] for _ in range(batch_size)]  # the ids seen, per row

    def step(self, idx, state):
        state = [seen + row for seen, row in zip(state, idx.tolist())]
        logits = torch.zeros(idx.size(0), 1, V)
        for b, seen in enumerate(state):
            n = len(seen)
            nxt = next((t[n] for t in self.texts if t[:n] == seen and len(t) > n), TOK.eot_id)
            logits[b, 0, nxt] = 1.0
        return logits, state


# truth after the 5 prompt numbers, and how many of its first 10 the Bigram's "7 7 7 ..." gets right
BIGRAM_CASES = [
    ("1 2 3 4 5 7 7 7 0 0 0 0 0 0 0", 3),
    ("10 20 30 40 50 7 17 7 77 7 1 7 2 7 3 99 7 7", 5),  # "17", "77" are not "7"; past the 10th is not scored
    ("1 2 3 4 5 7 7 7 7 7 7 7 7 7 7", 10),  # the first prompt again: decoded in the same batch
    ("-3 -2 -1 0 1 70 7 0.7 7 7 7 0 0 0 0 7", 4),  # a longer prompt: a batch of its own
]


def test_continuation_accuracy_of_a_model_that_always_says_seven():
    docs = [text for text, _ in BIGRAM_CASES] + ["1 2 3 4 5 7 7 7"]  # too short: 8 < 5 + 10 numbers, not scored
    assert continuation_accuracy(Bigram(), TOK, docs) == pytest.approx(sum(n for _, n in BIGRAM_CASES) / 40, abs=1e-12)
    # max_sequences keeps the first ones: (3 + 5) of 20
    assert continuation_accuracy(Bigram(), TOK, docs, max_sequences=2) == pytest.approx(8 / 20, abs=1e-12)
    # other prompt and continuation lengths: after "1 2 3" the 4 numbers "4 5 7 7 ..." -> 0, 0, 1, 1 ...
    assert continuation_accuracy(Bigram(), TOK, ["1 2 3 4 5 7 7 7 0 0 0 0 0 0 0"], n_prompt=3, n_next=4) == 0.5


def scored_with_distinct_prompts(docs, n_prompt=5, n_next=10):
    """The sequences long enough to be scored, one per prompt, so that an oracle keyed on the text so far
    is never ambiguous."""
    seen = {}
    for d in docs:
        if len(d.split()) >= n_prompt + n_next:
            seen.setdefault(" ".join(d.split()[:n_prompt]), d)
    return list(seen.values())


def test_a_perfect_predictor_scores_one():
    docs = scored_with_distinct_prompts(generate_numbers(120, seed=4))
    assert len(docs) > 50
    assert continuation_accuracy(Oracle(docs), TOK, docs) == 1.0


def test_a_predictor_that_stops_early_scores_the_share_it_produced():
    """An oracle that knows only the first 3 of the 10 numbers, then ends the text: the 7 missing
    numbers count as wrong, 3 / 10 exactly."""
    docs = scored_with_distinct_prompts(generate_numbers(60, seed=5))
    assert len(docs) > 20
    known = [" ".join(d.split()[:5 + 3]) for d in docs]
    assert continuation_accuracy(Oracle(known), TOK, docs) == pytest.approx(0.3, abs=1e-12)
    # and one that gets the 4th number wrong (then goes on right) loses exactly that one: 9 / 10
    wrong4 = []
    for d in docs:
        nums = d.split()
        nums[5 + 3] = "x" + nums[5 + 3]
        wrong4.append(" ".join(nums))
    assert continuation_accuracy(Oracle(wrong4), TOK, docs) == pytest.approx(0.9, abs=1e-12)


# ----------------------------------------------------------------------------- bits per byte


def small_model(block_size: int) -> nn.Module:
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=V, block_size=block_size, n_embd=16, n_layer=1, n_head=2)).eval()
    with torch.no_grad():  # away from the near-uniform init, so each token's loss differs
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


@torch.no_grad()
def nats_by_hand(model, ids: list[int], T: int, n_windows: int) -> list[float]:
    """The loss of every token predicted in the first n_windows non-overlapping windows of T inputs
    (T + 1 tokens, the window's first token is never a target)."""
    out = []
    for w in range(n_windows):
        x = torch.tensor([ids[w * T: w * T + T]])
        logp = model(x)[0].double().log_softmax(-1)  # (T, V)
        out += [-logp[t, ids[w * T + t + 1]].item() for t in range(T)]
    return out


def joined_ids(docs: list[str]) -> list[int]:
    """Every document's UTF-8 bytes followed by eot."""
    ids = []
    for d in docs:
        ids += list(d.encode("utf-8")) + [TOK.eot_id]
    return ids


# non-ASCII text: 28 characters but 34 UTF-8 bytes; 3 eot tokens: 37 tokens, 36 targets = 3 windows of 12
DOCS = ["héllo wörld", "naïve café", "ab 12 €"]


def test_bits_per_byte_is_the_token_losses_in_bits_over_the_utf8_bytes():
    ids = joined_ids(DOCS)
    n_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    assert (len(ids), n_bytes, sum(len(d) for d in DOCS)) == (37, 34, 28)
    T = 12
    model = small_model(T)
    src = Source("text", 1.0, train=tokenize_split(DOCS, TOK), test=tokenize_split(DOCS, TOK))
    r = evaluate_sources(model, [src], T, batch_size=2, max_batches=8)
    nats = nats_by_hand(model, ids, T, n_windows=3)  # every target: tokens 1..36
    mean = sum(nats) / len(nats)
    assert r["test_loss"] == pytest.approx(mean, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
    # nats per token x tokens per byte (every token of the split, eot included, over the documents'
    # UTF-8 bytes, no separator bytes) / ln 2
    assert r["bits_per_byte"] == pytest.approx(mean * len(ids) / n_bytes / math.log(2), rel=1e-5)


def test_bits_per_byte_over_a_short_split_and_a_mixture():
    """A split shorter than one window is scored as one short window; sources combine by weight."""
    short = ["zß", "ok"]  # 5 bytes, 7 tokens: one window of 6 inputs
    T = 12
    model = small_model(T)
    srcs = [Source("a", 0.25, tokenize_split(DOCS, TOK), tokenize_split(DOCS, TOK)),
            Source("b", 0.75, tokenize_split(short, TOK), tokenize_split(short, TOK))]
    r = evaluate_sources(model, srcs, T, batch_size=2, max_batches=8)
    ids_b = joined_ids(short)
    with torch.no_grad():
        logp = model(torch.tensor([ids_b[:-1]]))[0].double().log_softmax(-1)
    mean_b = -sum(logp[t, ids_b[t + 1]].item() for t in range(len(ids_b) - 1)) / (len(ids_b) - 1)
    nats_a = nats_by_hand(model, joined_ids(DOCS), T, n_windows=3)
    mean_a = sum(nats_a) / len(nats_a)
    bpb_a = mean_a * 37 / 34 / math.log(2)
    bpb_b = mean_b * 7 / 5 / math.log(2)
    assert r["per_source"]["b"] == pytest.approx(mean_b, rel=1e-5)
    assert r["test_loss"] == pytest.approx(0.25 * mean_a + 0.75 * mean_b, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(0.25 * bpb_a + 0.75 * bpb_b, rel=1e-5)


def test_bits_per_byte_scores_only_the_windows_max_batches_allows():
    docs = DOCS * 4  # 148 tokens, 136 bytes: 12 windows of 12, of which 1 batch of 2 is scored
    T = 12
    model = small_model(T)
    src = Source("text", 1.0, tokenize_split(docs, TOK), tokenize_split(docs, TOK))
    r = evaluate_sources(model, [src], T, batch_size=2, max_batches=1)
    nats = nats_by_hand(model, joined_ids(docs), T, n_windows=2)
    mean = sum(nats) / len(nats)
    assert r["test_loss"] == pytest.approx(mean, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(mean * 148 / 136 / math.log(2), rel=1e-5)
