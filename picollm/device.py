"""Where and in what precision things run: the device choice, the autocast dtype, and what the CPU
can do (one reader of /proc/cpuinfo, shared by training, the fused decode step and bench)."""

from __future__ import annotations

import functools
import os
import platform
import sys
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from .errors import PicoError

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N | mps"


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags() -> str:
    """The first processor's feature flags line ('flags' on x86, 'Features' on ARM); '' if unknown."""
    return next((line for line in _cpuinfo().splitlines() if line.startswith(("flags", "Features"))), "")


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run faster than float32 ones."""
    flags = cpu_flags().split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_runs_bf16_rnn() -> bool:
    """oneDNN's bf16 LSTM kernels need AVX-512; on other CPUs an LSTM under bf16 autocast runs in fp32."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {cpu_name()} ({os.cpu_count()} cores)"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device_id: str, log: Callable[[str], None] | None = None) -> str:
    """'auto' (CUDA, else MPS, else the CPU), 'cuda', 'cuda:1', 'mps' or 'cpu'; a device
    that is not there falls back to the CPU with a message."""
    note = log or (lambda s: print(s, file=sys.stderr))
    d = device_id.strip().lower()
    if d == "auto":  # the caller says which it got (train's header line: "device cpu (auto)")
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        if torch.cuda.is_available():
            return d
        note(f"note: {device_id} requested but CUDA is not available; using cpu")
        return "cpu"
    if d == "mps":
        if _mps_available():
            return "mps"
        note("note: mps requested but not available; using cpu")
        return "cpu"
    if d != "cpu":
        raise PicoError(f"unknown --device_id {device_id!r}; use {DEVICE_CHOICES}")
    return "cpu"


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
    if precision not in ("bf16", "fp16"):
        raise PicoError(f"unknown precision {precision!r}; choose one of: auto, fp32, bf16, fp16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast_factory(device: str, dtype: Optional[torch.dtype]) -> Callable:
    """A no-argument context-manager factory: autocast to dtype on device, or nothing for fp32."""
    if dtype is None:
        return nullcontext
    return functools.partial(torch.autocast, device_type=device.split(":")[0], dtype=dtype)


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """'fp32' (None: no autocast), 'bf16' or 'fp16'."""
    return "fp32" if dtype in (None, torch.float32) else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def enable_transparent_huge_pages() -> None:
    """Large CPU tensors on transparent huge pages, for the command line's process only (a library
    import leaves its host's environment alone). A fresh gradient of hundreds of MB otherwise page-faults
    4 KB at a time: the one-hot k-gram's first layer (V=50257, k=3, C=1024) spent ~2/3 of its training step
    there. Set THP_MEM_ALLOC_ENABLE=0 to opt out.

    PyTorch reads the variable once, at its first CPU allocation of any size (a small tensor counts too),
    so this must run before the process makes any tensor: importing picollm and its command line makes
    none (tests/test_defects.py checks that a large tensor allocated after `main` is on huge pages)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
