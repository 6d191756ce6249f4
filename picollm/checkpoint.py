"""The one module that knows the run-directory layout.

    RUN/config.json       {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
    RUN/tokenizer.json    the tokenizer (HF tokenizers JSON for bpe; a small descriptor otherwise)
    RUN/model.safetensors weights (safetensors only: no pickle for weights)
    RUN/trainer.pt        optimizer, scheduler, batcher and RNG state, step (tensors and plain values)
    RUN/metrics.jsonl     one JSON object per logged step / evaluation
    RUN/summary.json      final figures
    RUN/loss.png, RUN/samples.md

Every file is written atomically (temporary file, fsync, rename), so a crash never leaves a half
written file in place of a good one. A checkpoint is two files that must agree (model.safetensors and
trainer.pt, both carrying the step), so it is written as a unit: both files go into
RUN/.checkpoint-STEP.tmp/, which is renamed to RUN/.checkpoint-STEP/ once complete (the commit point),
and only then are the files moved to the top level. Until the commit the previous checkpoint is the
current one; after it the new one is, and readers find each file in the pending directory until it
has been moved (`checkpoint_file`). The next save finishes an interrupted move.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from .config import DataConfig, ModelConfig, TrainConfig
from .data.tokenizers import load_tokenizer
from .errors import PicoError
from .fsio import atomic_path, chmod_as_open, fsync_dir, json_text, write_json, write_text
from .models import build_model

CONFIG, TOKENIZER, WEIGHTS, TRAINER = "config.json", "tokenizer.json", "model.safetensors", "trainer.pt"
METRICS, SUMMARY, SAMPLES, LOSS_PLOT = "metrics.jsonl", "summary.json", "samples.md", "loss.png"
PENDING = ".checkpoint-"  # RUN/.checkpoint-STEP.tmp/ while written, RUN/.checkpoint-STEP/ once complete
# Test hook: at the first save that replaces an earlier checkpoint, touch this path and pause (for up to
# PAUSE_S seconds) with the new checkpoint half written, so a test can kill the process there.
PAUSE_ENV, PAUSE_S = "PICOLLM_TEST_PAUSE_IN_CHECKPOINT", 120.0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile (_orig_mod) and DDP (module) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def is_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(checkpoint_file(path, WEIGHTS))


def runs_under(path: str, loadable: bool = True) -> list[str]:
    """Every run directory at any depth under path (path itself when it is one), sorted. A directory with a
    config.json is a run and is not looked into, nor is a hidden directory. loadable: only the runs with
    weights (is_run); else also those that have not saved a checkpoint yet."""
    out = []
    for root, dirs, _ in os.walk(path):
        if os.path.isfile(os.path.join(root, CONFIG)):
            out.append(root)
            dirs.clear()
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(r for r in out if is_run(r) or not loadable)


def listing(items: list[str], budget: int) -> str:
    """'a, b, and N more': as many items as fit in about `budget` characters."""
    shown = []
    for it in items:
        if shown and sum(len(s) + 2 for s in shown) + len(it) > budget:
            break
        shown.append(it)
    more = len(items) - len(shown)
    return ", ".join(shown) + (f", and {more} more" if more else "")


def not_a_run(path: str) -> PicoError:
    """The error for a command that needs one run given `path`, which is not one: it does not exist, or
    it holds no runs, or it holds several (the message names them)."""
    if not os.path.exists(path):
        return PicoError(f"{path} does not exist")
    runs = runs_under(path) if os.path.isdir(path) else []
    if not runs:
        return PicoError(f"{path} is not a run directory (no {CONFIG}) and holds no runs")
    if len(runs) == 1:
        return PicoError(f"{path} is not a run directory; the run inside it is {runs[0]}")
    head = f"{path} holds {len(runs)} runs, not one: pick one, e.g. {runs[0]}"
    return PicoError(f"{head} (also: {listing(runs[1:], max(240 - len(head), 40))})")


def _pending(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints not yet moved into place: [(step, RUN/.checkpoint-STEP)], oldest first."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    out = []
    for n in names:
        step = n[len(PENDING):]
        if n.startswith(PENDING) and step.isdigit() and os.path.isdir(os.path.join(run_dir, n)):
            out.append((int(step), os.path.join(run_dir, n)))
    return sorted(out)


def checkpoint_file(run_dir: str, name: str) -> str:
    """The path of the current checkpoint's `name` (WEIGHTS or TRAINER): in a complete pending
    checkpoint while it is still there, else at the top level."""
    pending = _pending(run_dir)
    if pending:
        p = os.path.join(pending[-1][1], name)
        if os.path.isfile(p):
            return p
    return os.path.join(run_dir, name)


def prepare_run_dir(run_dir: str, resume: bool, overwrite: bool) -> None:
    """Checks run_dir can hold the run: an existing run when resuming; else empty, missing, or (with
    overwrite) a run directory, which is deleted. Never deletes something that is not a run."""
    if resume:
        if not is_run(run_dir):
            raise PicoError(f"--resume {run_dir}: not a run directory")
        return
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise PicoError(f"{run_dir} is a file, not a directory; choose another --run_name or --output_dir")
    if os.path.exists(run_dir) and os.listdir(run_dir):
        if not overwrite:
            raise PicoError(f"{run_dir} already exists; pass --resume to continue it, --overwrite to replace it, "
                            "or choose another --run_name")
        if not is_run(run_dir):
            raise PicoError(f"--overwrite: {run_dir} is not a run directory; refusing to delete it")
        shutil.rmtree(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:  # a part of the path is a file, no permission
        raise PicoError(f"cannot create the run directory {run_dir}: {e.strerror or type(e).__name__}") from None


def save_config(run_dir: str, model: ModelConfig, data: DataConfig, train: TrainConfig) -> None:
    write_json(os.path.join(run_dir, CONFIG), {"model": model.to_dict(), "data": data.to_dict(), "train": train.to_dict()})


def load_config(run_dir: str) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        raise not_a_run(run_dir)
    try:
        with open(path) as f:
            d = json.load(f)
        return ModelConfig.from_dict(d["model"]), DataConfig.from_dict(d["data"]), TrainConfig.from_dict(d["train"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise PicoError(f"{path}: corrupt config ({type(e).__name__})") from None


def _save_weights_file(model: torch.nn.Module, path: str, step: int) -> None:
    save_model(unwrap(model), path, metadata={"step": str(step)})
    chmod_as_open(path)  # safetensors writes 0600
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_weights(run_dir: str, model: torch.nn.Module, step: int) -> None:
    """model.safetensors alone (a checkpoint is save_checkpoint: weights and trainer state together)."""
    with atomic_path(os.path.join(run_dir, WEIGHTS)) as tmp:
        _save_weights_file(model, tmp, step)


def load_weights(run_dir: str, model: torch.nn.Module) -> int:
    """Loads RUN/model.safetensors into model (strictly); returns the step it was saved at."""
    path = checkpoint_file(run_dir, WEIGHTS)
    if not os.path.isfile(path):
        raise PicoError(f"{run_dir} is not a run directory (no {WEIGHTS})")
    try:
        with safe_open(path, framework="pt") as f:
            step = int((f.metadata() or {}).get("step", -1))
        missing, unexpected = load_model(unwrap(model), path, strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise PicoError(f"{path}: cannot read weights ({str(e).splitlines()[0][:120]})") from None
    except RuntimeError as e:  # shape mismatch: name the first tensor that differs
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln] or str(e).splitlines()[:1]
        raise PicoError(f"{path}: weights do not match config.json ({lines[0][:160]})") from None
    if missing or unexpected:
        raise PicoError(f"{path}: weights do not match config.json (missing {len(missing)}, unexpected {len(unexpected)})")
    return step


TRAINER_KEYS = ("step", "elapsed", "tokens_seen", "optimizer", "batcher", "torch_rng")


def load_trainer_state(run_dir: str) -> dict:
    path = checkpoint_file(run_dir, TRAINER)
    if not os.path.isfile(path):
        raise PicoError(f"{run_dir}: no {TRAINER} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise PicoError(f"{path}: cannot read trainer state ({type(e).__name__})") from None
    missing = [k for k in TRAINER_KEYS if k not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise PicoError(f"{path}: not a pico-llm trainer state (missing {', '.join(missing)})")
    return state


def commit_pending(run_dir: str) -> None:
    """Finishes moving complete pending checkpoints into place (oldest first, so the newest wins) and
    removes half-written ones."""
    for n in os.listdir(run_dir):
        if n.startswith(PENDING) and n.endswith(".tmp"):
            shutil.rmtree(os.path.join(run_dir, n), ignore_errors=True)
    for _, d in _pending(run_dir):
        for name in (TRAINER, WEIGHTS):
            if os.path.isfile(os.path.join(d, name)):
                os.replace(os.path.join(d, name), os.path.join(run_dir, name))
        fsync_dir(run_dir)
        shutil.rmtree(d, ignore_errors=True)


def _test_pause(run_dir: str) -> None:
    flag = os.environ.get(PAUSE_ENV)
    if flag and os.path.isfile(os.path.join(run_dir, WEIGHTS)):
        with open(flag, "w"):
            pass
        deadline = time.monotonic() + PAUSE_S
        while time.monotonic() < deadline:
            time.sleep(0.05)


def save_checkpoint(run_dir: str, model: torch.nn.Module, trainer_state: dict) -> None:
    """Weights and trainer state for one step, written as a unit (see the module docstring): a crash at
    any point leaves either the previous checkpoint or the new one, complete and matching."""
    step = trainer_state["step"]
    tmp, done = os.path.join(run_dir, f"{PENDING}{step}.tmp"), os.path.join(run_dir, f"{PENDING}{step}")
    try:
        commit_pending(run_dir)
        os.makedirs(tmp)
        with open(os.path.join(tmp, TRAINER), "wb") as f:
            torch.save(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
        _test_pause(run_dir)
        _save_weights_file(model, os.path.join(tmp, WEIGHTS), step)
        fsync_dir(tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, a lost mount: the previous one stays
        shutil.rmtree(tmp, ignore_errors=True)
        why = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else "")
        raise PicoError(f"{run_dir}: cannot write the step-{step} checkpoint ({type(e).__name__}: {why[:100]}); "
                        "the previous checkpoint is kept") from None
    os.rename(tmp, done)  # the commit point
    fsync_dir(run_dir)
    commit_pending(run_dir)


def load_run(run_dir: str, device: str = "cpu"):
    """(model, tokenizer, (ModelConfig, DataConfig, TrainConfig)) from a run directory alone."""
    mcfg, dcfg, tcfg = load_config(run_dir)
    tokenizer = load_tokenizer(run_dir)
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise PicoError(f"{run_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model expects {mcfg.vocab_size}")
    model = build_model(mcfg)
    load_weights(run_dir, model)
    model.to(device).eval()
    return model, tokenizer, (mcfg, dcfg, tcfg)


def append_metrics(run_dir: str, records: list[dict]) -> None:
    with open(os.path.join(run_dir, METRICS), "a") as f:
        for r in records:
            f.write(json_text(r) + "\n")


def write_metrics(run_dir: str, records: list[dict]) -> None:
    """Replaces metrics.jsonl (atomically) with these records."""
    write_text(os.path.join(run_dir, METRICS), "".join(json_text(r) + "\n" for r in records))


def read_metrics(run_dir: str) -> list[dict]:
    """The records of metrics.jsonl; a cut-off last line (a crash mid-append) is left out."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise PicoError(f"{path}: line {i + 1} is not JSON") from None
    return out


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, SUMMARY)
    if not os.path.isfile(path):
        raise PicoError(f"{run_dir}: no {SUMMARY} (training did not finish)")
    with open(path) as f:
        return json.load(f)
