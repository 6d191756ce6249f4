"""The Transformer's decode loop on a CPU in C (fused_decode.c): the step, the sampler and the loop.

At batch 1 a PyTorch decode step is ~80 small ops dispatched from Python, and top-p sampling ~15 more; on a
CPU that dispatch costs more than the arithmetic. FusedDecoder runs the same math in one C function
(llama2.c's approach) on the model's weights (float32 in place, bf16 packed into the C code's tiles, or
int8 copies), and offers the models' stepping interface, so generate() can drive it like any model:

    dec = FusedDecoder(model)                 # a Transformer on the CPU; FusedDecoder(model, "int8")
    state = dec.new_state(batch_size)
    logits, state = dec.step(idx, state)      # logits (B, 1, V) of the last fed position only

FusedRows runs the whole loop in C instead (pico_generate): rows in KV-cache slots, each at its own
position with its own sampling settings, stop id and budget; each call samples and feeds up to n positions
of every live row. generate() and the server's engine (picollm/serve/engine.py) decode through it.

The C source is compiled with the system C compiler (`$CC`, else `cc`; -O3 -march=native -fopenmp, fewer
flags where those fail) at first use, into $PICOLLM_CACHE_DIR/kernels (keyed by source, compiler, flags
and CPU), and loaded with ctypes. Its OpenMP threads come from the libgomp torch has already loaded, so
torch.set_num_threads governs both.
`fused_unavailable(model)` says why it cannot serve a model (no compiler, not a CPU Transformer, ...);
generate() then uses the PyTorch path.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
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
                                                     "block_size", "layernorm", "pre_norm", "swiglu", "pos_kind", "wtype")]
    _fields_ += [("eps", ctypes.c_float)]
    _fields_ += [(name, ctypes.c_int32) for name in ("n_kv_head", "window", "window_alternate", "relu2")]
    _fields_ += [("softcap", ctypes.c_float), ("kv_bf16", ctypes.c_int32)]


class _Sampling(ctypes.Structure):  # PicoSampling: how one row samples
    _fields_ = [("temperature", ctypes.c_float), ("top_p", ctypes.c_float), ("top_k", ctypes.c_int32),
                ("greedy", ctypes.c_int32)]


# the return codes of fused_decode.c (its PICO_* enum)
PICO_OK, PICO_BAD_TOKEN, PICO_BAD_POSITION, PICO_NO_TOKENS, PICO_MISSING_WEIGHT, PICO_BAD_HISTORY = range(6)
WEIGHTS = ("model", "fp32", "bf16", "int8")  # what the matmuls read: the model's own dtype, or a copy in this one
_WTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
QGROUP = 32  # int8 weights: one scale per this many consecutive inputs of a row (llama.cpp's Q8_0 block)
PREFILL_ROWS = 64  # a state's scratch holds this many (row, position) pairs at least: a prompt goes through the
# layers in chunks of that many positions, each reading the weights once

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
    vp, i32 = ctypes.c_void_p, ctypes.c_int
    lib.pico_forward.restype = ctypes.c_int
    lib.pico_forward.argtypes = [ctypes.POINTER(_Cfg), vp, vp, vp, vp, vp, vp, i32, i32, vp, vp, i32, vp, i32]
    lib.pico_generate.restype = ctypes.c_int
    lib.pico_generate.argtypes = [ctypes.POINTER(_Cfg), vp, vp, vp, vp, vp, i32, i32, vp, vp, vp, vp, i32, vp, vp, i32,
                                  vp, vp, vp, vp, vp, vp, vp, i32]
    lib.pico_sample_rows.restype = None
    lib.pico_sample_rows.argtypes = [vp, i32, i32, vp, vp, vp, vp]
    lib.pico_release_threads.restype = None
    lib.pico_pack_bf16.restype = None
    lib.pico_pack_bf16.argtypes = [vp, i32, i32, vp]
    lib.pico_pack_int8.restype = None
    lib.pico_pack_int8.argtypes = [vp, vp, i32, i32, vp, vp]
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


def release_threads() -> None:
    """Frees the calling thread's OpenMP workers (fused_decode.c's pico_release_threads says why): call it in
    the thread that loaded the model before another thread decodes. Nothing where the step cannot be built."""
    try:
        _library().pico_release_threads()
    except RuntimeError:
        pass


def fused_unavailable(model, weights: str = "model") -> Optional[str]:
    """None when FusedDecoder can serve this model with these weights, else why not (one line)."""
    if weights not in WEIGHTS:
        return f"weights must be one of {WEIGHTS}, got {weights!r}"
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


_decoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_decoder(model) -> "FusedDecoder":
    """FusedDecoder(model), made once per model and kept while no parameter or buffer changes (each tensor's
    storage and in-place version are its key: a training step or a dtype cast makes a new one). Repeated
    generate calls then reuse its weight copies and its KV caches."""
    key = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    hit = _decoders.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    dec = FusedDecoder(model)
    _decoders[model] = (key, dec)
    return dec


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, cols) weight -> (int8 values (rows, cols), float32 scales (rows, ceil(cols / QGROUP))): each
    group of QGROUP consecutive inputs of a row (the last one partial where cols is not a multiple) shares
    the scale max|w| / 127 and rounds to the nearest step, as llama.cpp's Q8_0 (whose scales are float16)."""
    rows, cols = w.shape
    pad = -cols % QGROUP
    g = torch.nn.functional.pad(w.detach().float(), (0, pad)).reshape(rows, -1, QGROUP)
    scale = g.abs().amax(dim=-1) / 127.0
    q = torch.round(g / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None])
    return q.to(torch.int8).reshape(rows, -1)[:, :cols].contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    g = torch.nn.functional.pad(q.float(), (0, -cols % QGROUP)).reshape(rows, -1, QGROUP) * scale[..., None]
    return g.reshape(rows, -1)[:, :cols]


