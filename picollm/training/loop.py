"""The training loop: set lr -> batch -> micro-steps (forward/backward) -> clip -> step -> log ->
periodic eval and checkpoint. `train()` is a function with explicit arguments that returns the run's
summary; `train_step()` is the one optimizer step, which `pico-llm bench` times too.

Under `torchrun` the same loop runs in every process with DistributedDataParallel (see distributed.py:
every rank draws the same global batch and trains on its own rows). Rank 0 alone writes the run
directory and prints."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..config import DataConfig, ModelConfig, TrainConfig
from ..data.batches import IGNORE_INDEX, Batcher
from ..data.corpus import Corpus, data_line
from ..data.tokenizers import load_tokenizer
from ..device import autocast_factory, dtype_name, resolve_device, resolve_precision
from ..errors import PicoError
from ..metrics import evaluate_sources, lm_loss, moe_aux_loss
from ..models import build_model, num_params
from ..models.transformer import MoE
from .compile import maybe_compile
from .distributed import (
    Dist,
    all_reduce_sum,
    any_rank,
    gather_rng_states,
    join_processes,
    micro_batches,
    on_main,
    resume_command,
    shared_corpus,
    wrap_ddp,
)
from .optim import lr_at, make_optimizer, optimizer_name, set_lr
from .stop import STOP
from .summary import finish_run

MetricsSink = Callable[[list[dict]], None]  # receives the records metrics.jsonl gets (e.g. TensorBoard)


# ----------------------------------------------------------------------------- one optimizer step


class RouterTap:
    """The router logits of a model's mixture-of-experts layers, read from their hook_router points
    while recording (the training forward; evaluation and generation pass through untouched)."""

    def __init__(self, model: torch.nn.Module):
        self.moe = [m for m in model.modules() if isinstance(m, MoE)]
        self.k = self.moe[0].k if self.moe else 0
        self.logits: list[torch.Tensor] = []
        self.on = False
        for m in self.moe:  # registered before any torch.compile, which then traces them
            m.hook_router.register_forward_hook(self._keep)

    def _keep(self, _module, _args, out):
        if self.on:
            self.logits.append(out)

    def loss(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward()'s result, the load-balancing loss of that forward's routing)."""
        self.on, self.logits = True, []
        try:
            out = forward()
        finally:
            self.on = False
        logits, self.logits = self.logits, []
        return out, moe_aux_loss(logits, self.k)


