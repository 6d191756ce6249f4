"""Export a Transformer run as GGUF, the file llama.cpp, Ollama and LM Studio load, written with the
`gguf` package (llama.cpp's own writer).

What exports: the runs `hf.py` exports as Llama (pre-norm, RoPE, RMSNorm, SwiGLU; grouped-query attention,
biases and a tied or untied head), as llama.cpp's `llama` architecture. Anything else is refused with one line naming the
setting.

Weight layouts. llama.cpp's `llama` rotates adjacent pairs (dims 2i, 2i+1) where ours, like HF's,
rotates dim i with i + hs/2: each head's q and k rows are reordered (i -> 2i, i + hs/2 -> 2i + 1), which
leaves every q.k product, and so the attention, unchanged. The rest is split as for HF: attn.qkv into
attn_q/k/v, the SwiGLU fc into ffn_gate and ffn_up. A tied head is left out: llama.cpp then reads the
token embedding as the output matrix.

The tokenizer is stored as llama.cpp's byte-level BPE ("gpt2" model, "gpt-2" pre-tokenizer, which is
the GPT-2 regex our BPE and GPT-2 split by): the tokens in GPT-2's byte-to-character spelling and the
merges in order. `bpe` reads both from the run's tokenizers JSON; `gpt2` (tiktoken) rebuilds the merges
from its ranks; `byte` is the 256 single-byte tokens with no merges. End-of-text is a control token and
the eos/eot id; no BOS is added (our runs never saw one).

dtypes: f32; f16 (matrices f16, norms f32); q8_0 (matrices in llama.cpp's Q8_0, blocks of 32 with one
scale each; a matrix whose rows are not a multiple of 32 long stays f16, and the log says which).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import gguf
import numpy as np
import torch

from ..checkpoint import load_config, load_run
from ..config import EOT, ModelConfig
from ..data.tokenizers import bpe_parts, byte_alphabet
from ..errors import PicoError
from ..fsio import atomic_path
from ..models.transformer import swiglu_hidden
from .hf import LLAMA, hf_architecture, llama_state_dict

DTYPES = ("f32", "f16", "q8_0")
ARCH = "llama"
Q8_BLOCK = 32


def gguf_refusal(cfg: ModelConfig) -> Optional[str]:
    """Why this run cannot be written as GGUF (one line), or None."""
    try:
        arch = hf_architecture(cfg)
    except PicoError as e:
        return str(e).replace("cannot export to hf: ", "cannot export to gguf: ").replace(
            "no Hugging Face equivalent", "no llama.cpp equivalent")
    if arch != LLAMA:
        return ("cannot export to gguf: only Llama-style runs export (pos_emb=rope, norm=rmsnorm, mlp=swiglu, "
                f"pre-norm, grouped-query attention allowed; e.g. --preset llama3); this run is {arch}-style "
                "(--format hf exports it)")
    return None


# ----------------------------------------------------------------------------- tokenizer


def _spell(b: bytes, chars: dict[int, str]) -> str:
    """GPT-2's byte-level spelling of a token: each byte as its character."""
    return "".join(chars[x] for x in b)


def gguf_vocab(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's gpt2 BPE reads them."""
    chars = {b: c for c, b in byte_alphabet().items()}
    V, eot = tokenizer.vocab_size, tokenizer.eot_id
    tokens = [EOT if i == eot else _spell(tokenizer.token_bytes(i), chars) for i in range(V)]
    types = [int(gguf.TokenType.CONTROL if i == eot else gguf.TokenType.NORMAL) for i in range(V)]
    if tokenizer.name == "bpe":
        merges = json.loads(tokenizer.to_json())["model"]["merges"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # tokenizers >= 0.20 writes pairs
    elif tokenizer.name == "gpt2":
        merges = gpt2_merges(tokenizer, chars)
    elif tokenizer.name == "byte":
        merges = []
    else:
        raise PicoError(f"cannot export to gguf: the {tokenizer.name} tokenizer has no llama.cpp form")
    return tokens, types, merges


def gpt2_merges(tokenizer, chars: dict[int, str]) -> list[str]:
    """GPT-2's merges from tiktoken's ranks: each token of two bytes or more is the merge of the two parts
    that the rank rule, given only the tokens below it, leaves it in (the check tiktoken.load makes)."""
    ranks = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size) if i != tokenizer.eot_id}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise PicoError(f"cannot export to gguf: GPT-2 token {rank} is not the merge of two earlier tokens")
        merges.append(_spell(parts[0], chars) + " " + _spell(parts[1], chars))
    return merges


