"""torchrun / DistributedDataParallel plumbing: this process's place in the launch, the process group,
rank-0-only work that fails on every rank together, and each rank's share of the global batch.

`batch_size` is the global batch: every rank draws it from the same seeded generator and trains on its
own batch_size / (world_size * grad_accum_steps)-row micro-batches, so any number of processes and
accumulation steps sees exactly the rows of one process (only float summation order differs)."""

from __future__ import annotations

import gc
import inspect
import os
import shlex
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..config import DataConfig, TrainConfig
from ..data.corpus import Corpus, build_corpus
from ..data.tokenizers import Tokenizer, tokenizer_from_json
from ..errors import PicoError


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

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


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
    one GPU per local rank when CUDA is asked for (or auto-detected) and present, gloo on the CPU."""
    d = dist_from_env()
    if d.world_size == 1 or dist.is_initialized():
        return d
    kind = device_id.strip().lower().split(":")[0]
    if kind == "mps":
        raise PicoError("DDP runs on cuda (nccl) or cpu (gloo), not on mps")
    cuda = kind in ("cuda", "auto") and torch.cuda.is_available()
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


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers first: a reducer outliving its process group can abort the exit
        dist.destroy_process_group()


def broadcast_object(obj, d: Dist):
    """Rank 0's obj, on every rank."""
    if d.world_size == 1:
        return obj
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


def any_rank(flag: bool, d: Dist, device: str) -> bool:
    """True on every rank when flag is true on some rank."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t)
    return t


def gather_rng_states(d: Dist) -> list | None:
    """Every rank's torch RNG state, on every rank (None in a single process)."""
    if d.world_size == 1:
        return None
    states = [None] * d.world_size
    dist.all_gather_object(states, torch.get_rng_state())
    return states


def wrap_ddp(model: torch.nn.Module, d: Dist, device: str) -> torch.nn.Module:
    """DistributedDataParallel around model; no buffer sync per forward (the only buffers are constant
    tables: RoPE, sinusoidal positions)."""
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[d.local_rank] if device.startswith("cuda") else None,
                                   **{no_sync: False})


def micro_batches(x: torch.Tensor, y: torch.Tensor, d: Dist, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the global batch (rows rank*B/W .. (rank+1)*B/W - 1), cut into `accum`
    micro-batches in order. Every rank draws the same global batch, so W ranks x K micro-batches see
    exactly the rows a single process sees."""
    per_rank = x.size(0) // d.world_size
    m, lo = per_rank // accum, d.rank * per_rank
    return [(x[lo + k * m: lo + (k + 1) * m], y[lo + k * m: lo + (k + 1) * m]) for k in range(accum)]


def shared_corpus(data_cfg: DataConfig, d: Dist, tokenizer: Optional[Tokenizer] = None,
                  progress: bool = True) -> Corpus:
    """build_corpus on every rank, prepared once: rank 0 prepares the data (training the tokenizer, or with
    `tokenizer`, a run's own) while the others wait; then they open the same prepared arrays with a copy
    of its tokenizer, so every rank holds the same tokens and draws the same global batches. (A rank that
    does not see rank 0's cache directory prepares the same arrays itself.)"""
    if d.world_size == 1:
        return build_corpus(data_cfg, tokenizer=tokenizer, progress=progress)
    built: list[Corpus] = []
    on_main(lambda: built.append(build_corpus(data_cfg, tokenizer=tokenizer, progress=progress)), d)
    tok_json = broadcast_object(built[0].tokenizer.to_json() if d.main else None, d)
    if d.main:
        return built[0]
    return build_corpus(data_cfg, tokenizer=tokenizer_from_json(tok_json, "rank 0's tokenizer"), progress=False)


def resume_command(run_dir: str, d: Dist) -> str:
    """The exact command that continues a stopped run."""
    args = f"train --resume {shlex.quote(run_dir)}"
    if d.world_size == 1:
        return f"pico-llm {args}"
    if d.world_size == d.local_world_size:
        return f"torchrun --nproc_per_node {d.world_size} -m picollm {args}"
    return f"torchrun (the same --nnodes/--nproc_per_node/--rdzv flags) -m picollm {args}"