@dataclass
class Stepper:
    """What one optimizer step needs. `net` is what the step calls: the model itself, or DDP and/or
    torch.compile around it; `model` stays the plain module (clipping, evaluation, checkpoints). `ddp`
    is said explicitly rather than guessed from net's type (a compiled module is a wrapper too)."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable
    device: str
    dist: Dist = field(default_factory=Dist)
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    padded: bool = False
    router: Optional[RouterTap] = None  # a mixture of experts: its load-balancing loss joins the LM loss
    aux_weight: float = 0.0

    @property
    def ddp(self) -> bool:
        return self.dist.ddp


def count_targets(y: torch.Tensor, padded: bool) -> int:
    """Targets in y that count in the loss (padding never does)."""
    return int((y != IGNORE_INDEX).sum()) if padded else y.numel()


class StepResult(NamedTuple):
    loss: torch.Tensor  # the batch's mean LM loss, a device tensor (no host sync)
    targets: int  # its number of targets
    aux_loss: Optional[torch.Tensor]  # the mixture of experts' load-balancing loss (None without experts)


def train_step(s: Stepper, x: torch.Tensor, y: torch.Tensor, lr: float) -> StepResult:
    """One optimizer step on the global batch (x, y): this rank's micro-batches forward and backward
    (gradients synchronised once, at the last), clip, step. With experts, the loss minimised is the LM
    loss + aux_weight x the load-balancing loss; the two are reported apart."""
    set_lr(s.optimizer, lr)
    n_tok = count_targets(y, s.padded)
    micro = micro_batches(x, y, s.dist, s.grad_accum_steps)
    step_loss = torch.zeros((), device=s.device)
    step_aux = torch.zeros((), device=s.device) if s.router is not None else None
    for k, (xm, ym) in enumerate(micro):
        share = count_targets(ym, s.padded) / max(1, n_tok)  # of the global batch's targets; all shares sum to 1
        xm, ym = xm.to(s.device, non_blocking=True), ym.to(s.device, non_blocking=True)
        with s.net.no_sync() if s.ddp and k < len(micro) - 1 else nullcontext():
            with s.autocast():
                if s.router is not None:
                    logits, aux = s.router.loss(lambda: s.net(xm))  # noqa: B023 (called at once)
                else:
                    logits, aux = s.net(xm), None
            loss = lm_loss(logits, ym) if share > 0 else logits.sum() * 0.0
            total = loss if aux is None else loss + s.aux_weight * aux
            s.scaler.scale(total * (share * s.dist.world_size)).backward()  # x world_size: DDP averages ranks
        step_loss = step_loss + loss.detach() * share
        if aux is not None:
            step_aux = step_aux + aux.detach() / len(micro)
    if s.grad_clip > 0:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, n_tok, step_aux)


# ----------------------------------------------------------------------------- a run's state


@dataclass
class TrainState:
    """The loop's counters; with the optimizer, batcher and RNG states they make trainer.pt."""

    step: int = 0
    elapsed: float = 0.0  # training seconds, evaluation excluded
    tokens_seen: int = 0
    last_checkpoint: Optional[int] = None  # the step of the last checkpoint this process wrote or resumed from


@dataclass
class Run:
    """Everything one training run holds between its set-up and its end."""

    run_dir: str
    model_cfg: ModelConfig
    data_cfg: DataConfig
    train_cfg: TrainConfig
    corpus: Corpus
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batcher: Batcher
    dist: Dist
    device: str
    amp_dtype: Optional[torch.dtype]
    steps_per_epoch: int
    state: TrainState = field(default_factory=TrainState)

    @property
    def total_steps(self) -> int:
        return self.train_cfg.epochs * self.steps_per_epoch

    def trainer_state(self) -> dict:
        """trainer.pt's content. Every rank calls it: under DDP each rank's RNG state is gathered."""
        st = self.state
        out = {"step": st.step, "elapsed": st.elapsed, "tokens_seen": st.tokens_seen,
               "optimizer": self.optimizer.state_dict(), "batcher": self.batcher.state_dict(),
               "torch_rng": torch.get_rng_state()}
        rank_rng = gather_rng_states(self.dist)
        if rank_rng is not None:
            out["rank_rng"] = rank_rng
        return out

    def checkpoint(self) -> None:
        """Weights and trainer state, written by rank 0 as a unit; a failure stops every rank."""
        state = self.trainer_state()
        on_main(lambda: ckpt.save_checkpoint(self.run_dir, self.model, state), self.dist)
        self.state.last_checkpoint = self.state.step

    def evaluate(self, autocast: Callable) -> dict:
        """Test loss and bits per byte; every rank scores its share of the windows."""
        r = evaluate_sources(self.model, self.corpus.sources, self.model_cfg.block_size, self.train_cfg.batch_size,
                             self.train_cfg.eval_batches, self.device, autocast, self.dist.rank, self.dist.world_size,
                             batching=self.data_cfg.batching)
        return {"step": self.state.step, "epoch": self.state.step / self.steps_per_epoch,
                "test_loss": r["test_loss"], "bits_per_byte": r["bits_per_byte"], "elapsed": self.state.elapsed}


