"""The training loop: set lr -> batch -> forward/backward -> clip -> step -> log -> periodic eval and
checkpoint. `train()` is a function with explicit arguments that returns the run's summary."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from . import checkpoint as ckpt
from .config import DataConfig, ModelConfig, SampleConfig, TrainConfig
from .data.batches import IGNORE_INDEX, Batcher
from .data.corpus import Corpus, build_corpus
from .errors import PicoError
from .metrics import continuation_accuracy, evaluate_sources, lm_loss
from .models import build_model, num_params


def resolve_device(device_id: str) -> str:
    """'cuda', 'cuda:1', 'mps' or 'cpu'; falls back to the CPU with a message when it is not there."""
    d = device_id.strip().lower()
    if d.startswith("cuda"):
        if torch.cuda.is_available():
            return d
        print(f"note: {device_id} requested but CUDA is not available; using cpu", file=sys.stderr)
        return "cpu"
    if d == "mps":
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        print("note: mps requested but not available; using cpu", file=sys.stderr)
        return "cpu"
    if d != "cpu":
        raise PicoError(f"unknown --device_id {device_id!r}; use cpu, cuda, cuda:N or mps")
    return "cpu"


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: str) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32. 'auto' picks bf16 where the hardware runs it fast."""
    kind = device.split(":")[0]
    if precision == "fp32":
        return None
    if precision == "auto":
        if kind == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if kind == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return None
    if precision == "fp16" and kind != "cuda":
        raise PicoError("--precision fp16 needs a CUDA device; use bf16 or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast_factory(device: str, dtype: Optional[torch.dtype]) -> Callable:
    if dtype is None:
        return nullcontext
    return functools.partial(torch.autocast, device_type=device.split(":")[0], dtype=dtype)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr (or constant)."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    warm = min(cfg.warmup_steps, max(0, total_steps - 1))
    if step < warm:
        return cfg.learning_rate * (step + 1) / warm
    progress = (step - warm) / max(1, total_steps - warm)
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.learning_rate - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases and norm weights), as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


