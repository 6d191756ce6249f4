"""The Transformer's decode step on a CPU as one C call (fused_decode.c), for sampling.

At batch 1 a PyTorch decode step is ~80 small ops dispatched from Python, and on a CPU that dispatch
costs more than the arithmetic. FusedDecoder runs the same math in one C function (llama2.c's approach)
on the model's own weights, and offers the models' stepping interface, so generate() drives it like any
model:

    dec = FusedDecoder(model)                 # a Transformer on the CPU, float32 or bfloat16 weights
    state = dec.new_state(batch_size)
    logits, state = dec.step(idx, state)      # logits (B, 1, V) of the last fed position only

The C source is compiled with the system C compiler (`$CC`, else `cc`; -O3 -march=native -fopenmp, fewer
flags where those fail) at first use, into $PICOLLM_CACHE_DIR/kernels (keyed by source, compiler, flags
and CPU), and loaded with ctypes. Its OpenMP threads come from the libgomp torch has already loaded, so
torch.set_num_threads governs both.
`fused_unavailable(model)` says why it cannot serve a model (no compiler, not a CPU Transformer, ...);
generate() then uses the PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..device import cpu_flags
from ..fsio import cache_dir
from .transformer import Transformer

_SOURCE = Path(__file__).with_name("fused_decode.c")
_FLAGS = [["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"]]  # the second where the compiler lacks -march=native


class _Cfg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("n_layer", "n_head", "n_embd", "head_size", "hidden", "vocab",
                                                     "block_size", "layernorm", "pre_norm", "swiglu", "pos_kind", "bf16")]
    _fields_ += [("eps", ctypes.c_float)]
    _fields_ += [(name, ctypes.c_int32) for name in ("n_kv_head", "window", "window_alternate", "relu2")]
    _fields_ += [("softcap", ctypes.c_float)]


# pico_forward's return codes (the PICO_* enum of fused_decode.c)
PICO_OK, PICO_BAD_TOKEN, PICO_BAD_POSITION, PICO_NO_TOKENS, PICO_MISSING_WEIGHT = range(5)

_lib: Optional[ctypes.CDLL] = None
_lib_error: Optional[str] = None


def _compile(out: Path) -> Optional[str]:
    """Build the shared library at out; None on success, else the compiler's complaint (one line)."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return f"no C compiler ({cc!r} not found; set CC)"
    out.parent.mkdir(parents=True, exist_ok=True)
    err = ""
    for flags in _FLAGS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, *flags, "-std=gnu99", "-shared", "-fPIC", "-o", tmp, str(_SOURCE), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same file
            return None
        os.unlink(tmp)
        err = (r.stderr.strip().splitlines() or [f"{cc} exited with {r.returncode}"])[-1]
    return f"compiling {_SOURCE.name} failed: {err}"


