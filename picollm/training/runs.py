"""Several models trained side by side on identical data, batches and seed: a multi-model folder
OUTPUT/NAME/<model>/ (each a run directory) with comparison.png and comparison.md."""

from __future__ import annotations

import os
from typing import Callable, Optional

from .. import checkpoint as ckpt
from ..config import DataConfig, ModelConfig, TrainConfig
from ..errors import PicoError
from ..fsio import write_text
from ..plots import loss_curves
from .distributed import Dist, join_processes, resume_command, shared_corpus
from .loop import MetricsSink, train
from .stop import STOP
from .summary import summary_table

SinkFactory = Callable[[str], tuple[MetricsSink, ...]]  # run directory -> the metrics sinks for its run
Configs = tuple[ModelConfig, DataConfig, TrainConfig]


def train_models(names: list[str], models: dict[str, ModelConfig], data_cfg: DataConfig, train_cfg: TrainConfig,
                 output_dir: str, run_name: str, *, overwrite: bool = False, stop_at_step: Optional[int] = None,
                 progress: bool = True, log: Callable[[str], None] = print,
                 sinks: SinkFactory = lambda run_dir: ()) -> dict[str, dict]:
    """Train each model on identical data, batches and seed. One model: OUTPUT/NAME is the run. Several:
    OUTPUT/NAME/<model> each, plus OUTPUT/NAME/comparison.png and comparison.md. After a signal, the models
    not trained yet are set up and stopped at step 0, so that `pico-llm train --resume OUTPUT/NAME`
    continues them all."""
    with STOP:
        dd = join_processes(train_cfg)
        corpus = shared_corpus(data_cfg, dd)  # one split and tokenizer, the same batches for all
        root = os.path.join(output_dir, run_name)
        dirs = {names[0]: root} if len(names) == 1 else {m: os.path.join(root, m) for m in names}
        summaries = {}
        for m, run_dir in dirs.items():
            summaries[m] = train(models[m], data_cfg, train_cfg, run_dir, corpus=corpus, overwrite=overwrite,
                                 stop_at_step=stop_at_step, progress=progress, log=log, sinks=sinks(run_dir))
        if len(names) > 1:
            _conclude(root, dirs, summaries, dd, log)
        return summaries


def multi_runs(root: str) -> dict[str, str]:
    """The runs of a multi-model folder (model name -> run directory), {} when root is not one."""
    if ckpt.is_run(root) or not os.path.isdir(root):
        return {}
    subs = {n: os.path.join(root, n) for n in sorted(os.listdir(root))}
    return {n: d for n, d in subs.items() if ckpt.is_run(d) and ckpt.load_config(d)[0].model == n}


def resume_models(root: str, configs: Callable[[Configs], Configs], *, stop_at_step: Optional[int] = None,
                  progress: bool = True, log: Callable[[str], None] = print,
                  sinks_of: Callable[[TrainConfig], SinkFactory] = lambda tcfg: lambda run_dir: ()) -> dict[str, dict]:
    """`--resume` of a multi-model folder: each unfinished model resumed (configs(stored) applies the flags
    given; sinks_of(its TrainConfig) makes its metrics sinks), the finished ones' summaries read, then the
    comparison written."""
    dirs = multi_runs(root)
    if not dirs:
        raise PicoError(f"--resume {root}: not a run directory, nor a folder of runs of several models")
    summaries: dict[str, dict] = {}
    dd = join_processes(ckpt.load_config(next(iter(dirs.values())))[2])
    with STOP:
        for m, d in dirs.items():
            if os.path.isfile(os.path.join(d, ckpt.SUMMARY)):
                summaries[m] = ckpt.read_summary(d)
                log(f"{m}: finished, skipped ({d})")
                continue
            mcfg, dcfg, tcfg = configs(ckpt.load_config(d))
            summaries[m] = train(mcfg, dcfg, tcfg, d, resume=True, stop_at_step=stop_at_step, progress=progress,
                                 log=log, sinks=sinks_of(tcfg)(d))
        _conclude(root, dirs, summaries, dd, log)
    return summaries


def _conclude(root: str, dirs: dict[str, str], summaries: dict[str, dict], dd: Dist,
              log: Callable[[str], None]) -> None:
    """The comparison when every model finished; else what is left and the one command that continues."""
    left = {m: s for m, s in summaries.items() if "stopped_at" in s}
    if left:
        where = ", ".join(f"{m} at step {s['stopped_at']}/{s['total_steps']}" for m, s in left.items())
        why = f"stopped by {STOP.name}" if STOP.requested else "stopped"
        log(f"{why}: {where}; continue them all with: {resume_command(root, dd)}")
        return
    if not dd.main:  # rank 0 writes the comparison
        return
    loss_curves({m: ckpt.read_metrics(d) for m, d in dirs.items()}, os.path.join(root, "comparison.png"),
                title="train and test loss")
    table = summary_table(summaries)
    write_text(os.path.join(root, "comparison.md"), table)
    log("\n" + table)
    log(f"comparison: {os.path.join(root, 'comparison.png')}, {os.path.join(root, 'comparison.md')}")
