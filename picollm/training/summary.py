"""The end of a finished run: its figures (summary.json), samples (samples.md), loss plot, and the
table that compares several runs trained side by side."""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

from .. import checkpoint as ckpt
from ..config import DataConfig, ModelConfig, SampleConfig, TrainConfig
from ..data.corpus import Corpus
from ..fsio import write_json, write_text
from ..metrics import continuation_accuracy
from ..plots import loss_curves
from ..sampling import generate_text
from ..tables import md_table

SAMPLE_SETTINGS = (("greedy", None), ("top-p 0.95", 0.95), ("top-p 1.0", 1.0))


def run_figures(records: list[dict], model_cfg: ModelConfig, data_cfg: DataConfig, n_params: int,
                tokens_seen: int, elapsed: float) -> dict:
    """summary.json's figures from metrics.jsonl's records: the last evaluation, the best one, the mean of
    the last 10 logged train losses."""
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    evals = [r for r in records if "test_loss" in r]
    final = evals[-1]
    finite = [r for r in evals if r["test_loss"] is not None and math.isfinite(r["test_loss"])]
    best = min(finite, key=lambda r: r["test_loss"]) if finite else final  # a NaN is never the best
    return {
        "model": model_cfg.model, "params": n_params, "steps": final["step"],
        "train_loss": sum(train_losses[-10:]) / len(train_losses[-10:]),
        "test_loss": final["test_loss"], "perplexity": math.exp(min(final["test_loss"], 50.0)),
        "bits_per_byte": final["bits_per_byte"], "best_test_loss": best["test_loss"], "best_step": best["step"],
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else None,
        "train_seconds": elapsed, "tokenizer": data_cfg.tokenizer, "vocab_size": model_cfg.vocab_size,
    }


def write_samples(model: torch.nn.Module, corpus: Corpus, model_cfg: ModelConfig, train_cfg: TrainConfig,
                  run_dir: str, device: str, log: Callable[[str], None]) -> None:
    """samples.md: the training prompt continued greedily and with top-p 0.95 and 1.0."""
    rows = []
    for label, p in SAMPLE_SETTINGS:
        cfg = SampleConfig(max_new_tokens=train_cfg.max_new_tokens, greedy=p is None, top_p=p, seed=train_cfg.seed)
        text = generate_text(model, corpus.tokenizer, train_cfg.prompt, cfg, device=device)[0]
        rows.append((label, text))
        log(f"[{label}] {text!r}")
    write_text(os.path.join(run_dir, ckpt.SAMPLES), f"# Samples from {model_cfg.model}\n\nPrompt: "
               f"`{train_cfg.prompt}`\n\n" + md_table(["setting", "text"], rows))


def finish_run(model: torch.nn.Module, corpus: Corpus, model_cfg: ModelConfig, data_cfg: DataConfig,
               train_cfg: TrainConfig, run_dir: str, device: str, n_params: int, tokens_seen: int, elapsed: float,
               log: Callable[[str], None] = print) -> dict:
    """Final figures, samples and the loss plot of a finished run; returns the summary."""
    records = ckpt.read_metrics(run_dir)
    summary = run_figures(records, model_cfg, data_cfg, n_params, tokens_seen, elapsed)
    if corpus.numeric:
        summary["continuation_accuracy"] = continuation_accuracy(model, corpus.tokenizer, corpus.numeric_test_docs(),
                                                                 device=device)
    write_samples(model, corpus, model_cfg, train_cfg, run_dir, device, log)
    loss_curves({model_cfg.model: records}, os.path.join(run_dir, ckpt.LOSS_PLOT), title=f"{model_cfg.model} loss")
    write_json(os.path.join(run_dir, ckpt.SUMMARY), summary)
    acc = f", continuation accuracy {summary['continuation_accuracy']:.3f}" if "continuation_accuracy" in summary else ""
    log(f"{model_cfg.model}: train loss {summary['train_loss']:.4f}, test loss {summary['test_loss']:.4f}, "
        f"{summary['bits_per_byte']:.3f} bits/byte{acc}; run {run_dir}")
    return summary


SUMMARY_COLUMNS = (("params", "{:,}"), ("train_loss", "{:.4f}"), ("test_loss", "{:.4f}"), ("bits_per_byte", "{:.3f}"),
                   ("tokens_per_s", "{:,.0f}"), ("train_seconds", "{:.1f}"), ("continuation_accuracy", "{:.3f}"))


def summary_table(summaries: dict[str, dict]) -> str:
    """A Markdown table of the final figures of several runs (a column only where some run has it)."""
    cols = [(k, f) for k, f in SUMMARY_COLUMNS if any(s.get(k) is not None for s in summaries.values())]
    rows = [[name] + [f.format(s[k]) if s.get(k) is not None else "" for k, f in cols] for name, s in summaries.items()]
    return md_table(["model"] + [k for k, _ in cols], rows)