def quantize_acts_int8(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) -> its int8 round trip by groups of QGROUP along the last dimension, as the fused step
    quantizes a matmul's input with int8 weights (fused_decode.c's quantize_row, llama.cpp's Q8_0 dot
    product): d = max|x| / 127 per group, q = round(x * (1 / d)), half to even."""
    n = x.shape[-1]
    g = torch.nn.functional.pad(x.float(), (0, -n % QGROUP)).reshape(*x.shape[:-1], -1, QGROUP)
    d = g.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(g * inv) * d).reshape(*x.shape[:-1], -1)[..., :n]


def int8_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of a Transformer as --weights int8 computes it: its matmul weights hold their int8
    round trip, every matmul's input is quantized as the fused step quantizes it (quantize_acts_int8) and
    K and V are rounded to bf16 as its KV cache holds them (by hooks). PyTorch's view of the int8 step, for
    measuring its test loss."""
    out = copy.deepcopy(model).float()
    with torch.no_grad():
        for m in _matmul_weights(out):
            m.copy_(dequantize_int8(*quantize_int8(m)))
    return _rounded_as_the_step(out, quantize_acts_int8)


def bf16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of a bf16 Transformer as the fused step computes it with bf16 weights: every matmul's
    input rounded to bf16 (what vdpbf16ps multiplies) and K and V rounded to bf16 as its KV cache holds them
    (by hooks). PyTorch's view of the bf16 step."""
    out = Transformer(model.cfg).eval()
    out.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for name, buf in model.named_buffers():  # RoPE and sinusoidal tables (not in the state dict) as the bf16 model holds them
        out.get_buffer(name).copy_(buf.float())
    return _rounded_as_the_step(out, lambda x: x.bfloat16().float())


def _rounded_as_the_step(model: torch.nn.Module, round_input) -> torch.nn.Module:
    """Hooks on a float32 Transformer: every matmul's input through round_input, K and V rounded to bf16 (the
    KV cache of the bf16 and int8 steps)."""
    for lin in _matmul_linears(model):
        lin.register_forward_pre_hook(lambda _mod, args: (round_input(args[0]), *args[1:]))
    for blk in model.blocks:
        for hook in (blk.attn.hook_k, blk.attn.hook_v):
            hook.register_forward_hook(lambda _mod, _args, kv: kv.bfloat16().float())
    return model


def _matmul_linears(model) -> list[torch.nn.Linear]:
    """The Linears the fused step reads as matmuls: the head, each block's q/k/v, projection and MLP."""
    return [model.head] + [m for blk in model.blocks for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc, blk.mlp.proj)]


