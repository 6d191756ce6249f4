"""The training loop: set lr -> batch -> forward/backward -> clip -> step -> log -> periodic eval and
checkpoint. `train()` is a function with explicit arguments that returns the run's summary.

Under `torchrun` the same loop runs in every process with DistributedDataParallel. `batch_size` is the
global batch: every rank draws it from the same seeded generator and trains on its own
batch_size / (world_size * grad_accum_steps)-row micro-batches, so any number of processes and
accumulation steps sees exactly the rows of one process (only float summation order differs). Rank 0
alone writes the run directory and prints."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shlex
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch; rank 0 of 1 without one."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """From the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Dist()
    try:
        return Dist(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]),
                    int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))
    except ValueError:
        raise PicoError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (torchrun sets them)") from None


def setup_distributed(device_id: str) -> Dist:
    """Under torchrun with more than one process, joins the process group (once per process): NCCL with
    one GPU per local rank when CUDA is asked for and present, gloo on the CPU."""
    import torch.distributed as dist

    d = dist_from_env()
    if d.world_size == 1 or dist.is_initialized():
        return d
    kind = device_id.strip().lower().split(":")[0]
    if kind == "mps":
        raise PicoError("DDP runs on cuda (nccl) or cpu (gloo), not on mps")
    cuda = kind == "cuda" and torch.cuda.is_available()
    if cuda:
        if d.local_rank >= torch.cuda.device_count():
            raise PicoError(f"local rank {d.local_rank} needs GPU {d.local_rank}, but this node has "
                            f"{torch.cuda.device_count()}; lower --nproc_per_node")
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return d


def join_processes(train_cfg: TrainConfig) -> Dist:
    """Checks that the global batch divides over the processes (before waiting for any of them), then
    joins them (setup_distributed)."""
    d = dist_from_env()
    if train_cfg.batch_size % (d.world_size * train_cfg.grad_accum_steps):
        raise PicoError(f"--batch_size ({train_cfg.batch_size}) is the global batch: it must be divisible by "
                        f"processes x --grad_accum_steps ({d.world_size} x {train_cfg.grad_accum_steps})")
    return setup_distributed(train_cfg.device)


def shared_corpus(data_cfg: DataConfig, d: Dist) -> Corpus:
    """build_corpus, with one tokenizer for all ranks: rank 0 builds (or trains) it, the others tokenize with
    a copy of it, so every rank holds the same token arrays and draws the same global batches."""
    if d.world_size == 1:
        return build_corpus(data_cfg)
    import tempfile

    from .data.tokenizers import load_tokenizer

    built: list[Corpus] = []
    on_main(lambda: built.append(build_corpus(data_cfg)), d)
    tok_json = broadcast_object(built[0].tokenizer.to_json() if d.main else None, d)
    if d.main:
        return built[0]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tok_json)
        return build_corpus(data_cfg, tokenizer=load_tokenizer(tmp))


def teardown_distributed() -> None:
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers first: a reducer outliving its process group can abort the exit
        dist.destroy_process_group()


def broadcast_object(obj, d: Dist):
    """Rank 0's obj, on every rank."""
    if d.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], None], d: Dist) -> None:
    """Runs fn on rank 0 only; when it fails, every rank raises the same PicoError (no rank is left
    waiting for one that has given up)."""
    err = None
    if d.main:
        try:
            fn()
        except PicoError as e:
            err = str(e)
        except Exception as e:
            broadcast_object(f"rank 0 failed: {type(e).__name__}: {e}", d)
            raise
    err = broadcast_object(err, d)
    if err is not None:
        raise PicoError(err)


