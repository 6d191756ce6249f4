"""From token arrays to training batches.

A split of a source is a TokenSplit: its documents' tokens in one flat array, each document followed by
end-of-text, with each document's start and length. Prepared data (prepare.py) holds them as memory-mapped
files, so nothing here loads a corpus into memory or into Python lists: batches are cut from the arrays by
numpy fancy indexing.

Two batchings:
- packed (default): random windows of block_size + 1 tokens from the joined array;
- padded: one example per row (the course starter's way), targets past the example are ignore_index.
A run is evaluated on the kind of rows it trains on: eval_windows (packed) or eval_rows (padded).
Sources are mixed per row: each row comes from source i with probability weights[i] (for TinyStories
that is exactly the starter's --tinystories_weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import PicoError

IGNORE_INDEX = -100


@dataclass
class TokenSplit:
    """One split of one source: documents joined by end-of-text into a flat array (numpy arrays or
    read-only memmaps of a prepared directory)."""

    tokens: np.ndarray  # (N,) uint16 or uint32, every document followed by eot
    starts: np.ndarray  # (D,) int64 offset of each document in tokens
    lengths: np.ndarray  # (D,) int64 document length in tokens, the eot excluded
    n_bytes: int  # UTF-8 bytes of the documents
    path: Optional[str] = None  # the prepared directory it was read from

    @property
    def n_docs(self) -> int:
        return len(self.starts)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i]: self.starts[i] + self.lengths[i]]


def token_dtype(vocab_size: int):
    """uint16 when every id fits (vocab_size <= 65536: ids 0..65535), else uint32."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def document_starts(lengths: np.ndarray, base: int = 0) -> np.ndarray:
    """Where each document starts in a joined array (each followed by one eot) that begins at `base`."""
    ends = np.cumsum(np.asarray(lengths, np.int64) + 1)
    return base + np.concatenate([np.zeros(1, np.int64), ends[:-1]]) if len(ends) else np.zeros(0, np.int64)


def tokenize_split(docs: Sequence[str], tokenizer) -> TokenSplit:
    """A split held in memory (small document lists: tests, `eval --input_files`); prepared data is the
    same arrays on disk."""
    docs = list(docs)
    tokens, lengths = tokenizer.encode_documents(docs) if docs else (np.zeros(0, np.uint32), np.zeros(0, np.int64))
    tokens = tokens.astype(token_dtype(tokenizer.vocab_size), copy=False)
    return TokenSplit(tokens, document_starts(lengths), lengths, sum(len(d.encode("utf-8")) for d in docs))


@dataclass
class Source:
    name: str
    weight: float
    train: TokenSplit
    test: TokenSplit
    test_docs: Sequence[str] = ()  # the test documents' text (prepared data: decoded on demand)
    numeric: Optional[bool] = None  # every document a numeric sequence (None: judge from test_docs)


class Batcher:
    """Draws training batches from weighted sources with its own seeded torch.Generator, whose state
    is saved with each checkpoint so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, sources: list[Source], block_size: int, batch_size: int, mode: str = "packed",
                 seed: int = 0, pad_id: int = 0):
        self.sources = [s for s in sources if s.weight > 0]
        if not self.sources:
            raise PicoError("no training data: every source has weight 0")
        for s in self.sources:
            if s.train.n_docs == 0:
                raise PicoError(f"source {s.name!r} has no training documents")
            if mode == "packed" and len(s.train.tokens) < block_size + 1:
                raise PicoError(f"source {s.name!r} has {len(s.train.tokens)} training tokens, fewer than "
                                f"block_size + 1 = {block_size + 1}; lower --block_size or use --batching padded")
        self.block_size, self.batch_size, self.mode, self.pad_id = block_size, batch_size, mode, pad_id
        w = torch.tensor([s.weight for s in self.sources], dtype=torch.float64)
        self.weights = w / w.sum()
        self.generator = torch.Generator().manual_seed(seed)

    def tokens_per_epoch(self) -> int:
        return sum(len(s.train.tokens) for s in self.sources)

    def steps_per_epoch(self) -> int:
        if self.mode == "packed":
            return max(1, self.tokens_per_epoch() // (self.batch_size * self.block_size))
        return max(1, sum(s.train.n_docs for s in self.sources) // self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B, T) int64; y is x shifted by one, IGNORE_INDEX where there is no target."""
        g, B, T = self.generator, self.batch_size, self.block_size
        which = torch.multinomial(self.weights, B, replacement=True, generator=g).numpy()
        packed = self.mode == "packed"
        highs = [len(s.train.tokens) - T if packed else s.train.n_docs for s in self.sources]
        picks = draw_per_row(g, which, highs)
        if packed:  # windows of T + 1 tokens from each row's source
            w = torch.from_numpy(_gather(self.sources, which, picks[:, None] + np.arange(T + 1)))
            return w[:, :-1], w[:, 1:]
        starts, n = np.empty(B, np.int64), np.empty(B, np.int64)
        for si in np.unique(which):
            m, split = which == si, self.sources[si].train
            starts[m], n[m] = split.starts[picks[m]], np.minimum(split.lengths[picks[m]] + 1, T + 1)
        return pad_rows(lambda idx: _gather(self.sources, which, idx), starts, n, T, self.pad_id)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def draw_per_row(g: torch.Generator, which: np.ndarray, highs: list[int]) -> np.ndarray:
    """One torch.randint(highs[which[r]], (1,)) per row r, in row order, from g: the same values and the
    same final generator state as that Python loop, drawn with one call per source. (On the CPU a draw
    below 2**32 takes one 32-bit output of the generator whatever its bound, so row r of a (B,) draw
    from the state before the batch is row r of the loop; 2**32 and above takes two.)"""
    used = [int(si) for si in np.unique(which)]
    if len({highs[si] >= 1 << 32 for si in used}) > 1:  # rows that take different numbers of outputs
        return np.array([int(torch.randint(highs[si], (1,), generator=g)) for si in which], np.int64)
    start, out = g.get_state(), np.empty(len(which), np.int64)
    for k, si in enumerate(used):
        if k:
            g.set_state(start)
        vals = torch.randint(highs[si], (len(which),), generator=g).numpy()
        out[which == si] = vals[which == si]
    return out


