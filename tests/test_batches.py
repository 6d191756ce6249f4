import numpy as np
import torch

from picollm.config import DataConfig, ModelConfig
from picollm.data.batches import IGNORE_INDEX, Batcher, pad_examples
from picollm.data.corpus import build_corpus
from picollm.data.prepare import split_documents
from picollm.metrics import lm_loss
from picollm.models import build_model


def test_split_is_disjoint_deduplicated_and_stable():
    docs = [f"doc {i}" for i in range(50)] + ["doc 3", "doc 7"]  # duplicates must not straddle the split
    train, test = split_documents(docs, 0.2)
    assert set(train).isdisjoint(test)
    assert len(train) + len(test) == 50 and 0 < len(test) < 25
    assert split_documents(docs, 0.2) == (train, test)
    assert split_documents(list(reversed(docs)), 0.2)[1] == list(reversed(test))  # by document, not position
    many = split_documents([f"doc {i}" for i in range(5000)], 0.2)[1]
    assert 0.18 < len(many) / 5000 < 0.22  # the fraction asked for


def test_no_test_document_is_ever_trained_on(tmp_path):
    cfg = DataConfig(dataset="numbers", numbers_count=300, tokenizer="byte", test_fraction=0.2, seed=5)
    corpus = build_corpus(cfg)
    (src,) = corpus.sources
    tok = corpus.tokenizer
    train_docs = set(tok.decode(src.train.doc(i)) for i in range(src.train.n_docs))
    test_docs = set(tok.decode(src.test.doc(i)) for i in range(src.test.n_docs))
    assert test_docs == set(src.test_docs) and len(test_docs) > 20
    assert train_docs.isdisjoint(test_docs)
    # every training batch is cut from the training array alone: each row occurs in it
    train_stream = tok.decode(src.train.tokens)
    batcher = Batcher(corpus.sources, block_size=24, batch_size=8, seed=0)
    for _ in range(20):
        x, y = batcher.next_batch()
        for row in torch.cat([x, y[:, -1:]], 1):
            assert tok.decode(row.tolist()) in train_stream
    # and no test sequence occurs as a whole line of the training stream
    lines = set(train_stream.split("<|endoftext|>"))
    assert not lines & test_docs


def test_padded_and_unpadded_batches_give_the_same_loss():
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="transformer", vocab_size=50, block_size=16, n_embd=32, n_layer=2, n_head=4))
    model.eval()
    examples = [np.random.RandomState(i).randint(1, 50, size=n) for i, n in enumerate([5, 12, 17, 9])]
    x, y = pad_examples(examples, block_size=16, pad_id=0)
    assert (y == IGNORE_INDEX).any()
    padded = lm_loss(model(x), y)
    total, count = 0.0, 0
    for e in examples:  # one unpadded row at a time
        t = torch.as_tensor(e[:17], dtype=torch.long)[None]
        logits = model(t[:, :-1])
        total += torch.nn.functional.cross_entropy(logits[0], t[0, 1:], reduction="sum")
        count += t.size(1) - 1
    torch.testing.assert_close(padded, total / count)


def test_mixing_weights_are_respected():
    from picollm.data.batches import Source, tokenize_split
    from picollm.data.tokenizers import build_tokenizer

    tok = build_tokenizer("byte")
    a = tokenize_split(["a" * 40] * 5, tok)
    b = tokenize_split(["b" * 40] * 5, tok)
    for mode in ("packed", "padded"):
        batcher = Batcher([Source("a", 0.8, a, a), Source("b", 0.2, b, b)], block_size=8, batch_size=500,
                          mode=mode, seed=0)
        x, _ = batcher.next_batch()
        share_a = (x[:, 0] == ord("a")).float().mean().item()
        assert 0.75 < share_a < 0.85, (mode, share_a)


def test_batcher_state_round_trip_reproduces_batches():
    cfg = DataConfig(dataset="numbers", numbers_count=100, tokenizer="byte")
    corpus = build_corpus(cfg)
    b1 = Batcher(corpus.sources, 16, 4, seed=3)
    b1.next_batch()
    state = b1.state_dict()
    expected = b1.next_batch()
    b2 = Batcher(corpus.sources, 16, 4, seed=99)
    b2.load_state_dict(state)
    got = b2.next_batch()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def _per_row_batch(b: Batcher):
    """The per-row loop that Batcher.next_batch replaced: its draws and rows, for comparison."""
    g, B, T = b.generator, b.batch_size, b.block_size
    which = torch.multinomial(b.weights, B, replacement=True, generator=g).tolist()
    rows = []
    for si in which:
        split = b.sources[si].train
        if b.mode == "packed":
            start = int(torch.randint(len(split.tokens) - T, (1,), generator=g))
            rows.append(np.asarray(split.tokens[start: start + T + 1], dtype=np.int64))
        else:
            d = int(torch.randint(split.n_docs, (1,), generator=g))
            rows.append(np.asarray(split.tokens[split.starts[d]: split.starts[d] + split.lengths[d] + 1],
                                   dtype=np.int64)[: T + 1])
    if b.mode == "packed":
        w = torch.from_numpy(np.stack(rows))
        return w[:, :-1], w[:, 1:]
    return pad_examples(rows, T, b.pad_id)


def test_vectorised_batches_equal_the_per_row_loop():
    """Rows drawn by fancy indexing with one randint per source: the same batches, and the same generator
    state after them, as one draw and one slice per row (so earlier runs' batches are unchanged)."""
    from picollm.data.batches import Source, eval_rows, eval_windows, tokenize_split
    from picollm.data.tokenizers import build_tokenizer

    tok = build_tokenizer("byte")
    rng = np.random.RandomState(0)
    docs = ["".join(chr(97 + c) for c in rng.randint(0, 26, rng.randint(0, 60))) for _ in range(80)]
    a, b = tokenize_split(docs, tok), tokenize_split(docs[:30] + ["", "x"], tok)
    sources = [Source("a", 0.6, a, a), Source("b", 0.4, b, b)]
    for mode in ("packed", "padded"):
        for T in (8, 70):
            fast, slow = (Batcher(sources, T, 16, mode=mode, seed=5, pad_id=256) for _ in range(2))
            for _ in range(6):
                (x, y), (x2, y2) = fast.next_batch(), _per_row_batch(slow)
                assert torch.equal(x, x2) and torch.equal(y, y2), (mode, T)
            assert torch.equal(fast.generator.get_state(), slow.generator.get_state())
    # evaluation rows and windows, against their per-row definitions
    docs_with_targets = [d for d in range(a.n_docs) if a.lengths[d] > 0][:12]
    want = [np.asarray(a.tokens[a.starts[d]: a.starts[d] + a.lengths[d] + 1], np.int64)[:17] for d in docs_with_targets]
    got = list(eval_rows(a, 16, 4, 3, pad_id=0))
    for k, (x, y) in enumerate(got):
        x2, y2 = pad_examples(want[4 * k: 4 * k + 4], 16, 0)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(got) == 3
    (x, y), = list(eval_windows(a, 16, 1000, 1))[:1]
    t = torch.from_numpy(a.tokens.astype(np.int64))
    assert torch.equal(x[3], t[48:64]) and torch.equal(y[3], t[49:65])