# ----------------------------------------------------------------------------- weights


def rope_pairs_adjacent(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q or k rows (n_head * hs, ...) from our RoPE's half-split order to llama.cpp's adjacent pairs."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


GGUF_NAMES = {  # HF Llama name (after the layer prefix) -> llama.cpp's
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> fp32 tensors, q/k rows in its RoPE order."""
    out = {}
    for name, t in llama_state_dict(sd, cfg).items():
        t = t.detach().float().cpu()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = t
        elif name == "model.norm.weight":
            out["output_norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        else:
            _, _, i, rest = name.split(".", 3)  # model.layers.{i}.{module}.{weight|bias}
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                t = rope_pairs_adjacent(t, cfg.n_head if module == "self_attn.q_proj" else cfg.n_kv_heads)
            out[f"blk.{i}.{GGUF_NAMES[module]}.{kind}"] = t
    return out


def _encoded(t: torch.Tensor, dtype: str):
    """(array, raw GGML type or None) for one tensor at the asked dtype, and whether it fell back."""
    a = t.numpy()
    if a.ndim == 1 or dtype == "f32":  # norms and biases stay f32, as llama.cpp's converter keeps them
        return a.astype(np.float32), None, False
    if dtype == "q8_0":
        if a.shape[-1] % Q8_BLOCK == 0:
            q = gguf.quants.quantize(a.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            return q, gguf.GGMLQuantizationType.Q8_0, False
        return a.astype(np.float16), None, True
    return a.astype(np.float16), None, False


# ----------------------------------------------------------------------------- export


def _writer_class():
    """gguf's writer, able to write an empty typed array: llama.cpp's gpt2 tokenizer needs the merges key
    even when there are none (the byte tokenizer), and GGUF allows a count of 0, but the writer refuses one."""
    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer



def _write_metadata(w, cfg: ModelConfig, run_dir: str, file_type, eot_id: int, vocab) -> None:
    """The model's shape and the tokenizer, as llama.cpp's llama architecture reads them."""
    tokens, types, merges = vocab
    w.add_name(os.path.basename(os.path.normpath(run_dir)))
    w.add_file_type(file_type)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(swiglu_hidden(cfg.n_embd))
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_size)
    w.add_value_length(cfg.head_size)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    w.add_bos_token_id(eot_id)
    w.add_eos_token_id(eot_id)
    w.add_eot_token_id(eot_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def export_gguf(run_dir: str, out_file: str, *, dtype: str = "f32", overwrite: bool = False,
                log: Callable[[str], None] = print) -> dict:
    """Writes out_file (one rename: a failed export leaves no file, and an old one intact); returns what
    was written: {"architecture", "dtype", "tensors", "vocab", "bytes"}."""
    if dtype not in DTYPES:
        raise PicoError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    why = gguf_refusal(load_config(run_dir)[0])  # refuse before loading weights or the tokenizer
    if why:
        raise PicoError(why)
    if os.path.isdir(out_file):
        raise PicoError(f"--out {out_file} is a directory; name the .gguf file to write")
    if os.path.exists(out_file) and not overwrite:
        raise PicoError(f"--out {out_file} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out_file))
    try:
        os.makedirs(parent, exist_ok=True)  # as the hf export makes its folder's parents
    except OSError as e:
        raise PicoError(f"--out {out_file}: cannot create {parent} ({e.strerror or type(e).__name__})") from None

    model, tokenizer, (cfg, _, _) = load_run(run_dir)
    tokens, types, merges = gguf_vocab(tokenizer)
    tensors = gguf_tensors(model.state_dict(), cfg)

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    fell_back = []
    try:
        with atomic_path(out_file) as tmp:
            w = _writer_class()(tmp, ARCH)
            _write_metadata(w, cfg, run_dir, file_type, tokenizer.eot_id, (tokens, types, merges))
            for name, t in tensors.items():
                data, raw, fb = _encoded(t, dtype)
                if fb:
                    fell_back.append(name)
                w.add_tensor(name, data, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    except OSError as e:
        raise PicoError(f"--out {out_file}: cannot write there ({e.strerror or type(e).__name__})") from None
    if fell_back:
        log(f"q8_0: {len(fell_back)} matrices with rows not a multiple of {Q8_BLOCK} stay f16 "
            f"({', '.join(fell_back[:3])}{', ...' if len(fell_back) > 3 else ''})")
    return {"architecture": ARCH, "dtype": dtype, "tensors": len(tensors), "vocab": len(tokens),
            "bytes": os.path.getsize(out_file)}