def _gather(sources: list[Source], which: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The training tokens at idx[r] (a row of positions) of row r's source, int64."""
    out = np.empty(idx.shape, np.int64)
    for si in np.unique(which):
        m = which == si
        out[m] = sources[si].train.tokens[idx[m]]
    return out


def pad_rows(gather, starts: np.ndarray, n: np.ndarray, block_size: int, pad_id: int):
    """Padded (x, y) for rows of n[r] tokens starting at starts[r] (each n >= 1, <= block_size + 1, the last
    one the final target); gather(idx) reads the tokens at the positions idx, one line of idx per row.
    The same tensors as pad_examples on those rows, without a Python loop over them."""
    T = int(min(block_size, n.max() - 1)) if len(n) else 0
    x = torch.full((len(n), T), pad_id, dtype=torch.long)
    y = torch.full((len(n), T), IGNORE_INDEX, dtype=torch.long)
    if T == 0:
        return x, y
    col = np.arange(T + 1)
    idx = starts[:, None] + np.minimum(col, n[:, None] - 1)  # past a row's end: its last token, masked below
    vals = torch.from_numpy(gather(idx))
    valid = torch.from_numpy(col[:T] < (n - 1)[:, None])
    x[valid] = vals[:, :T][valid]
    y[valid] = vals[:, 1:][valid]
    return x, y


def pad_examples(examples: list[np.ndarray], block_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples (each <= block_size + 1 tokens, the last one the final target) -> padded (x, y)."""
    T = min(block_size, max(len(e) for e in examples) - 1)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        e = torch.as_tensor(e[: T + 1], dtype=torch.long)
        n = len(e) - 1
        x[i, :n] = e[:-1]
        y[i, :n] = e[1:]
    return x, y


def eval_windows(split: TokenSplit, block_size: int, batch_size: int, max_batches: int):
    """Deterministic, non-overlapping windows over the start of a test split (how packed batching is
    evaluated): yields (x, y) batches. The same windows every time, so test losses at different steps
    compare."""
    toks = split.tokens
    n_windows = (len(toks) - 1) // block_size
    if n_windows == 0 and len(toks) >= 2:  # a test split shorter than one window: one short window
        t = torch.from_numpy(np.asarray(toks, dtype=np.int64))
        yield t[None, :-1], t[None, 1:]
        return
    n_windows = min(n_windows, batch_size * max_batches)
    for b in range(0, n_windows, batch_size):
        first = np.arange(b, min(b + batch_size, n_windows)) * block_size
        w = torch.from_numpy(toks[first[:, None] + np.arange(block_size + 1)].astype(np.int64))
        yield w[:, :-1], w[:, 1:]


def eval_rows(split: TokenSplit, block_size: int, batch_size: int, max_batches: int, pad_id: int = 0):
    """Deterministic padded rows over the first documents of a test split, as padded batching trains on
    them: one document and its end-of-text per row, cut at block_size + 1 tokens, targets past the
    document IGNORE_INDEX. Yields (x, y) batches of up to batch_size rows (an empty document, which has
    no target, is skipped). The same rows every time, so test losses at different steps compare."""
    want, docs, scanned = batch_size * max_batches, [], 0
    while sum(map(len, docs)) < want and scanned < split.n_docs:  # only as far into the split as needed
        chunk = np.asarray(split.lengths[scanned: scanned + max(want, 4096)])
        docs.append(scanned + np.flatnonzero(chunk > 0))
        scanned += len(chunk)
    docs = np.concatenate(docs)[:want] if docs else np.zeros(0, np.int64)
    for b in range(0, len(docs), batch_size):
        d = docs[b: b + batch_size]
        n = np.minimum(np.asarray(split.lengths[d]) + 1, block_size + 1)
        yield pad_rows(lambda idx: split.tokens[idx].astype(np.int64), np.asarray(split.starts[d]), n,
                       block_size, pad_id)


def tokens_per_byte(split: TokenSplit) -> float:
    """Tokens (eot included) per UTF-8 byte of the split: turns nats/token into bits/byte."""
    return len(split.tokens) / max(1, split.n_bytes)


def bits_per_byte(loss_nats_per_token: float, split: TokenSplit) -> float:
    return loss_nats_per_token * tokens_per_byte(split) / math.log(2)
