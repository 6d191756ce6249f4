"""Several models trained side by side on identical data, batches and seed."""

from __future__ import annotations

import os
from typing import Callable, Optional

from .. import checkpoint as ckpt
from ..config import DataConfig, ModelConfig, TrainConfig
from ..fsio import write_text
from ..plots import loss_curves
from .distributed import join_processes, shared_corpus
from .loop import MetricsSink, train
from .summary import summary_table

SinkFactory = Callable[[str], tuple[MetricsSink, ...]]  # run directory -> the metrics sinks for its run


def train_models(names: list[str], models: dict[str, ModelConfig], data_cfg: DataConfig, train_cfg: TrainConfig,
                 output_dir: str, run_name: str, *, overwrite: bool = False, stop_at_step: Optional[int] = None,
                 progress: bool = True, log: Callable[[str], None] = print,
                 sinks: SinkFactory = lambda run_dir: ()) -> dict[str, dict]:
    """Train each model on identical data, batches and seed. One model: OUTPUT/NAME is the run. Several:
    OUTPUT/NAME/<model> each, plus OUTPUT/NAME/comparison.png and comparison.md."""
    corpus = shared_corpus(data_cfg, join_processes(train_cfg))  # one split and tokenizer, the same batches for all
    root = os.path.join(output_dir, run_name)
    dirs = {names[0]: root} if len(names) == 1 else {m: os.path.join(root, m) for m in names}
    summaries = {}
    for m, run_dir in dirs.items():
        summaries[m] = train(models[m], data_cfg, train_cfg, run_dir, corpus=corpus, overwrite=overwrite,
                             stop_at_step=stop_at_step, progress=progress, log=log, sinks=sinks(run_dir))
    if len(names) > 1 and all("test_loss" in s for s in summaries.values()):
        loss_curves({m: ckpt.read_metrics(d) for m, d in dirs.items()}, os.path.join(root, "comparison.png"),
                    title="train and test loss")
        table = summary_table(summaries)
        write_text(os.path.join(root, "comparison.md"), table)
        log("\n" + table)
        log(f"comparison: {os.path.join(root, 'comparison.png')}, {os.path.join(root, 'comparison.md')}")
    return summaries
