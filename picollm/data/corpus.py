"""Assemble the training data a DataConfig describes: sources -> split -> tokenizer -> token arrays."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig
from . import sources as src
from .batches import Source, memmap_path, split_documents, tokenize_split
from .tokenizers import build_tokenizer


@dataclass
class Corpus:
    tokenizer: object
    sources: list[Source]  # weight > 0 only; weights sum to 1
    numeric: bool  # some source is numeric sequences (continuation accuracy applies)

    def numeric_test_docs(self) -> list[str]:
        return [d for s in self.sources if is_numeric_source(s) for d in s.test_docs]


def is_numeric_text(doc: str) -> bool:
    """A document of whitespace-separated integers, like the numeric corpus ("3seqs")."""
    parts = doc.split()
    return bool(parts) and all(p.lstrip("-").isdigit() for p in parts)


def is_numeric_source(source) -> bool:
    """The built-in corpus, or the user's own file of numeric sequences."""
    return source.name == "numbers" or (bool(source.test_docs) and all(map(is_numeric_text, source.test_docs)))


def load_documents(cfg: DataConfig) -> list[tuple[str, float, list[str]]]:
    """(name, weight, documents) per source with weight > 0, in the starter's mixing semantics:
    an example comes from TinyStories with probability tinystories_weight, else from the other data."""
    w = cfg.tinystories_weight
    other = []
    if cfg.dataset == "numbers":
        other = src.generate_numbers(cfg.numbers_count, seed=cfg.seed)
        name = "numbers"
    else:
        paths = list(cfg.input_files) + (src.find_text_files(cfg.input_dir) if cfg.input_dir else [])
        if paths:
            other = src.read_text_files(paths, mode=cfg.input_mode, limit=cfg.limit_custom_examples)
        name = "files"
    out = []
    if other and w < 1.0:
        out.append((name, 1.0 - w if w > 0 else 1.0, other))
    if w > 0:
        tiny = src.load_tinystories(cfg.tinystories_path, subset=cfg.tinystories_subset)
        out.append(("tinystories", w if other else 1.0, tiny))
    return out


def build_corpus(cfg: DataConfig, run_dir: str | None = None, tokenizer=None) -> Corpus:
    """Split every source by document, train (or reuse) the tokenizer on the training split only,
    tokenize both splits. Pass `tokenizer` to reuse a run's own (resume, eval)."""
    splits = [(name, w, *split_documents(docs, cfg.test_fraction, cfg.seed)) for name, w, docs in load_documents(cfg)]
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer, train_texts=[d for *_, train, _ in splits for d in train],
                                    vocab_size=cfg.vocab_size)
    sources = [Source(name, w, tokenize_split(train, tokenizer, memmap_path(run_dir, f"{name}-train")),
                      tokenize_split(test, tokenizer, memmap_path(run_dir, f"{name}-test")), test)
               for name, w, train, test in splits]
    return Corpus(tokenizer, sources, numeric=any(is_numeric_source(s) for s in sources))
