"""Assemble the training data a DataConfig describes: source plans -> prepared (cached) token arrays.

`build_corpus` is what train, eval, bench and every sweep point and DDP rank call; prepare.py does the
work and keeps it in the cache, so the second call on the same data opens memory-mapped arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import SPLIT_RULE, DataConfig
from ..errors import PicoError
from ..tables import md_table
from . import sources as src
from .batches import Source
from .prepare import (
    PREPARED_COLUMNS,
    DocumentTexts,
    PreparedSplit,
    SourcePlan,
    corpus_tokenizer,
    file_fingerprint,
    prepare_source,
    prepared_row,
    texts_fingerprint,
)
from .sources import is_numeric_text
from .tokenizers import Tokenizer


@dataclass
class Corpus:
    tokenizer: object
    sources: list[Source]  # weight > 0 only; weights sum to 1
    numeric: bool  # some source is numeric sequences (continuation accuracy applies)
    prepared: list[dict[str, PreparedSplit]] = field(default_factory=list)  # per source: train / test

    def numeric_test_docs(self) -> list[str]:
        return [d for s in self.sources if is_numeric_source(s) for d in s.test_docs]


def is_numeric_source(source) -> bool:
    """The built-in corpus, or the user's own file of numeric sequences."""
    if source.name == "numbers":
        return True
    if source.numeric is not None:
        return source.numeric
    return bool(source.test_docs) and all(map(is_numeric_text, source.test_docs))


def _files_plan(cfg: DataConfig, weight: float) -> SourcePlan:
    paths = list(cfg.input_files) + (src.find_text_files(cfg.input_dir) if cfg.input_dir else [])
    for p in paths:  # every path checked before anything is read
        if not Path(p).exists():
            raise PicoError(f"input file not found: {p}")
    for p in paths:
        src.check_text_file(p)
    fp = {"kind": "files", "files": [file_fingerprint(p) for p in paths], "mode": cfg.input_mode,
          "limit": cfg.limit_custom_examples}
    return SourcePlan("files", weight, fp, lambda: src.iter_text_files(paths, cfg.input_mode, cfg.limit_custom_examples),
                      size=sum(Path(p).stat().st_size for p in paths))


def _numbers_plan(cfg: DataConfig, weight: float) -> SourcePlan:
    docs = src.generate_numbers(cfg.numbers_count, seed=cfg.seed)
    fp = {"kind": "numbers", "count": cfg.numbers_count, "seed": cfg.seed, "content": texts_fingerprint(docs)}
    return SourcePlan("numbers", weight, fp, lambda: iter(docs), size=sum(len(d) + 1 for d in docs))


def _tinystories_file_plan(path: str, subset: Optional[int], weight: float, flag: str) -> SourcePlan:
    p = src.tinystories_file(path, flag)
    fp = {"kind": "tinystories", "file": file_fingerprint(str(p)), "subset": subset}
    return SourcePlan("tinystories", weight, fp, lambda: src.iter_tinystories(str(p), subset, flag=flag),
                      size=p.stat().st_size)


def _tinystories_hub_plan(split: str, subset: Optional[int], weight: float) -> SourcePlan:
    ds = src.hub_split(split)
    fingerprint = getattr(ds, "_fingerprint", None)  # datasets' own content fingerprint of a loaded split
    if not isinstance(fingerprint, str):
        fingerprint = texts_fingerprint(src.iter_tinystories(None, None, split, dataset=ds))
    fp = {"kind": "tinystories-hub", "hub": src.TINYSTORIES_HUB, "split": split, "fingerprint": fingerprint,
          "subset": subset}
    return SourcePlan("tinystories", weight, fp, lambda: src.iter_tinystories(None, subset, split, dataset=ds))


