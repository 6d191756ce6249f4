"""From documents to training batches.

Stages (as in llama2.c's pipeline): documents per source -> de-duplicated, seeded train/test split by
document -> tokenized once into a flat token array per split (documents joined by end-of-text; a numpy
memmap once it is large) -> batches.

Two batchings:
- packed (default): random windows of block_size + 1 tokens from the joined array;
- padded: one example per row (the course starter's way), targets past the example are ignore_index.
A run is evaluated on the kind of rows it trains on: eval_windows (packed) or eval_rows (padded).
Sources are mixed per row: each row comes from source i with probability weights[i] (for TinyStories
that is exactly the starter's --tinystories_weight).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..errors import PicoError

IGNORE_INDEX = -100
MEMMAP_MIN_TOKENS = 1 << 24  # above this many tokens a split lives in a .bin file, memory-mapped


def split_documents(docs: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by document. Duplicates are removed first, so no test text is ever trained on."""
    unique = list(dict.fromkeys(docs))
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    n_test = int(round(len(unique) * test_fraction))
    if test_fraction > 0 and n_test == 0 and len(unique) >= 2:
        n_test = 1
    if n_test >= len(unique):
        raise PicoError(f"only {len(unique)} distinct documents: too few for --test_fraction {test_fraction}")
    test_idx = set(order[:n_test])
    train = [d for i, d in enumerate(unique) if i not in test_idx]
    test = [d for i, d in enumerate(unique) if i in test_idx]
    return train, test


@dataclass
class TokenSplit:
    """One split of one source: documents joined by end-of-text into a flat array."""

    tokens: np.ndarray  # (N,) uint16 or uint32, every document followed by eot
    starts: np.ndarray  # (D,) offset of each document in tokens
    lengths: np.ndarray  # (D,) document length in tokens, the eot excluded
    n_bytes: int  # UTF-8 bytes of the documents

    @property
    def n_docs(self) -> int:
        return len(self.starts)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i]: self.starts[i] + self.lengths[i]]


def tokenize_split(docs: list[str], tokenizer, cache_path: Optional[str] = None) -> TokenSplit:
    ids = tokenizer.encode_batch(docs) if docs else []
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64) if len(ids) else np.zeros(0, np.int64)
    total = int((lengths + 1).sum())
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    if cache_path is not None and total >= MEMMAP_MIN_TOKENS:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tokens = np.lib.format.open_memmap(cache_path, mode="w+", dtype=dtype, shape=(total,))
    else:
        tokens = np.empty(total, dtype=dtype)
    for s, x in zip(starts, ids):
        tokens[s: s + len(x)] = x
        tokens[s + len(x)] = tokenizer.eot_id
    if isinstance(tokens, np.memmap):
        tokens.flush()
        tokens = np.load(cache_path, mmap_mode="r")
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return TokenSplit(tokens, starts, lengths, n_bytes)


@dataclass
class Source:
    name: str
    weight: float
    train: TokenSplit
    test: TokenSplit
    test_docs: list[str] = field(default_factory=list)


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
        which = torch.multinomial(self.weights, B, replacement=True, generator=g).tolist()
        rows = []
        for si in which:
            split = self.sources[si].train
            if self.mode == "packed":
                start = int(torch.randint(len(split.tokens) - T, (1,), generator=g))
                rows.append(np.asarray(split.tokens[start: start + T + 1], dtype=np.int64))
            else:
                d = int(torch.randint(split.n_docs, (1,), generator=g))
                rows.append(np.asarray(split.tokens[split.starts[d]: split.starts[d] + split.lengths[d] + 1],
                                       dtype=np.int64)[: T + 1])
        if self.mode == "packed":
            w = torch.from_numpy(np.stack(rows))
            return w[:, :-1], w[:, 1:]
        return pad_examples(rows, T, self.pad_id)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


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
        idx = range(b, min(b + batch_size, n_windows))
        w = np.stack([np.asarray(toks[i * block_size: i * block_size + block_size + 1], dtype=np.int64) for i in idx])
        w = torch.from_numpy(w)
        yield w[:, :-1], w[:, 1:]


def eval_rows(split: TokenSplit, block_size: int, batch_size: int, max_batches: int, pad_id: int = 0):
    """Deterministic padded rows over the first documents of a test split, as padded batching trains on
    them: one document and its end-of-text per row, cut at block_size + 1 tokens, targets past the
    document IGNORE_INDEX. Yields (x, y) batches of up to batch_size rows (an empty document, which has
    no target, is skipped). The same rows every time, so test losses at different steps compare."""
    docs = [d for d in range(split.n_docs) if split.lengths[d] > 0][: batch_size * max_batches]
    for b in range(0, len(docs), batch_size):
        rows = [np.asarray(split.tokens[split.starts[d]: split.starts[d] + split.lengths[d] + 1],
                           dtype=np.int64)[: block_size + 1] for d in docs[b: b + batch_size]]
        yield pad_examples(rows, block_size, pad_id)


def tokens_per_byte(split: TokenSplit) -> float:
    """Tokens (eot included) per UTF-8 byte of the split: turns nats/token into bits/byte."""
    return len(split.tokens) / max(1, split.n_bytes)


def bits_per_byte(loss_nats_per_token: float, split: TokenSplit) -> float:
    return loss_nats_per_token * tokens_per_byte(split) / math.log(2)


def memmap_path(run_dir: Optional[str], name: str) -> Optional[str]:
    if run_dir is None:
        return None
    return os.path.join(run_dir, "data", f"{name}.npy")
