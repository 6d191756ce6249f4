"""The one module that knows the run-directory layout.

    RUN/config.json       {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
    RUN/tokenizer.json    the tokenizer (HF tokenizers JSON for bpe; a small descriptor otherwise)
    RUN/model.safetensors weights (safetensors only: no pickle for weights)
    RUN/trainer.pt        optimizer, scheduler, batcher and RNG state, step (tensors and plain values)
    RUN/metrics.jsonl     one JSON object per logged step / evaluation
    RUN/summary.json      final figures
    RUN/loss.png, RUN/samples.md

Every file is written atomically (temporary file, fsync, rename), so a crash never leaves a half
written file in place of a good one.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Any

import torch

from .config import DataConfig, ModelConfig, TrainConfig
from .errors import PicoError

CONFIG, TOKENIZER, WEIGHTS, TRAINER = "config.json", "tokenizer.json", "model.safetensors", "trainer.pt"
METRICS, SUMMARY, SAMPLES, LOSS_PLOT = "metrics.jsonl", "summary.json", "samples.md", "loss.png"


@contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path`; on success fsyncs it and renames it over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a run directory is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


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
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))


def save_config(run_dir: str, model: ModelConfig, data: DataConfig, train: TrainConfig) -> None:
    write_json(os.path.join(run_dir, CONFIG), {"model": model.to_dict(), "data": data.to_dict(), "train": train.to_dict()})


def load_config(run_dir: str) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isdir(run_dir):
        raise PicoError(f"{run_dir}: no such run directory")
    if not os.path.isfile(path):
        raise PicoError(f"{run_dir} is not a run directory (no {CONFIG})")
    try:
        with open(path) as f:
            d = json.load(f)
        return ModelConfig.from_dict(d["model"]), DataConfig.from_dict(d["data"]), TrainConfig.from_dict(d["train"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise PicoError(f"{path}: corrupt config ({type(e).__name__})") from None


def save_weights(run_dir: str, model: torch.nn.Module, step: int) -> None:
    from safetensors.torch import save_model

    with atomic_path(os.path.join(run_dir, WEIGHTS)) as tmp:
        save_model(unwrap(model), tmp, metadata={"step": str(step)})


def load_weights(run_dir: str, model: torch.nn.Module) -> int:
    """Loads RUN/model.safetensors into model (strictly); returns the step it was saved at."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    path = os.path.join(run_dir, WEIGHTS)
    if not os.path.isfile(path):
        raise PicoError(f"{run_dir} is not a run directory (no {WEIGHTS})")
    try:
        with safe_open(path, framework="pt") as f:
            step = int((f.metadata() or {}).get("step", -1))
        missing, unexpected = load_model(unwrap(model), path, strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise PicoError(f"{path}: cannot read weights ({str(e).splitlines()[0][:120]})") from None
    except RuntimeError as e:  # shape mismatch
        raise PicoError(f"{path}: weights do not match config.json ({str(e).splitlines()[0][:120]})") from None
    if missing or unexpected:
        raise PicoError(f"{path}: weights do not match config.json (missing {len(missing)}, unexpected {len(unexpected)})")
    return step


def save_trainer_state(run_dir: str, state: dict) -> None:
    with atomic_path(os.path.join(run_dir, TRAINER)) as tmp:
        torch.save(state, tmp)


def load_trainer_state(run_dir: str) -> dict:
    path = os.path.join(run_dir, TRAINER)
    if not os.path.isfile(path):
        raise PicoError(f"{run_dir}: no {TRAINER} to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise PicoError(f"{path}: cannot read trainer state ({type(e).__name__})") from None


def save_checkpoint(run_dir: str, model: torch.nn.Module, trainer_state: dict) -> None:
    """Weights and trainer state for one step; each file replaced atomically, weights last, both carry
    the step so a resume can tell a matching pair."""
    save_trainer_state(run_dir, trainer_state)
    save_weights(run_dir, model, trainer_state["step"])


def load_run(run_dir: str, device: str = "cpu"):
    """(model, tokenizer, (ModelConfig, DataConfig, TrainConfig)) from a run directory alone."""
    from .data.tokenizers import load_tokenizer
    from .models import build_model

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
            f.write(json.dumps(r) + "\n")


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, SUMMARY)
    if not os.path.isfile(path):
        raise PicoError(f"{run_dir}: no {SUMMARY} (training did not finish)")
    with open(path) as f:
        return json.load(f)