class MetricsLog:
    """The losses of the steps since the last log, kept on the device (no host sync per step) and
    written to metrics.jsonl (and the sinks) at each flush, with tokens/s over that window."""

    def __init__(self, run: Run, sinks: list[MetricsSink], bar: tqdm):
        self.run, self.sinks, self.bar = run, sinks, bar
        self.pending: list[tuple[int, torch.Tensor, int, float]] = []  # (step, loss, targets, lr)
        self.aux: list[torch.Tensor] = []  # the steps' load-balancing losses (a mixture of experts)
        self.window_t = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, n_tok: int, lr: float, aux: Optional[torch.Tensor] = None) -> None:
        self.pending.append((step, loss, n_tok, lr))
        if aux is not None:
            self.aux.append(aux)

    def write(self, records: list[dict]) -> None:
        if self.run.dist.main:
            ckpt.append_metrics(self.run.run_dir, records)
            for sink in self.sinks:
                sink(records)

    def restart_clock(self) -> None:
        """Time from here on counts as training (called after evaluation and checkpoints)."""
        self.window_t = time.perf_counter()

    def flush(self) -> None:
        """Logs the pending steps. Called before every checkpoint, so a NaN or inf loss stops the run
        before it could be saved over the last good checkpoint."""
        if not self.pending:
            return
        st = self.run.state
        losses = all_reduce_sum(torch.stack([p[1] for p in self.pending]), self.run.dist).tolist()  # ranks' shares
        dt = time.perf_counter() - self.window_t
        window_tokens = sum(p[2] for p in self.pending)
        st.elapsed += dt
        st.tokens_seen += window_tokens
        tps = window_tokens / dt if dt > 0 else float("nan")
        bad = [(p[0], v) for p, v in zip(self.pending, losses) if not math.isfinite(v)]
        if bad:
            where = f"{self.run.run_dir} (step {st.last_checkpoint})" if st.last_checkpoint is not None else "none yet"
            raise PicoError(f"loss is {bad[0][1]} at step {bad[0][0]}; stopping. Last good checkpoint: {where}")
        records = [{"step": p[0], "train_loss": v, "lr": p[3], "tokens_per_s": tps, "elapsed": st.elapsed}
                   for p, v in zip(self.pending, losses)]
        if self.aux:  # each rank's own routing: averaged over ranks
            aux = (all_reduce_sum(torch.stack(self.aux), self.run.dist) / self.run.dist.world_size).tolist()
            for r, a in zip(records, aux):
                r["aux_loss"] = a
            self.aux.clear()
        self.write(records)
        self.bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}")
        self.bar.update(len(self.pending))
        self.pending.clear()
        self.restart_clock()


# ----------------------------------------------------------------------------- set-up


