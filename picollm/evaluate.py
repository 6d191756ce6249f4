"""`pico-llm eval`: the figures of a run on its own test split or on other files."""

from __future__ import annotations

import os
from typing import Callable, Optional

from .checkpoint import CONFIG, WEIGHTS, load_run, not_a_run, runs_under
from .data.batches import Source, tokenize_split
from .data.corpus import build_corpus, is_numeric_text
from .data.sources import read_text_files
from .device import autocast_factory, resolve_precision
from .errors import PicoError
from .metrics import continuation_accuracy, evaluate_sources
from .models.fused import int8_rounded
from .models.transformer import Transformer


def evaluate_run(run_dir: str, input_files: Optional[list[str]] = None, batch_size: int = 32,
                 max_batches: int = 50, device: str = "cpu", precision: Optional[str] = None,
                 weights: str = "model") -> dict:
    """Test loss, perplexity, bits per byte (and continuation accuracy on numeric data) of a run, scored as
    its training scored them: on the kind of rows it trained on (its DataConfig.batching) and in the
    precision it trained in (its TrainConfig.precision resolved for `device`; `precision` overrides:
    auto | fp32 | bf16 | fp16). weights="int8": the Transformer as `generate --weights int8` computes
    it, its matmul weights and their inputs rounded to int8 (models/fused.py's int8_rounded), so its loss
    change shows."""
    model, tok, (mcfg, dcfg, tcfg) = load_run(run_dir, device)
    if weights == "int8":
        if not isinstance(model, Transformer):
            raise PicoError(f"--weights int8 rounds a Transformer's weights; {run_dir} is a {mcfg.model}")
        model = int8_rounded(model)
    elif weights != "model":
        raise PicoError(f"--weights must be model or int8, got {weights!r}")
    autocast = autocast_factory(device, resolve_precision(precision or tcfg.precision, device))
    if input_files:
        docs = read_text_files(input_files, mode=dcfg.input_mode)
        split = tokenize_split(docs, tok)
        sources = [Source("files", 1.0, split, split, docs)]
        numeric = all(is_numeric_text(d) for d in docs)
        numeric_docs = docs
    else:  # the run's own split: deterministic from config.json, tokenized with the run's tokenizer
        corpus = build_corpus(dcfg, tokenizer=tok)
        sources, numeric, numeric_docs = corpus.sources, corpus.numeric, corpus.numeric_test_docs()
    r = evaluate_sources(model, sources, mcfg.block_size, batch_size, max_batches, device, autocast,
                         batching=dcfg.batching)
    out = {"run": run_dir, "model": mcfg.model, "test_loss": r["test_loss"], "perplexity": r["perplexity"],
           "bits_per_byte": r["bits_per_byte"]}
    if numeric:
        out["continuation_accuracy"] = continuation_accuracy(model, tok, numeric_docs, device=device)
    return out


def evaluate_runs(path: str, log: Callable[[str], None] = print, **kw) -> dict[str, dict]:
    """{run: evaluate_run(run, **kw)}: of path itself when it is a run, else of every run at any depth under
    it (a multi-model folder, a sweep); runs without a checkpoint yet are left out, with a line to `log`."""
    if os.path.isfile(os.path.join(path, CONFIG)) or not os.path.isdir(path):
        return {path: evaluate_run(path, **kw)}
    runs = runs_under(path)
    if not runs:
        raise not_a_run(path)
    for r in sorted(set(runs_under(path, loadable=False)) - set(runs)):
        log(f"left out {r}: no checkpoint yet (no {WEIGHTS})")
    return {r: evaluate_run(r, **kw) for r in runs}