class _StopFlag:
    """SIGINT / SIGTERM during training: finish the step, checkpoint, exit cleanly."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def prepare_run_dir(run_dir: str, resume: bool, overwrite: bool) -> None:
    if resume:
        if not ckpt.is_run(run_dir):
            raise PicoError(f"--resume {run_dir}: not a run directory")
        return
    if os.path.exists(run_dir) and os.listdir(run_dir):
        if not overwrite:
            raise PicoError(f"{run_dir} already exists; pass --resume to continue it, --overwrite to replace it, "
                            "or choose another --run_name")
        if not ckpt.is_run(run_dir):
            raise PicoError(f"--overwrite: {run_dir} is not a run directory; refusing to delete it")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)


def train(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, run_dir: str, *,
          corpus: Optional[Corpus] = None, resume: bool = False, overwrite: bool = False,
          stop_at_step: Optional[int] = None, progress: bool = True,
          log: Callable[[str], None] = print) -> dict:
    """Train one model; writes the run directory; returns summary.json's content (or, when stopped
    early by stop_at_step or a signal, {"stopped_at": step, ...})."""
    device = resolve_device(train_cfg.device)
    amp_dtype = resolve_precision(train_cfg.precision, device)
    autocast = autocast_factory(device, amp_dtype)
    prepare_run_dir(run_dir, resume, overwrite)

    if corpus is None:
        tokenizer = None
        if resume:
            from .data.tokenizers import load_tokenizer
            tokenizer = load_tokenizer(run_dir)
        corpus = build_corpus(data_cfg, tokenizer=tokenizer)
    tok = corpus.tokenizer
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)

    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg).to(device)
    optimizer = make_optimizer(model, train_cfg, device)
    batcher = Batcher(corpus.sources, model_cfg.block_size, train_cfg.batch_size, data_cfg.batching,
                      seed=train_cfg.seed, pad_id=tok.eot_id)
    steps_per_epoch = min(batcher.steps_per_epoch(), train_cfg.max_steps_per_epoch or batcher.steps_per_epoch())
    total_steps = train_cfg.epochs * steps_per_epoch

    step, elapsed, tokens_seen = 0, 0.0, 0
    if resume:
        state = ckpt.load_trainer_state(run_dir)
        wstep = ckpt.load_weights(run_dir, model)
        if wstep != state["step"]:
            raise PicoError(f"{run_dir}: weights (step {wstep}) and trainer.pt (step {state['step']}) disagree")
        optimizer.load_state_dict(state["optimizer"])
        batcher.load_state_dict(state["batcher"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens_seen"]
        kept = [r for r in ckpt.read_metrics(run_dir) if r.get("step", 0) <= step]
        os.remove(os.path.join(run_dir, ckpt.METRICS))
        ckpt.append_metrics(run_dir, kept)
        log(f"resuming {run_dir} at step {step}/{total_steps}")
    else:
        tok.save(run_dir)
    ckpt.save_config(run_dir, model_cfg, data_cfg, train_cfg)

    n_params = num_params(model)
    log(f"{model_cfg.model}: {n_params:,} parameters, {total_steps} steps "
        f"({train_cfg.epochs} epochs x {steps_per_epoch}), device {device}, "
        f"precision {'fp32' if amp_dtype is None else str(amp_dtype).replace('torch.', '')}, run {run_dir}")

    def trainer_state() -> dict:
        return {"step": step, "elapsed": elapsed, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                "batcher": batcher.state_dict(), "torch_rng": torch.get_rng_state()}

    def evaluate() -> dict:
        r = evaluate_sources(model, corpus.sources, model_cfg.block_size, train_cfg.batch_size,
                             train_cfg.eval_batches, device, autocast)
        return {"step": step, "epoch": step / steps_per_epoch, "test_loss": r["test_loss"],
                "bits_per_byte": r["bits_per_byte"]}

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not progress, dynamic_ncols=True, leave=False)
    pending: list[tuple] = []  # (step, loss on device, tokens, lr): no host sync until the next log
    window_t, window_tokens = time.perf_counter(), 0
    last_ckpt = step if resume else None
    model.train()
    with _StopFlag() as stop:
        while step < total_steps and not (stop_at_step is not None and step >= stop_at_step) and stop.signum is None:
            lr = lr_at(step, total_steps, train_cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = batcher.next_batch()
            n_tok = int((y != IGNORE_INDEX).sum()) if data_cfg.batching == "padded" else y.numel()  # on the host
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = model(x)
            loss = lm_loss(logits, y)
            loss.backward()
            if train_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append((step, loss.detach(), n_tok, lr))
            epoch_end = step % steps_per_epoch == 0
            if step % train_cfg.log_interval == 0 or epoch_end or step == total_steps:
                losses = torch.stack([p[1] for p in pending]).tolist()
                now = time.perf_counter()
                window_tokens = sum(p[2] for p in pending)
                dt = now - window_t
                elapsed += dt
                tokens_seen += window_tokens
                tps = window_tokens / dt if dt > 0 else float("nan")
                bad = [(p[0], v) for p, v in zip(pending, losses) if not math.isfinite(v)]
                if bad:
                    where = f"{run_dir} (step {last_ckpt})" if last_ckpt is not None else "none yet"
                    raise PicoError(f"loss is {bad[0][1]} at step {bad[0][0]}; stopping. Last good checkpoint: {where}")
                ckpt.append_metrics(run_dir, [
                    {"step": p[0], "train_loss": v, "lr": p[3], "tokens_per_s": tps, "elapsed": elapsed}
                    for p, v in zip(pending, losses)])
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}")
                bar.update(len(pending))
                pending.clear()
                window_t = time.perf_counter()
            if (train_cfg.eval_interval and step % train_cfg.eval_interval == 0) or epoch_end or step == total_steps:
                rec = evaluate()
                rec["elapsed"] = elapsed
                ckpt.append_metrics(run_dir, [rec])
                bar.write(f"step {step}: test loss {rec['test_loss']:.4f}, {rec['bits_per_byte']:.3f} bits/byte") \
                    if progress else None
                ckpt.save_checkpoint(run_dir, model, trainer_state())
                last_ckpt = step
                window_t = time.perf_counter()  # evaluation time does not count as training time
    bar.close()

    if step < total_steps:  # stopped early: flush, checkpoint, tell how to go on
        if pending:
            losses = torch.stack([p[1] for p in pending]).tolist()
            ckpt.append_metrics(run_dir, [{"step": p[0], "train_loss": v, "lr": p[3]} for p, v in zip(pending, losses)])
        ckpt.save_checkpoint(run_dir, model, trainer_state())
        why = f"signal {signal.Signals(stop.signum).name}" if stop.signum is not None else f"stop at step {step}"
        log(f"stopped ({why}) at step {step}/{total_steps}; checkpoint saved. Resume with: "
            f"pico-llm train --resume {run_dir}")
        return {"stopped_at": step, "run_dir": run_dir}

    return finish_run(model, corpus, model_cfg, data_cfg, train_cfg, run_dir, device, n_params, tokens_seen, elapsed, log)


def finish_run(model, corpus: Corpus, model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig,
               run_dir: str, device: str, n_params: int, tokens_seen: int, elapsed: float, log=print) -> dict:
    """Final figures, samples and the loss plot of a finished run."""
    from .plots import loss_curves
    from .sampling import generate_text

    records = ckpt.read_metrics(run_dir)
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    evals = [r for r in records if "test_loss" in r]
    final = evals[-1]
    best = min(evals, key=lambda r: r["test_loss"])
    summary = {
        "model": model_cfg.model, "params": n_params, "steps": final["step"],
        "train_loss": sum(train_losses[-10:]) / len(train_losses[-10:]),
        "test_loss": final["test_loss"], "perplexity": math.exp(min(final["test_loss"], 50.0)),
        "bits_per_byte": final["bits_per_byte"], "best_test_loss": best["test_loss"], "best_step": best["step"],
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else None,
        "train_seconds": elapsed, "tokenizer": data_cfg.tokenizer, "vocab_size": model_cfg.vocab_size,
    }
    if corpus.numeric:
        summary["continuation_accuracy"] = continuation_accuracy(model, corpus.tokenizer, corpus.numeric_test_docs(),
                                                                 device=device)
    rows = []
    for label, p in (("greedy", None), ("top-p 0.95", 0.95), ("top-p 1.0", 1.0)):
        cfg = SampleConfig(max_new_tokens=train_cfg.max_new_tokens, greedy=p is None, top_p=p, seed=train_cfg.seed)
        text = generate_text(model, corpus.tokenizer, train_cfg.prompt, cfg, device=device)[0]
        rows.append((label, text))
        log(f"[{label}] {text!r}")
    ckpt.write_text(os.path.join(run_dir, ckpt.SAMPLES),
                    f"# Samples from {model_cfg.model}\n\nPrompt: `{train_cfg.prompt}`\n\n| setting | text |\n|---|---|\n"
                    + "".join(f"| {label} | {md_cell(t)} |\n" for label, t in rows))
    loss_curves({model_cfg.model: records}, os.path.join(run_dir, ckpt.LOSS_PLOT), title=f"{model_cfg.model} loss")
    ckpt.write_json(os.path.join(run_dir, ckpt.SUMMARY), summary)
    acc = f", continuation accuracy {summary['continuation_accuracy']:.3f}" if "continuation_accuracy" in summary else ""
    log(f"{model_cfg.model}: train loss {summary['train_loss']:.4f}, test loss {summary['test_loss']:.4f}, "
        f"{summary['bits_per_byte']:.3f} bits/byte{acc}; run {run_dir}")
    return summary


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def train_models(names: list[str], models: dict[str, ModelConfig], data_cfg: DataConfig, train_cfg: TrainConfig,
                 output_dir: str, run_name: str, *, overwrite: bool = False, stop_at_step: Optional[int] = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Train each model on identical data, batches and seed. One model: OUTPUT/NAME is the run. Several:
    OUTPUT/NAME/<model> each, plus OUTPUT/NAME/comparison.png and comparison.md."""
    from .plots import loss_curves

    corpus = build_corpus(data_cfg)  # one split, one tokenizer, the same batches for every model
    if len(names) == 1:
        return {names[0]: train(models[names[0]], data_cfg, train_cfg, os.path.join(output_dir, run_name),
                                corpus=corpus, overwrite=overwrite, stop_at_step=stop_at_step, progress=progress,
                                log=log)}
    root = os.path.join(output_dir, run_name)
    summaries = {}
    for m in names:
        summaries[m] = train(models[m], data_cfg, train_cfg, os.path.join(root, m), corpus=corpus,
                             overwrite=overwrite, stop_at_step=stop_at_step, progress=progress, log=log)
    if all("test_loss" in s for s in summaries.values()):
        loss_curves({m: ckpt.read_metrics(os.path.join(root, m)) for m in names}, os.path.join(root, "comparison.png"),
                    title="train and test loss")
        table = summary_table(summaries)
        ckpt.write_text(os.path.join(root, "comparison.md"), table)
        log("\n" + table)
        log(f"comparison: {os.path.join(root, 'comparison.png')}, {os.path.join(root, 'comparison.md')}")
    return summaries


def summary_table(summaries: dict[str, dict]) -> str:
    """A Markdown table of the final figures of several runs."""
    cols = [("params", "{:,}"), ("train_loss", "{:.4f}"), ("test_loss", "{:.4f}"), ("bits_per_byte", "{:.3f}"),
            ("tokens_per_s", "{:,.0f}"), ("train_seconds", "{:.1f}"), ("continuation_accuracy", "{:.3f}")]
    cols = [(k, f) for k, f in cols if any(s.get(k) is not None for s in summaries.values())]
    lines = ["| model | " + " | ".join(k for k, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in summaries.items():
        cells = [f.format(s[k]) if s.get(k) is not None else "" for k, f in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