def _restore(run: Run, say: Callable[[str], None]) -> None:
    """Weights, optimizer, batcher and RNG state from the run's last checkpoint."""
    d, run_dir = run.dist, run.run_dir
    saved = ckpt.load_trainer_state(run_dir)
    wstep = ckpt.load_weights(run_dir, run.model)
    if wstep != saved["step"]:
        raise PicoError(f"{run_dir}: weights (step {wstep}) and trainer.pt (step {saved['step']}) disagree")
    if saved["step"] > run.total_steps:
        raise PicoError(f"{run_dir} is at step {saved['step']}, past the {run.total_steps} steps of "
                        f"--epochs {run.train_cfg.epochs}; give at least the epochs it has trained")
    try:
        run.optimizer.load_state_dict(saved["optimizer"])
        run.batcher.load_state_dict(saved["batcher"])
        torch.set_rng_state(saved["torch_rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise PicoError(f"{run_dir}: {ckpt.TRAINER} does not match this run ({type(e).__name__})") from None
    rank_rng = saved.get("rank_rng")
    if d.ddp and rank_rng is not None and len(rank_rng) == d.world_size:
        torch.set_rng_state(rank_rng[d.rank])
    elif d.rank > 0:  # another number of processes: dropout masks need not match the earlier ones
        torch.manual_seed(run.train_cfg.seed + d.rank)
    run.state = TrainState(saved["step"], saved["elapsed"], saved["tokens_seen"], last_checkpoint=saved["step"])
    step = run.state.step
    # the steps after the checkpoint are about to be redone
    on_main(lambda: ckpt.write_metrics(run_dir, [r for r in ckpt.read_metrics(run_dir) if r.get("step", 0) <= step]), d)
    say(f"resuming {run_dir} at step {step}/{run.total_steps}")


def open_run(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, run_dir: str, dd: Dist,
             device: str, corpus: Optional[Corpus], resume: bool, overwrite: bool,
             say: Callable[[str], None]) -> Run:
    """The run directory, data, model, optimizer and batcher of a new run, or of a resumed one as its
    last checkpoint left them. A new run's directory that this call created is removed when it fails."""
    fresh = not resume and not os.path.exists(run_dir)
    on_main(lambda: ckpt.prepare_run_dir(run_dir, resume, overwrite), dd)
    try:
        return _open_run(model_cfg, data_cfg, train_cfg, run_dir, dd, device, corpus, resume, say)
    except BaseException:
        if fresh and dd.main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _open_run(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, run_dir: str, dd: Dist,
              device: str, corpus: Optional[Corpus], resume: bool, say: Callable[[str], None]) -> Run:
    if corpus is None:
        corpus = shared_corpus(data_cfg, dd, tokenizer=load_tokenizer(run_dir) if resume else None)
    tok = corpus.tokenizer
    if resume and model_cfg.vocab_size and model_cfg.vocab_size != tok.vocab_size:
        raise PicoError(f"{run_dir}: tokenizer has {tok.vocab_size} tokens but config.json says {model_cfg.vocab_size}")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
    model = build_model(model_cfg).to(device)
    batcher = Batcher(corpus.sources, model_cfg.block_size, train_cfg.batch_size, data_cfg.batching,
                      seed=train_cfg.seed, pad_id=tok.eot_id)
    steps_per_epoch = min(batcher.steps_per_epoch(), train_cfg.max_steps_per_epoch or batcher.steps_per_epoch())
    run = Run(run_dir, model_cfg, data_cfg, train_cfg, corpus, model, make_optimizer(model, train_cfg, device),
              batcher, dd, device, resolve_precision(train_cfg.precision, device), steps_per_epoch)
    if resume:
        _restore(run, say)
    else:
        if dd.rank > 0:  # each rank its own dropout masks
            torch.manual_seed(train_cfg.seed + dd.rank)
        on_main(lambda: tok.save(run_dir), dd)
    on_main(lambda: ckpt.save_config(run_dir, model_cfg, data_cfg, train_cfg), dd)
    return run


def make_stepper(run: Run, say: Callable[[str], None]) -> Stepper:
    router = RouterTap(run.model)  # before DDP and compile wrap the model
    net = wrap_ddp(run.model, run.dist, run.device) if run.dist.ddp else run.model
    if run.train_cfg.compile:
        net = maybe_compile(net, say)
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (the scaler is then a no-op)
    scaler = torch.amp.GradScaler(run.device.split(":")[0], enabled=run.amp_dtype == torch.float16)
    t = run.train_cfg
    return Stepper(run.model, net, run.optimizer, scaler, autocast_factory(run.device, run.amp_dtype), run.device,
                   run.dist, t.grad_accum_steps, t.grad_clip, run.data_cfg.batching == "padded",
                   router if router.moe else None, t.moe_aux_weight)


def describe(run: Run, device_id: str) -> str:
    t, d, accum = run.train_cfg, run.dist, run.train_cfg.grad_accum_steps
    layout = (f", {d.world_size} processes x {accum} micro-batches of {t.batch_size // (d.world_size * accum)}"
              if d.world_size * accum > 1 else "")
    auto = " (auto)" if device_id.strip().lower() == "auto" else ""
    return (f"{run.model_cfg.model}: {num_params(run.model):,} parameters, {run.total_steps} steps "
            f"({t.epochs} epochs x {run.steps_per_epoch}), batch {t.batch_size}{layout}, device {run.device}{auto}, "
            f"precision {dtype_name(run.amp_dtype)}, optimizer {optimizer_name(run.model, t)}, run {run.run_dir}")


# ----------------------------------------------------------------------------- the loop


def train(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, run_dir: str, *,
          corpus: Optional[Corpus] = None, resume: bool = False, overwrite: bool = False,
          stop_at_step: Optional[int] = None, progress: bool = True, log: Callable[[str], None] = print,
          sinks: tuple[MetricsSink, ...] = ()) -> dict:
    """Train one model; writes the run directory; returns summary.json's content (or, when stopped
    early by stop_at_step or a signal, {"stopped_at": step, "total_steps": ..., "run_dir": ..., "signal":
    name or None}). A signal stops the loop after the current step (training/stop.py).
    `sinks` also receive every record metrics.jsonl gets (rank 0 only)."""
    dd = join_processes(train_cfg)
    device = resolve_device(train_cfg.device)
    if dd.ddp and device.startswith("cuda"):
        device = f"cuda:{dd.local_rank}"
    say = log if dd.main else (lambda s: None)  # one voice: rank 0's
    with STOP:  # a signal before the loop interrupts at once; a new run's directory is then removed
        run = open_run(model_cfg, data_cfg, train_cfg, run_dir, dd, device, corpus, resume, overwrite, say)
        return _train_loop(run, stop_at_step, progress, say, log, sinks)


def _train_loop(run: Run, stop_at_step: Optional[int], progress: bool, say: Callable[[str], None],
                log: Callable[[str], None], sinks: tuple[MetricsSink, ...]) -> dict:
    dd, data_cfg, train_cfg, run_dir, device = run.dist, run.data_cfg, run.train_cfg, run.run_dir, run.device
    stepper = make_stepper(run, say)
    say(describe(run, train_cfg.device))
    say(data_line(run.corpus))
    st, cfg = run.state, run.train_cfg
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    bar = tqdm(total=run.total_steps, initial=st.step, disable=None if (progress and dd.main) else True,
               dynamic_ncols=True, leave=False)
    metrics = MetricsLog(run, list(sinks), bar)
    halted = False  # a signal reached some rank: every rank stops after the same step

    run.model.train()
    with STOP.stepping() as stop:
        while st.step < run.total_steps and not (stop_at_step is not None and st.step >= stop_at_step):
            halted = any_rank(stop.requested, dd, device)
            if halted:
                break
            lr = lr_at(st.step, run.total_steps, cfg)
            x, y = run.batcher.next_batch()  # the global batch, the same rows on every rank
            loss, n_tok, aux = train_step(stepper, x, y, lr)
            st.step += 1
            metrics.add(st.step, loss, n_tok, lr, aux)
            boundary = (cfg.eval_interval and st.step % cfg.eval_interval == 0) \
                or st.step % run.steps_per_epoch == 0 or st.step == run.total_steps
            if st.step % cfg.log_interval == 0 or boundary:
                metrics.flush()
            if boundary:  # evaluate, then checkpoint
                rec = run.evaluate(stepper.autocast)
                metrics.write([rec])
                if progress and dd.main:
                    bar.write(f"step {st.step}: test loss {rec['test_loss']:.4f}, {rec['bits_per_byte']:.3f} bits/byte")
                run.checkpoint()
                metrics.restart_clock()  # evaluation time does not count as training time
        bar.close()
        if st.step < run.total_steps:  # stopped early: flush, checkpoint, tell how to go on
            metrics.flush()
            run.checkpoint()
            signame = STOP.name
            why = (f"signal {signame}" if signame else "signal on another rank") if halted else f"stop at step {st.step}"
            say(f"stopped ({why}) at step {st.step}/{run.total_steps}; checkpoint saved. "
                f"Resume with: {resume_command(run_dir, dd)}")
            return {"stopped_at": st.step, "total_steps": run.total_steps, "run_dir": run_dir, "signal": signame}
    if not dd.main:
        return {"rank": dd.rank, "run_dir": run_dir}
    return finish_run(run.model, run.corpus, run.model_cfg, data_cfg, cfg, run_dir, device, num_params(run.model),
                      st.tokens_seen, st.elapsed, log)