def tinystories_plan(cfg: DataConfig, weight: float) -> SourcePlan:
    """TinyStories: the first --tinystories_subset stories of the local file or the hub's train split; its
    test split is --tinystories_valid_path (all of it) when given, the hub's `validation` split when
    loading from the hub, else a hash split of those stories."""
    subset = cfg.subset_count
    if cfg.tinystories_path is None:
        plan = _tinystories_hub_plan("train", subset, weight)
        plan.test = _tinystories_hub_plan("validation", None, weight)
        return plan
    plan = _tinystories_file_plan(cfg.tinystories_path, subset, weight, "--tinystories_path")
    if cfg.tinystories_valid_path is not None:
        plan.test = _tinystories_file_plan(cfg.tinystories_valid_path, None, weight, "--tinystories_valid_path")
    return plan


def source_plans(cfg: DataConfig) -> list[SourcePlan]:
    """Each source with weight > 0, in the starter's mixing semantics: an example comes from TinyStories
    with probability tinystories_weight, else from the other data (the numeric corpus or the files)."""
    w = cfg.tinystories_weight
    has_files = bool(cfg.input_files or cfg.input_dir)
    other = None
    if cfg.dataset == "numbers":
        other = _numbers_plan(cfg, 1.0 - w if w > 0 else 1.0)
    elif has_files:
        other = _files_plan(cfg, 1.0 - w if w > 0 else 1.0)
    out = [other] if other is not None and w < 1.0 else []
    if w > 0:
        out.append(tinystories_plan(cfg, w if other is not None else 1.0))
    return out


def build_corpus(cfg: DataConfig, tokenizer: Optional[Tokenizer] = None, progress: bool = True) -> Corpus:
    """Every source split by document, the tokenizer trained on a sample of the training split (or `tokenizer`,
    a run's own, reused on resume and eval), both splits tokenized into prepared arrays: from the cache when
    the same data was prepared before, else built and cached (prepare.py)."""
    if cfg.split != SPLIT_RULE:
        raise PicoError(f"this run held out its test documents by a {cfg.split} split (pico-llm before prepared "
                        f"data), which this version does not rebuild: its test split would overlap its training "
                        f"data. Retrain it, or evaluate it on other files with --input_files")
    plans = source_plans(cfg)
    tok = tokenizer or corpus_tokenizer(cfg.tokenizer, cfg.vocab_size, plans, cfg.test_fraction)
    sources, prepared = [], []
    for plan in plans:
        got = prepare_source(plan, tok, cfg.test_fraction, progress)
        test = got["test"]
        numeric = plan.name == "numbers" or bool(test.manifest["numeric"])
        sources.append(Source(plan.name, plan.weight, got["train"].split, test.split, DocumentTexts(test.split, tok),
                              numeric=numeric))
        prepared.append(got)
    return Corpus(tok, sources, numeric=any(is_numeric_source(s) for s in sources), prepared=prepared)


def prepared_table(corpus: Corpus) -> str:
    """`pico-llm data prepare`'s answer: each source's splits, their counts and where they are."""
    rows = [prepared_row(p.manifest) + ["reused" if p.reused else "prepared", p.split.path]
            for got in corpus.prepared for p in got.values()]
    return md_table(PREPARED_COLUMNS + ["", "directory"], rows, align="lllrrrrll")


def data_line(corpus: Corpus) -> str:
    """train's line about its data: per source, each split's documents and tokens, and whether the prepared
    arrays were reused from the cache or prepared by this run."""
    parts = []
    for got in corpus.prepared:
        m = got["train"].manifest
        splits = ", ".join(f"{s} {p.manifest['n_docs']:,} docs / {p.manifest['n_tokens']:,} tokens" for s, p in got.items())
        how = "prepared now" if any(not p.reused for p in got.values()) else "reused from the cache"
        where = got["train"].split.path
        parts.append(f"{m['name']}: {splits}, {how}" + (f" ({Path(where).parent})" if where else ""))
    tok = corpus.tokenizer
    return f"data ({tok.name} {tok.vocab_size}): " + ("; ".join(parts) or "held in memory")