def _any_rank(flag: bool, d: Dist, device: str) -> bool:
    if d.world_size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def micro_batches(x: torch.Tensor, y: torch.Tensor, d: Dist, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the global batch (rows rank*B/W .. (rank+1)*B/W - 1), cut into `accum`
    micro-batches in order. Every rank draws the same global batch, so W ranks x K micro-batches see
    exactly the rows a single process sees."""
    per_rank = x.size(0) // d.world_size
    m, lo = per_rank // accum, d.rank * per_rank
    return [(x[lo + k * m: lo + (k + 1) * m], y[lo + k * m: lo + (k + 1) * m]) for k in range(accum)]


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
    dd = join_processes(train_cfg)
    device = resolve_device(train_cfg.device)
    if dd.world_size > 1 and device.startswith("cuda"):
        device = f"cuda:{dd.local_rank}"
    say = log if dd.main else (lambda s: None)  # one voice: rank 0's
    append_metrics = ckpt.append_metrics  # with --tensorboard, also to event files beside metrics.jsonl
    if train_cfg.tensorboard and dd.main:
        from .experiments.tensorboard import TensorBoardLog
        append_metrics = TensorBoardLog(run_dir).append_metrics  # raises at once when tensorboard is missing
    amp_dtype = resolve_precision(train_cfg.precision, device)
    autocast = autocast_factory(device, amp_dtype)
    on_main(lambda: prepare_run_dir(run_dir, resume, overwrite), dd)

    if corpus is None:
        tokenizer = None
        if resume:
            from .data.tokenizers import load_tokenizer
            tokenizer = load_tokenizer(run_dir)
        corpus = build_corpus(data_cfg, tokenizer=tokenizer) if resume else shared_corpus(data_cfg, dd)
    tok = corpus.tokenizer
    if resume and model_cfg.vocab_size and model_cfg.vocab_size != tok.vocab_size:
        raise PicoError(f"{run_dir}: tokenizer has {tok.vocab_size} tokens but config.json says {model_cfg.vocab_size}")
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
        try:
            optimizer.load_state_dict(state["optimizer"])
            batcher.load_state_dict(state["batcher"])
            torch.set_rng_state(state["torch_rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise PicoError(f"{run_dir}: {ckpt.TRAINER} does not match this run ({type(e).__name__})") from None
        rank_rng = state.get("rank_rng")
        if dd.world_size > 1 and rank_rng is not None and len(rank_rng) == dd.world_size:
            torch.set_rng_state(rank_rng[dd.rank])
        elif dd.rank > 0:  # another number of processes: dropout masks need not match the earlier ones
            torch.manual_seed(train_cfg.seed + dd.rank)
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens_seen"]

        def drop_later_metrics() -> None:  # the steps after the checkpoint are about to be redone
            ckpt.write_metrics(run_dir, [r for r in ckpt.read_metrics(run_dir) if r.get("step", 0) <= step])

        on_main(drop_later_metrics, dd)
        say(f"resuming {run_dir} at step {step}/{total_steps}")
    else:
        if dd.rank > 0:  # the same initial weights everywhere (above), each rank its own dropout masks
            torch.manual_seed(train_cfg.seed + dd.rank)
        on_main(lambda: tok.save(run_dir), dd)
    on_main(lambda: ckpt.save_config(run_dir, model_cfg, data_cfg, train_cfg), dd)
    net = model  # what the training step calls; `model` stays the plain module (eval, checkpoints, samples)
    if dd.world_size > 1:
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # no buffer sync per forward: the only buffers are constant tables (RoPE, sinusoidal positions)
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        net = DDP(model, device_ids=[dd.local_rank] if device.startswith("cuda") else None, **{no_sync: False})

    if train_cfg.compile:
        net = maybe_compile(net, say)
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (the scaler is then a no-op)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp_dtype == torch.float16)
    n_params = num_params(model)
    accum = train_cfg.grad_accum_steps
    layout = (f", {dd.world_size} processes x {accum} micro-batches of {train_cfg.batch_size // (dd.world_size * accum)}"
             if dd.world_size * accum > 1 else "")
    say(f"{model_cfg.model}: {n_params:,} parameters, {total_steps} steps "
        f"({train_cfg.epochs} epochs x {steps_per_epoch}), batch {train_cfg.batch_size}{layout}, device {device}, "
        f"precision {'fp32' if amp_dtype is None else str(amp_dtype).replace('torch.', '')}, run {run_dir}")

    def trainer_state() -> dict:  # every rank calls it: under DDP each rank's RNG state is gathered
        state = {"step": step, "elapsed": elapsed, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                 "batcher": batcher.state_dict(), "torch_rng": torch.get_rng_state()}
        if dd.world_size > 1:
            import torch.distributed as dist

            state["rank_rng"] = [None] * dd.world_size
            dist.all_gather_object(state["rank_rng"], torch.get_rng_state())
        return state

    def evaluate() -> dict:  # every rank calls it: each scores its share of the windows
        r = evaluate_sources(model, corpus.sources, model_cfg.block_size, train_cfg.batch_size,
                             train_cfg.eval_batches, device, autocast, dd.rank, dd.world_size)
        return {"step": step, "epoch": step / steps_per_epoch, "test_loss": r["test_loss"],
                "bits_per_byte": r["bits_per_byte"]}

    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI)
    bar = tqdm(total=total_steps, initial=step, disable=None if (progress and dd.main) else True, dynamic_ncols=True,
               leave=False)
    pending: list[tuple] = []  # (step, loss on device, tokens, lr): no host sync until the next log
    window_t = time.perf_counter()
    last_ckpt = step if resume else None
    padded = data_cfg.batching == "padded"

    def targets(t: torch.Tensor) -> int:  # on the host
        return int((t != IGNORE_INDEX).sum()) if padded else t.numel()

    def flush() -> None:
        """Logs the pending steps. Called before every checkpoint, so a NaN or inf loss stops the run
        before it could be saved over the last good checkpoint."""
        nonlocal elapsed, tokens_seen, window_t
        if not pending:
            return
        losses_t = torch.stack([p[1] for p in pending])
        if dd.world_size > 1:  # each rank holds its share of the global batch's mean loss
            torch.distributed.all_reduce(losses_t)
        losses = losses_t.tolist()
        dt = time.perf_counter() - window_t
        window_tokens = sum(p[2] for p in pending)
        elapsed += dt
        tokens_seen += window_tokens
        tps = window_tokens / dt if dt > 0 else float("nan")
        bad = [(p[0], v) for p, v in zip(pending, losses) if not math.isfinite(v)]
        if bad:
            where = f"{run_dir} (step {last_ckpt})" if last_ckpt is not None else "none yet"
            raise PicoError(f"loss is {bad[0][1]} at step {bad[0][0]}; stopping. Last good checkpoint: {where}")
        if dd.main:
            append_metrics(run_dir, [
                {"step": p[0], "train_loss": v, "lr": p[3], "tokens_per_s": tps, "elapsed": elapsed}
                for p, v in zip(pending, losses)])
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}")
        bar.update(len(pending))
        pending.clear()
        window_t = time.perf_counter()

    net.train()
    halted = False  # a signal reached some rank: every rank stops after the same step
    with _StopFlag() as stop:
        while step < total_steps and not (stop_at_step is not None and step >= stop_at_step):
            halted = _any_rank(stop.signum is not None, dd, device)
            if halted:
                break
            lr = lr_at(step, total_steps, train_cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = batcher.next_batch()  # the global batch, the same rows on every rank
            n_tok = targets(y)
            micro = micro_batches(x, y, dd, accum)
            step_loss = 0.0
            for k, (xm, ym) in enumerate(micro):
                share = targets(ym) / max(1, n_tok)  # of the global batch's targets; all ranks' shares sum to 1
                xm, ym = xm.to(device, non_blocking=True), ym.to(device, non_blocking=True)
                with net.no_sync() if net is not model and k < len(micro) - 1 else nullcontext():
                    with autocast():
                        logits = net(xm)
                    loss = lm_loss(logits, ym) if share > 0 else logits.sum() * 0.0
                    scaler.scale(loss * (share * dd.world_size)).backward()  # x world_size: DDP averages ranks
                step_loss = step_loss + loss.detach() * share
            if train_cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append((step, step_loss, n_tok, lr))
            epoch_end = step % steps_per_epoch == 0
            save_now = (train_cfg.eval_interval and step % train_cfg.eval_interval == 0) or epoch_end \
                or step == total_steps
            if step % train_cfg.log_interval == 0 or save_now:
                flush()
            if save_now:
                rec = evaluate()
                rec["elapsed"] = elapsed
                state = trainer_state()
                if dd.main:
                    append_metrics(run_dir, [rec])
                    bar.write(f"step {step}: test loss {rec['test_loss']:.4f}, {rec['bits_per_byte']:.3f} bits/byte") \
                        if progress else None
                on_main(lambda: ckpt.save_checkpoint(run_dir, model, state), dd)  # a failure stops every rank
                last_ckpt = step
                window_t = time.perf_counter()  # evaluation time does not count as training time
    bar.close()

    if step < total_steps:  # stopped early: flush, checkpoint, tell how to go on
        flush()
        state = trainer_state()
        on_main(lambda: ckpt.save_checkpoint(run_dir, model, state), dd)
        if not halted:
            why = f"stop at step {step}"
        else:
            why = f"signal {signal.Signals(stop.signum).name}" if stop.signum is not None else "signal on another rank"
        say(f"stopped ({why}) at step {step}/{total_steps}; checkpoint saved. "
            f"Resume with: {resume_command(run_dir, dd)}")
        return {"stopped_at": step, "run_dir": run_dir}

    if not dd.main:
        return {"rank": dd.rank, "run_dir": run_dir}
    return finish_run(model, corpus, model_cfg, data_cfg, train_cfg, run_dir, device, n_params, tokens_seen, elapsed, log)


def resume_command(run_dir: str, d: Dist) -> str:
    """The exact command that continues a stopped run."""
    args = f"train --resume {shlex.quote(run_dir)}"
    if d.world_size == 1:
        return f"pico-llm {args}"
    if d.world_size == d.local_world_size:
        return f"torchrun --nproc_per_node {d.world_size} -m picollm {args}"
    return f"torchrun (the same --nnodes/--nproc_per_node/--rdzv flags) -m picollm {args}"


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
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def train_models(names: list[str], models: dict[str, ModelConfig], data_cfg: DataConfig, train_cfg: TrainConfig,
                 output_dir: str, run_name: str, *, overwrite: bool = False, stop_at_step: Optional[int] = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Train each model on identical data, batches and seed. One model: OUTPUT/NAME is the run. Several:
    OUTPUT/NAME/<model> each, plus OUTPUT/NAME/comparison.png and comparison.md."""
    from .plots import loss_curves

    corpus = shared_corpus(data_cfg, join_processes(train_cfg))  # one split and tokenizer, the same batches for all
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


def maybe_compile(model: torch.nn.Module, log: Callable[[str], None] = print) -> torch.nn.Module:
    """torch.compile(model), or the model itself with a message when compilation is unavailable or fails
    (checked by compiling a tiny forward now rather than failing mid-training)."""
    try:
        compiled = torch.compile(model)
        cfg = getattr(model, "cfg", None)
        T = min(8, getattr(cfg, "block_size", 8))
        device = next(model.parameters()).device
        with torch.no_grad():
            compiled(torch.zeros(1, T, dtype=torch.long, device=device))
        return compiled
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
        log(f"note: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}); "
            "running eagerly")
        return model
