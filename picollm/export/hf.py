"""Export a Transformer run to the Hugging Face transformers format, without importing transformers.

    pre-norm, rope, rmsnorm, swiglu            -> LlamaForCausalLM  (biases: attention_bias / mlp_bias)
    pre-norm, learned positions, layernorm, gelu -> GPT2LMHeadModel (no biases: exported as zeros)

Either head may be tied or untied. The output directory holds config.json, model.safetensors,
generation_config.json and the tokenizer files transformers reads: for bpe, the run's HF tokenizers
JSON as tokenizer.json plus tokenizer_config.json; for gpt2, GPT-2's encoder.json and vocab.bpe as
vocab.json and merges.txt when the run's tokenizer was built from those files. The byte tokenizer has
no transformers class: the model is exported alone.

Weight layouts. Ours: attn.qkv is one Linear C -> 3C (q, k, v rows, in that order, heads contiguous);
mlp.fc for swiglu is one Linear C -> 2H (gate rows, then up rows). Llama keeps separate q/k/v and
gate/up Linears with the same (out, in) layout, and its RoPE pairs dim i with i + hs/2 as ours does, so
the rows are only split. GPT-2 uses Conv1D, whose weight is (in, out): every Linear is transposed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import torch
from safetensors.torch import save_file

from ..checkpoint import load_config, load_run
from ..config import EOT, ModelConfig
from ..errors import PicoError
from ..models.transformer import swiglu_hidden

LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"


def hf_architecture(cfg: ModelConfig) -> str:
    """The HF class that computes exactly what this run computes, or a one-line PicoError naming the
    setting that has no equivalent."""

    def refuse(setting: str, why: str = "") -> PicoError:
        return PicoError(f"cannot export to hf: {setting} has no Hugging Face equivalent{why}")

    if cfg.model != "transformer":
        raise refuse(f"model={cfg.model}", " (only Transformer runs export)")
    if cfg.norm_placement != "pre":
        raise refuse(f"norm_placement={cfg.norm_placement}", " (Llama and GPT-2 are pre-norm)")
    if cfg.pos_emb == "rope":
        for name, want in (("norm", "rmsnorm"), ("mlp", "swiglu")):
            if getattr(cfg, name) != want:
                raise refuse(f"{name}={getattr(cfg, name)} with pos_emb=rope",
                             " (rope exports as Llama: norm=rmsnorm, mlp=swiglu)")
        return LLAMA
    if cfg.pos_emb == "learned":
        for name, want in (("norm", "layernorm"), ("mlp", "gelu")):
            if getattr(cfg, name) != want:
                raise refuse(f"{name}={getattr(cfg, name)} with pos_emb=learned",
                             " (learned positions export as GPT-2: norm=layernorm, mlp=gelu)")
        return GPT2
    raise refuse(f"pos_emb={cfg.pos_emb}", " (Llama uses rope, GPT-2 learned positions)")


# ----------------------------------------------------------------------------- configs


def llama_config(cfg: ModelConfig, eot_id: int) -> dict:
    return {
        "architectures": [LLAMA],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": swiglu_hidden(cfg.n_embd),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5 reads this key, 5 reads rope_parameters
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def gpt2_config(cfg: ModelConfig, eot_id: int) -> dict:
    return {
        "architectures": [GPT2],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": 4 * cfg.n_embd,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "activation_function": "gelu",  # our MLP uses F.gelu: the exact erf form ("gelu_new" is tanh)
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- weights


def llama_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    C = cfg.n_embd
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = sd[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = sd[ours + "ln_2.weight"]
        for kind in kinds:
            q, k, v = sd[ours + f"attn.qkv.{kind}"].split(C, dim=0)  # (C, C) or (C,) each
            out[theirs + f"self_attn.q_proj.{kind}"] = q
            out[theirs + f"self_attn.k_proj.{kind}"] = k
            out[theirs + f"self_attn.v_proj.{kind}"] = v
            out[theirs + f"self_attn.o_proj.{kind}"] = sd[ours + f"attn.proj.{kind}"]
            gate, up = sd[ours + f"mlp.fc.{kind}"].chunk(2, dim=0)  # (H, C) or (H,) each, gate first
            out[theirs + f"mlp.gate_proj.{kind}"] = gate
            out[theirs + f"mlp.up_proj.{kind}"] = up
            out[theirs + f"mlp.down_proj.{kind}"] = sd[ours + f"mlp.proj.{kind}"]
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["head.weight"]
    return out


def gpt2_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    def bias(name: str, n: int) -> torch.Tensor:  # a run without biases computes with zero biases
        return sd[name] if cfg.bias else torch.zeros(n, dtype=sd["wte.weight"].dtype)

    C = cfg.n_embd
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": bias("ln_f.bias", C)}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            out[theirs + f"{norm}.weight"] = sd[ours + f"{norm}.weight"]
            out[theirs + f"{norm}.bias"] = bias(ours + f"{norm}.bias", C)
        for src, dst, n_out in (("attn.qkv", "attn.c_attn", 3 * C), ("attn.proj", "attn.c_proj", C),
                                ("mlp.fc", "mlp.c_fc", 4 * C), ("mlp.proj", "mlp.c_proj", C)):
            out[theirs + f"{dst}.weight"] = sd[ours + f"{src}.weight"].t()  # Conv1D: (in, out)
            out[theirs + f"{dst}.bias"] = bias(ours + f"{src}.bias", n_out)
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["head.weight"]
    return out


# ----------------------------------------------------------------------------- tokenizer


def write_tokenizer(tokenizer, out_dir: str, block_size: int) -> list[str]:
    """Writes the tokenizer files transformers loads with AutoTokenizer; returns notes for the user."""
    specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "model_max_length": block_size,
                "clean_up_tokenization_spaces": False}
    if tokenizer.name == "bpe":
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tokenizer.to_json())
        _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                    {"tokenizer_class": "PreTrainedTokenizerFast", **specials})
        return []
    if tokenizer.name == "gpt2":
        src = getattr(tokenizer, "local_dir", None)
        if not src:
            return ["no tokenizer files: this run's gpt2 tokenizer came from tiktoken; set PICOLLM_GPT2_DIR to "
                    "a folder with GPT-2's vocab.bpe and encoder.json to include them, or load GPT-2's "
                    "tokenizer from the Hugging Face hub (same ids)"]
        # the formats are the same: encoder.json is GPT2Tokenizer's vocab.json, vocab.bpe its merges.txt
        shutil.copyfile(os.path.join(src, "encoder.json"), os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(os.path.join(src, "vocab.bpe"), os.path.join(out_dir, "merges.txt"))
        # our gpt2 encodes with tiktoken's encode_ordinary: "<|endoftext|>" in text is text, not the eot id
        _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                    {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "split_special_tokens": True,
                     **specials})
        return []
    return [f"no tokenizer files: the {tokenizer.name} tokenizer has no transformers class (ids 0..255 are the "
            f"UTF-8 bytes, {tokenizer.eot_id} is {EOT}); feed the model byte ids yourself"]


# ----------------------------------------------------------------------------- export


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _is_hf_export(path: str) -> bool:
    """A transformers model directory: its config.json names a model_type (a run's never does)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def _check_out_dir(run_dir: str, out_dir: str, overwrite: bool) -> None:
    out, run = os.path.realpath(out_dir), os.path.realpath(run_dir)
    if out == run or run.startswith(out.rstrip(os.sep) + os.sep):
        raise PicoError(f"--out {out_dir} is (or contains) the run directory; choose another")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PicoError(f"--out {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise PicoError(f"--out {out_dir} exists and is not empty; pass --overwrite to replace it")
        if not _is_hf_export(out_dir):
            raise PicoError(f"--overwrite: {out_dir} is not a Hugging Face export; refusing to delete it")


def export_hf(run_dir: str, out_dir: str, *, overwrite: bool = False,
              log: Callable[[str], None] = print) -> str:
    """Writes out_dir as a transformers model directory; returns the HF class name.

    The directory is built beside out_dir and renamed into place, so a failed export leaves nothing
    half written (and, with overwrite, the previous export intact)."""
    arch = hf_architecture(load_config(run_dir)[0])  # refuse before loading weights or the tokenizer
    _check_out_dir(run_dir, out_dir, overwrite)
    model, tokenizer, (cfg, _, _) = load_run(run_dir)
    sd = model.state_dict()
    if arch == LLAMA:
        config, weights = llama_config(cfg, tokenizer.eot_id), llama_state_dict(sd, cfg)
    else:
        config, weights = gpt2_config(cfg, tokenizer.eot_id), gpt2_state_dict(sd, cfg)
    # safetensors refuses tensors that share memory (q/k/v are views of one qkv): store copies
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise PicoError(f"--out {out_dir}: cannot write there ({e.strerror or type(e).__name__})") from None
    old = None
    try:
        os.chmod(tmp, 0o755)
        _write_json(os.path.join(tmp, "config.json"), config)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
                     "pad_token_id": tokenizer.eot_id})
        notes = write_tokenizer(tokenizer, tmp, cfg.block_size)
        if os.path.isdir(out_dir):
            if os.listdir(out_dir):  # checked above: an earlier export, and overwrite was asked for
                old = out_dir + ".old-" + os.path.basename(tmp)
                os.replace(out_dir, old)
            else:
                os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        raise PicoError(f"--out {out_dir}: cannot write there ({e.strerror or type(e).__name__})") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    for note in notes:
        log(note)
    return arch