def _matmul_weights(model) -> list[torch.Tensor]:
    """The weights the fused step reads as matmul weights: the embedding (its rows) and _matmul_linears'."""
    return [model.wte.weight] + [m.weight for m in _matmul_linears(model) if m.weight is not model.wte.weight]


@dataclass
class FusedState:
    """KV caches (L, slots, n_kv_heads, block_size, hs) in the decoder's kv_dtype (uninitialized: a position
    is read only after it is written), the C code's scratch (for `rows` (row, position) pairs at a time), and the
    logits buffer, a row per slot."""

    k: torch.Tensor
    v: torch.Tensor
    scratch: torch.Tensor
    logits: torch.Tensor  # (slots, 1, V), overwritten by every step
    rows: int
    pos: int = 0  # step()'s position: every row at the same one

    def __post_init__(self):  # the C step's (k, v, scratch) pointers, taken once instead of every step
        self.buffers = (self.k.data_ptr(), self.v.data_ptr(), self.scratch.data_ptr())
        self.slots = self.k.size(1)


class FusedDecoder:
    """Stepwise decoding of a Transformer through fused_decode.c (see the module docstring).

    weights: what the matmuls read: "model" (the model's own dtype: float32 read in place, bfloat16 packed
    into the C code's tiles), or a copy in "fp32", "bf16" or "int8" (Q8_0-like: a float32 scale per 32
    inputs of a row; each matmul's input quantized by groups of 32 too, for int8 dot products)."""

    def __init__(self, model, weights: str = "model"):
        reason = fused_unavailable(model, weights)
        if reason is not None:
            raise RuntimeError(reason)
        self.lib = _library()
        c = model.cfg
        self.cfg = c
        self.max_context = c.block_size
        mlp = model.blocks[0].mlp
        mat_dtype = {"model": model.blocks[0].attn.qkv.weight.dtype, "fp32": torch.float32, "bf16": torch.bfloat16,
                     "int8": torch.int8}[weights]
        self.ccfg = _Cfg(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, head_size=c.head_size,
                         hidden=mlp.proj.weight.size(1), vocab=c.vocab_size, block_size=c.block_size,
                         layernorm=int(c.norm == "layernorm"), pre_norm=int(c.norm_placement == "pre"),
                         swiglu=int(c.mlp == "swiglu"), pos_kind={"learned": 1, "sinusoidal": 1, "rope": 2}.get(c.pos_emb, 0),
                         wtype=_WTYPE[mat_dtype], eps=c.norm_eps, n_kv_head=c.n_kv_heads,
                         window=c.sliding_window, window_alternate=int(c.window_pattern == "alternate"),
                         relu2=int(c.mlp == "relu2"), softcap=c.logit_softcap,
                         kv_bf16=int(mat_dtype in (torch.bfloat16, torch.int8)))
        # the KV cache: bf16 beside bf16 or int8 weights (as PyTorch's bf16 model keeps it, and llama.cpp's f16
        # cache): a batch's attention reads as many bytes of it as of the weights at T4 size
        self.kv_dtype = torch.bfloat16 if self.ccfg.kv_bf16 else torch.float32
        self._ccfg_ref = ctypes.byref(self.ccfg)  # made once: it is an argument of every step
        self._keep: list[torch.Tensor] = []  # every tensor a pointer refers to
        scales: list[Optional[int]] = []  # int8: each matmul weight's scales, at the same index as the weight

        def mat(t, lookup=False):  # a matmul weight in mat_dtype (float32: read in place where it is already);
            # the embedding is read by rows (lookup), not as a matmul: row-major, not packed
            if mat_dtype == torch.int8:
                q, sc = quantize_int8(t)
                if not lookup:
                    q, sc = self._pack_int8(q, sc)
                scales.append(self._ptr(sc))
                return self._ptr(q)
            scales.append(None)
            w = t.detach().to(mat_dtype).contiguous()
            if mat_dtype != torch.bfloat16 or lookup:
                return self._ptr(w)
            return self._ptr(self._pack_bf16(w))

        def small(t):  # norm weights, biases, position tables: float32 copies
            scales.append(None)
            return None if t is None else self._ptr(t.detach().float().contiguous())

        def norm(m):  # (weight, bias); neither for the Identity that stands in for a post-norm's final norm
            return (small(m.weight), small(getattr(m, "bias", None))) if hasattr(m, "weight") else (small(None), small(None))

        pos = model.wpe.weight if model.wpe is not None else getattr(model, "pos_table", None)
        ptrs = [mat(model.wte.weight, lookup=True), small(pos), small(getattr(model, "rope_cos", None)),
                small(getattr(model, "rope_sin", None)), *norm(model.ln_f), mat(model.head.weight)]
        for blk in model.blocks:
            a, m = blk.attn, blk.mlp
            ptrs += [*norm(blk.ln_1), mat(a.qkv.weight), small(a.qkv.bias), mat(a.proj.weight), small(a.proj.bias),
                     *norm(blk.ln_2), mat(m.fc.weight), small(m.fc.bias), mat(m.proj.weight), small(m.proj.bias),
                     small(a.q_norm.weight if a.q_norm is not None else None),
                     small(a.k_norm.weight if a.k_norm is not None else None), small(a.sinks)]
        assert len(scales) == len(ptrs)
        self.weights = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.scales = (ctypes.c_void_p * len(ptrs))(*scales)
        self._spare: dict[int, FusedState] = {}  # a state per slot count, lent out and given back (borrow_state)
        self._lock = threading.Lock()

    def _pack_bf16(self, w: torch.Tensor) -> torch.Tensor:
        """w (n_out, n_in) bf16 in fused_decode.c's tiles (pico_pack_bf16: 32 rows' input pairs side by side)."""
        n_out, n_in = w.shape
        packed = torch.empty(-(-n_out // 32) * 32 * ((n_in + 1) // 2) * 2, dtype=torch.bfloat16)
        self.lib.pico_pack_bf16(w.data_ptr(), n_out, n_in, packed.data_ptr())
        return packed

    def _pack_int8(self, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 values (n_out, n_in) and their scales in fused_decode.c's tiles (pico_pack_int8: 16 rows' groups
        of 4 inputs side by side, stored as q + 128, each tile's scales after it)."""
        n_out, n_in = q.shape
        tiles, groups = -(-n_out // 16), -(-n_in // QGROUP)
        packed = torch.empty(tiles * groups * QGROUP * 16, dtype=torch.uint8)
        packed_scales = torch.empty(tiles * groups * 16)
        self.lib.pico_pack_int8(q.data_ptr(), scale.data_ptr(), n_out, n_in, packed.data_ptr(), packed_scales.data_ptr())
        return packed, packed_scales

    def _ptr(self, t: torch.Tensor) -> int:
        self._keep.append(t)
        return t.data_ptr()

    def new_state(self, batch_size: int, device=None, touch: bool = False) -> FusedState:
        """A state of batch_size slots (KV caches, scratch for a step of batch_size rows, logits). touch: write
        the KV caches now (a long-lived state, a server's: their pages are not faulted in while serving,
        which with transparent huge pages can stall a request for a quarter second a slot)."""
        c = self.cfg
        shape = (c.n_layer, batch_size, c.n_kv_heads, c.block_size, c.head_size)
        rows = max(batch_size, PREFILL_ROWS)
        n_scratch = self.lib.pico_scratch_floats(self._ccfg_ref, rows)
        alloc = torch.zeros if touch else torch.empty
        return FusedState(alloc(shape, dtype=self.kv_dtype), alloc(shape, dtype=self.kv_dtype), torch.zeros(n_scratch),
                          torch.empty(batch_size, 1, c.vocab_size), rows)

    def borrow_state(self, slots: int) -> FusedState:
        """A state of `slots` slots for one user at a time: the one given back last, else a new one. A large
        model's KV caches are tens of MB: allocating them for every generate call costs page faults (and,
        with transparent huge pages, compaction stalls) each time."""
        with self._lock:
            st = self._spare.pop(slots, None)
        return st if st is not None else self.new_state(slots)

    def give_back_state(self, st: FusedState) -> None:
        st.pos = 0
        with self._lock:
            self._spare[st.slots] = st

    def step(self, idx: torch.Tensor, state: FusedState):
        """Feed idx (B, t) after the state.pos tokens already cached (in slots 0..B-1); returns (logits
        (B, 1, V) of the last position, state). The logits tensor is the state's buffer: the next step
        overwrites it."""
        B, t = idx.shape
        if state.pos + t > self.cfg.block_size:
            raise ValueError(f"KV cache full: {state.pos} cached + {t} new tokens > block_size "
                             f"{self.cfg.block_size}; start a new state with the last tokens")
        if B != state.slots:
            raise ValueError(f"batch size {B} does not match the state's {state.slots}")
        self.feed(state, idx, torch.full((B,), state.pos, dtype=torch.int32), None)
        state.pos += t
        return state.logits, state

    def feed(self, state: FusedState, idx: torch.Tensor, pos: torch.Tensor, slots: Optional[torch.Tensor]) -> None:
        """Feed idx (B, t): row b at positions pos[b].. of slot slots[b] (None: slot b); the logits of each
        row's last position go to state.logits[slots[b]]."""
        B, t = idx.shape
        idx = idx.to(torch.int64).contiguous()
        pos = pos.to(torch.int32).contiguous()
        sl = None if slots is None else slots.to(torch.int32).contiguous()
        if B > state.slots:
            raise ValueError(f"{B} rows do not fit the state's {state.slots} slots")
        rc = self.lib.pico_forward(self._ccfg_ref, self.weights, self.scales, *state.buffers, idx.data_ptr(), B, t,
                                   pos.data_ptr(), None if sl is None else sl.data_ptr(), state.slots,
                                   state.logits.data_ptr(), state.rows)
        if rc != PICO_OK:
            raise self._error(rc, idx, pos, sl, state.slots)

    def _error(self, rc: int, idx: torch.Tensor, pos: torch.Tensor, slots: Optional[torch.Tensor], n_slots: int) -> Exception:
        """The exception for a non-zero return code of the C code (nothing was written)."""
        V, T = self.cfg.vocab_size, self.cfg.block_size
        if rc == PICO_BAD_TOKEN:
            bad = ((idx < 0) | (idx >= V)).nonzero()[0].tolist()
            return IndexError(f"token ids must be in [0, {V}), got {idx[tuple(bad)].item()} at row {bad[0]}, "
                              f"position {bad[1]}")
        if rc == PICO_BAD_POSITION:
            if slots is not None and bool(((slots < 0) | (slots >= n_slots)).any()):
                return ValueError(f"slots must be in [0, {n_slots}), got {slots.tolist()}")
            return ValueError(f"positions {pos.min().item()}..{pos.max().item() + idx.size(1) - 1} are outside the "
                              f"KV cache [0, {T})")
        if rc == PICO_NO_TOKENS:
            return ValueError(f"nothing to feed: idx has shape {tuple(idx.shape)}; a step takes at least one token "
                              "per row")
        if rc == PICO_MISSING_WEIGHT:
            return RuntimeError("a weight the fused step reads is missing (a NULL pointer): the decoder was built "
                                "from an incomplete model")
        if rc == PICO_BAD_HISTORY:
            return ValueError("a row's token history is too short to slide its window from, or too full for the "
                              "tokens asked")
        return RuntimeError(f"the fused step failed with unknown code {rc}")


def sampling_struct(cfg) -> _Sampling:
    """A SampleConfig as the C sampler's PicoSampling (the same draw as sampling.sample_next)."""
    off = cfg.top_p is None or cfg.top_p >= 1.0
    return _Sampling(temperature=cfg.temperature, top_p=2.0 if off else cfg.top_p, top_k=cfg.top_k or 0,
                     greedy=int(cfg.greedy or cfg.temperature == 0))


class FusedRows:
    """Rows decoding together through the C loop (pico_generate): row b is slot b of a FusedState and has
    its own position, token history, sampling settings, stop id and token budget. generate() fills every
    row at once; the server starts a row when a request arrives and the row runs until it finishes, beside
    whatever other rows are live (continuous batching)."""

    def __init__(self, dec: FusedDecoder, slots: int, max_new_tokens: int, touch: bool = False):
        self.dec, self.lib = dec, dec.lib
        self.borrowed = not touch  # a long-lived pool's state is its own (touched); else lent by the decoder
        self.state = dec.borrow_state(slots) if self.borrowed else dec.new_state(slots, touch=True)
        S, V = slots, dec.cfg.vocab_size
        self.hist_cap = dec.cfg.block_size + max_new_tokens
        self.slot = torch.arange(S, dtype=torch.int32)
        self.pos = torch.zeros(S, dtype=torch.int32)
        self.hist = torch.zeros(S, self.hist_cap, dtype=torch.int64)
        self.n_hist = torch.zeros(S, dtype=torch.int32)
        self.stop = torch.full((S,), -1, dtype=torch.int64)
        self.left = torch.zeros(S, dtype=torch.int32)
        self.done = torch.ones(S, dtype=torch.uint8)  # a row is idle until started
        self.smp = (_Sampling * S)()
        self.work = torch.empty(5 * V)  # the C sampler's

    @property
    def slots(self) -> int:
        return self.state.slots

    def start(self, rows: list[int], prompts: torch.Tensor, cfg, stop: Optional[int]) -> None:
        """Start rows (free slots) on prompts (len(rows), T): the last block_size tokens are fed in one step;
        each row then samples cfg.max_new_tokens tokens as cfg says, stopping early at `stop` (None: never)."""
        T = self.dec.cfg.block_size
        prompts = prompts[:, -T:].to(torch.int64)
        r = torch.tensor(rows, dtype=torch.long)
        self.dec.feed(self.state, prompts, torch.zeros(len(rows), dtype=torch.int32), r)
        n = prompts.size(1)
        self.hist[r, :n] = prompts
        self.n_hist[r] = n
        self.pos[r] = n
        self.stop[r] = -1 if stop is None else stop
        self.left[r] = cfg.max_new_tokens
        self.done[r] = 0
        for b in rows:
            self.smp[b] = sampling_struct(cfg)

    def run(self, n: int, u: Optional[torch.Tensor], keep_logits: bool = False):
        """Up to n positions of every live row: (tokens (m, slots), logits (m, slots, V) or None), m <= n (fewer
        once no row is live). A finished or idle row's entries are its stop id (-1: none). u: (n, slots)
        uniform numbers, None when every live row is greedy."""
        S, V = self.slots, self.dec.cfg.vocab_size
        out = torch.empty(n, S, dtype=torch.int64)
        logits = torch.empty(n, S, V) if keep_logits else None
        if u is not None:
            u = u.to(torch.float32).contiguous()
            assert u.shape == (n, S), (u.shape, n, S)
        st = self.state
        got = self.lib.pico_generate(
            self.dec._ccfg_ref, self.dec.weights, self.dec.scales, *st.buffers, S, S, self.slot.data_ptr(),
            self.pos.data_ptr(), self.hist.data_ptr(), self.n_hist.data_ptr(), self.hist_cap, self.smp,
            None if u is None else u.data_ptr(), n, self.stop.data_ptr(), self.left.data_ptr(), self.done.data_ptr(),
            st.logits.data_ptr(), None if logits is None else logits.data_ptr(), out.data_ptr(), self.work.data_ptr(),
            st.rows)
        if got < 0:
            raise self.dec._error(-got, out[:0], self.pos, None, S)
        return out[:got], None if logits is None else logits[:got]

    def free(self, rows: list[int]) -> None:
        """Ends rows early (a client that went away): their slots can start again."""
        self.done[torch.tensor(rows, dtype=torch.long)] = 1

    def close(self) -> None:
        """Gives a borrowed state back to the decoder (the rows are done with it)."""
        if self.borrowed and self.state is not None:
            self.dec.give_back_state(self.state)
        self.state = None


def sample_rows(logits: torch.Tensor, cfg, u: Optional[torch.Tensor]) -> torch.Tensor:
    """The C sampler on logits (B, V) with one uniform number per row (u (B,); None when greedy): the draw
    sampling.sample_next makes from the same numbers. What pico_generate samples with, exposed for tests."""
    lib = _library()
    B, V = logits.shape
    logits = logits.float().contiguous()
    smp = (_Sampling * B)(*([sampling_struct(cfg)] * B))
    out = torch.empty(B, dtype=torch.int64)
    uu = None if u is None else u.float().contiguous()
    work = torch.empty(5 * V)
    lib.pico_sample_rows(logits.data_ptr(), B, V, smp, None if uu is None else uu.data_ptr(), out.data_ptr(),
                         work.data_ptr())
    return out