def _load() -> ctypes.CDLL:

    cc = os.environ.get("CC") or "cc"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        version = ""
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), cc, version, repr(_FLAGS), platform.machine(),
                                    cpu_flags()]).encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"fused_decode-{key}.so"
    if not path.exists():
        error = _compile(path)
        if error is not None:
            raise RuntimeError(error)
    lib = ctypes.CDLL(str(path))
    lib.pico_forward.restype = ctypes.c_int
    lib.pico_forward.argtypes = [ctypes.POINTER(_Cfg), ctypes.POINTER(ctypes.c_void_p)] + [ctypes.c_void_p] * 4 + \
        [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.pico_scratch_floats.restype = ctypes.c_int64
    lib.pico_scratch_floats.argtypes = [ctypes.POINTER(_Cfg), ctypes.c_int]
    return lib


def _library() -> ctypes.CDLL:
    """The compiled fused_decode.c, built once per source/compiler/CPU and cached on disk; the first
    failure (no compiler, unwritable cache, ...) is remembered for the rest of the process."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        try:
            _lib = _load()
        except (RuntimeError, OSError) as e:
            _lib_error = str(e)
    if _lib is None:
        raise RuntimeError(_lib_error)
    return _lib


def fused_unavailable(model) -> Optional[str]:
    """None when FusedDecoder can serve this model, else why not (one line)."""
    if not isinstance(model, Transformer):
        return f"the fused decoder serves the Transformer only, not {type(model).__name__}"
    w = model.blocks[0].attn.qkv.weight
    if w.device.type != "cpu":
        return f"the fused decoder runs on the CPU; the model is on {w.device.type}"
    if w.dtype not in (torch.float32, torch.bfloat16):
        return f"the fused decoder reads float32 or bfloat16 weights, not {w.dtype}"
    if model.cfg.n_experts:
        return "the fused decoder does not serve a mixture of experts (--n_experts); PyTorch decodes it"
    if model.cfg.mlp not in ("gelu", "swiglu", "relu2"):
        return f"the fused decoder does not compute mlp={model.cfg.mlp}; PyTorch decodes it"
    try:
        _library()
    except RuntimeError as e:
        return str(e)
    return None


@dataclass
class FusedState:
    """KV caches (L, B, n_kv_heads, block_size, hs) in float32, the C code's scratch, and the logits buffer."""

    k: torch.Tensor
    v: torch.Tensor
    scratch: torch.Tensor
    logits: torch.Tensor  # (B, 1, V), overwritten by every step
    pos: int = 0

    def __post_init__(self):  # the C step's (k, v, scratch) pointers, taken once instead of every step
        self.buffers = (self.k.data_ptr(), self.v.data_ptr(), self.scratch.data_ptr())


class FusedDecoder:
    """Stepwise decoding of a Transformer through fused_decode.c (see the module docstring)."""

    def __init__(self, model):
        reason = fused_unavailable(model)
        if reason is not None:
            raise RuntimeError(reason)
        self.lib = _library()
        c = model.cfg
        self.cfg = c
        self.max_context = c.block_size
        mlp = model.blocks[0].mlp
        mat_dtype = model.blocks[0].attn.qkv.weight.dtype
        self.ccfg = _Cfg(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, head_size=c.head_size,
                         hidden=mlp.proj.weight.size(1), vocab=c.vocab_size, block_size=c.block_size,
                         layernorm=int(c.norm == "layernorm"), pre_norm=int(c.norm_placement == "pre"),
                         swiglu=int(c.mlp == "swiglu"), pos_kind={"learned": 1, "sinusoidal": 1, "rope": 2}.get(c.pos_emb, 0),
                         bf16=int(mat_dtype == torch.bfloat16), eps=c.norm_eps, n_kv_head=c.n_kv_heads,
                         window=c.sliding_window, window_alternate=int(c.window_pattern == "alternate"),
                         relu2=int(c.mlp == "relu2"), softcap=c.logit_softcap)
        self._ccfg_ref = ctypes.byref(self.ccfg)  # made once: it is an argument of every step
        self._keep: list[torch.Tensor] = []  # every tensor a pointer refers to

        def mat(t):  # a matmul weight, read in place in its own dtype
            return self._ptr(t.detach().to(mat_dtype).contiguous())

        def small(t):  # norm weights, biases, position tables: float32 copies
            return None if t is None else self._ptr(t.detach().float().contiguous())

        def norm(m):  # (weight, bias); neither for the Identity that stands in for a post-norm's final norm
            return (small(m.weight), small(getattr(m, "bias", None))) if hasattr(m, "weight") else (None, None)

        pos = model.wpe.weight if model.wpe is not None else getattr(model, "pos_table", None)
        ptrs = [mat(model.wte.weight), small(pos), small(getattr(model, "rope_cos", None)),
                small(getattr(model, "rope_sin", None)), *norm(model.ln_f), mat(model.head.weight)]
        for blk in model.blocks:
            a, m = blk.attn, blk.mlp
            ptrs += [*norm(blk.ln_1), mat(a.qkv.weight), small(a.qkv.bias), mat(a.proj.weight), small(a.proj.bias),
                     *norm(blk.ln_2), mat(m.fc.weight), small(m.fc.bias), mat(m.proj.weight), small(m.proj.bias),
                     small(a.q_norm.weight if a.q_norm is not None else None),
                     small(a.k_norm.weight if a.k_norm is not None else None), small(a.sinks)]
        self.weights = (ctypes.c_void_p * len(ptrs))(*ptrs)

    def _ptr(self, t: torch.Tensor) -> int:
        self._keep.append(t)
        return t.data_ptr()

    def new_state(self, batch_size: int, device=None) -> FusedState:
        c = self.cfg
        shape = (c.n_layer, batch_size, c.n_kv_heads, c.block_size, c.head_size)
        n_scratch = self.lib.pico_scratch_floats(self._ccfg_ref, batch_size)
        return FusedState(torch.zeros(shape), torch.zeros(shape), torch.zeros(n_scratch),
                          torch.empty(batch_size, 1, c.vocab_size))

    def step(self, idx: torch.Tensor, state: FusedState):
        """Feed idx (B, t) after the state.pos tokens already cached; returns (logits (B, 1, V) of the
        last position, state). The logits tensor is the state's buffer: the next step overwrites it."""
        B, t = idx.shape
        if state.pos + t > self.cfg.block_size:
            raise ValueError(f"KV cache full: {state.pos} cached + {t} new tokens > block_size "
                             f"{self.cfg.block_size}; start a new state with the last tokens")
        if B != state.k.size(1):
            raise ValueError(f"batch size {B} does not match the state's {state.k.size(1)}")
        idx = idx.to(torch.int64).contiguous()
        rc = self.lib.pico_forward(self._ccfg_ref, self.weights, *state.buffers, idx.data_ptr(), B, t, state.pos,
                                   state.logits.data_ptr())
        if rc != PICO_OK:
            raise self._error(rc, idx, state.pos)
        state.pos += t
        return state.logits, state

    def _error(self, rc: int, idx: torch.Tensor, pos: int) -> Exception:
        """The exception for a non-zero return code of pico_forward (nothing was written)."""
        V, T = self.cfg.vocab_size, self.cfg.block_size
        if rc == PICO_BAD_TOKEN:
            bad = ((idx < 0) | (idx >= V)).nonzero()[0].tolist()
            return IndexError(f"token ids must be in [0, {V}), got {idx[tuple(bad)].item()} at row {bad[0]}, "
                              f"position {bad[1]}")
        if rc == PICO_BAD_POSITION:
            return ValueError(f"positions {pos}..{pos + idx.size(1) - 1} are outside the KV cache [0, {T})")
        if rc == PICO_NO_TOKENS:
            return ValueError(f"nothing to feed: idx has shape {tuple(idx.shape)}; a step takes at least one token "
                              "per row")
        if rc == PICO_MISSING_WEIGHT:
            return RuntimeError("a weight the fused step reads is missing (a NULL pointer): the decoder was built "
                                "from an incomplete model")
        return RuntimeError(f"pico_forward failed with unknown code {rc}")
