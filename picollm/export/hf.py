"""Export a Transformer run to the Hugging Face transformers format, without importing transformers.

    pre-norm, rope, rmsnorm, swiglu            -> LlamaForCausalLM  (biases: attention_bias / mlp_bias;
                                                  grouped-query attention: num_key_value_heads)
      ... with qk_norm                         -> Qwen3ForCausalLM  (no MLP biases)
    pre-norm, rope, rmsnorm, swiglu_oss experts -> GptOssForCausalLM (windows, sinks, a mixture of experts;
                                                  its router and expert biases are zeros where ours has none)
    pre-norm, learned positions, layernorm, gelu -> GPT2LMHeadModel (no biases: exported as zeros)

Either head may be tied or untied. The output directory holds config.json, model.safetensors,
generation_config.json and the tokenizer files transformers reads: for bpe, the run's HF tokenizers
JSON as tokenizer.json plus tokenizer_config.json; for gpt2, GPT-2's encoder.json and vocab.bpe as
vocab.json and merges.txt when the run's tokenizer was built from those files. The byte tokenizer has
no transformers class: the model is exported alone.

Weight layouts. Ours: attn.qkv is one Linear C -> (nh + 2 nkv) hs (q, k, v rows, in that order, heads
contiguous); mlp.fc for swiglu is one Linear C -> 2H (gate rows, then up rows). Llama and Qwen 3 keep
separate q/k/v and gate/up Linears with the same (out, in) layout, and their RoPE pairs dim i with
i + hs/2 as ours does, so the rows are only split. gpt-oss's experts are (E, in, out) as ours, with gate
and up interleaved (gate in the even columns). GPT-2 uses Conv1D, whose weight is (in, out): every Linear
is transposed.
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
from ..models.transformer import OSS_ALPHA, OSS_LIMIT, mlp_hidden, swiglu_hidden

LLAMA, QWEN3, GPT_OSS, GPT2 = "LlamaForCausalLM", "Qwen3ForCausalLM", "GptOssForCausalLM", "GPT2LMHeadModel"


def hf_architecture(cfg: ModelConfig) -> str:
    """The HF class that computes exactly what this run computes, or a one-line PicoError naming the
    setting that has no equivalent."""

    def refuse(setting: str, why: str = "") -> PicoError:
        return PicoError(f"cannot export to hf: {setting} has no Hugging Face equivalent{why}")

    if cfg.model != "transformer":
        raise refuse(f"model={cfg.model}", " (only Transformer runs export)")
    if cfg.norm_placement != "pre":
        raise refuse(f"norm_placement={cfg.norm_placement}", " (Llama and GPT-2 are pre-norm)")
    if cfg.logit_softcap:
        raise refuse(f"logit_softcap={cfg.logit_softcap:g}", " (Gemma 2 caps logits, but differs elsewhere)")
    if cfg.pos_emb == "rope":
        moe_like = cfg.n_experts or cfg.attn_sinks or cfg.sliding_window or cfg.mlp == "swiglu_oss"
        want_mlp = "swiglu_oss" if moe_like else "swiglu"
        why = (" (windows, sinks and experts export as gpt-oss: norm=rmsnorm, mlp=swiglu_oss, with --n_experts)"
               if moe_like else " (rope exports as Llama: norm=rmsnorm, mlp=swiglu)")
        for name, want in (("norm", "rmsnorm"), ("mlp", want_mlp)):
            if getattr(cfg, name) != want:
                raise refuse(f"{name}={getattr(cfg, name)} with pos_emb=rope", why)
        if moe_like:
            if not cfg.n_experts:
                raise refuse("a dense MLP with windows, sinks or mlp=swiglu_oss", " (gpt-oss's MLP is a mixture of "
                             "experts: add --n_experts)")
            if cfg.qk_norm:
                raise refuse("qk_norm with experts, windows or sinks", " (gpt-oss has no QK-norm)")
            return GPT_OSS
        if cfg.qk_norm:
            if cfg.bias:
                raise refuse("bias=True with qk_norm", " (QK-norm exports as Qwen 3, whose MLP has no biases)")
            return QWEN3
        return LLAMA
    if cfg.mlp == "relu2":
        raise refuse("mlp=relu2")
    for setting, on in (("qk_norm", cfg.qk_norm), ("attn_sinks", cfg.attn_sinks), ("sliding_window", cfg.sliding_window),
                        ("n_experts", cfg.n_experts), ("n_kv_heads", cfg.n_kv_heads != cfg.n_head)):
        if on:
            raise refuse(f"{setting} with pos_emb={cfg.pos_emb}", " (these export with RoPE only)")
    if cfg.pos_emb == "learned":
        for name, want in (("norm", "layernorm"), ("mlp", "gelu")):
            if getattr(cfg, name) != want:
                raise refuse(f"{name}={getattr(cfg, name)} with pos_emb=learned",
                             " (learned positions export as GPT-2: norm=layernorm, mlp=gelu)")
        return GPT2
    raise refuse(f"pos_emb={cfg.pos_emb}", " (Llama uses rope, GPT-2 learned positions)")


# ----------------------------------------------------------------------------- configs


def _common(cfg: ModelConfig, eot_id: int) -> dict:
    """The config keys every exported class shares."""
    return {"tie_word_embeddings": cfg.tie_weights, "bos_token_id": eot_id, "eos_token_id": eot_id,
            "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32"}


def llama_config(cfg: ModelConfig, eot_id: int) -> dict:
    return {
        "architectures": [LLAMA],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": swiglu_hidden(cfg.n_embd),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_heads,
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
        "pretraining_tp": 1,
        **_common(cfg, eot_id),
    }


def qwen3_config(cfg: ModelConfig, eot_id: int) -> dict:
    return {**llama_config(cfg, eot_id), "architectures": [QWEN3], "model_type": "qwen3", "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": cfg.n_layer}


def gpt_oss_config(cfg: ModelConfig, eot_id: int) -> dict:
    windows = [cfg.window(i) for i in range(cfg.n_layer)]
    return {
        "architectures": [GPT_OSS],
        "model_type": "gpt_oss",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": mlp_hidden(cfg),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_size,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "swiglu_alpha": OSS_ALPHA,
        "swiglu_limit": OSS_LIMIT,
        "sliding_window": cfg.sliding_window or None,
        "layer_types": ["sliding_attention" if w else "full_attention" for w in windows],
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        **_common(cfg, eot_id),
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
        **_common(cfg, eot_id),
    }


# ----------------------------------------------------------------------------- weights


def _attention(sd: dict, cfg: ModelConfig, ours: str, theirs: str, kinds) -> dict[str, torch.Tensor]:
    """q/k/v/o of one layer, split from our qkv (n_head q heads, then n_kv_heads k and v heads)."""
    out = {}
    hs = cfg.head_size
    for kind in kinds:
        q, k, v = sd[ours + f"attn.qkv.{kind}"].split([cfg.n_head * hs, cfg.n_kv_heads * hs, cfg.n_kv_heads * hs])
        out[theirs + f"self_attn.q_proj.{kind}"] = q
        out[theirs + f"self_attn.k_proj.{kind}"] = k
        out[theirs + f"self_attn.v_proj.{kind}"] = v
        out[theirs + f"self_attn.o_proj.{kind}"] = sd[ours + f"attn.proj.{kind}"]
    return out


def llama_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama's (and, with the q/k norms, Qwen 3's) names for our weights."""
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = sd[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = sd[ours + "ln_2.weight"]
        out.update(_attention(sd, cfg, ours, theirs, kinds))
        if cfg.qk_norm:
            out[theirs + "self_attn.q_norm.weight"] = sd[ours + "attn.q_norm.weight"]
            out[theirs + "self_attn.k_norm.weight"] = sd[ours + "attn.k_norm.weight"]
        for kind in kinds:
            gate, up = sd[ours + f"mlp.fc.{kind}"].chunk(2, dim=0)  # (H, C) or (H,) each, gate first
            out[theirs + f"mlp.gate_proj.{kind}"] = gate
            out[theirs + f"mlp.up_proj.{kind}"] = up
            out[theirs + f"mlp.down_proj.{kind}"] = sd[ours + f"mlp.proj.{kind}"]
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["head.weight"]
    return out


def gpt_oss_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GptOssForCausalLM's names for our weights: biases it always has are zeros where ours has none, and
    a run without sinks gets sinks at -inf (no weight)."""
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    E, C = cfg.n_experts, cfg.n_embd

    def bias(name: str, shape) -> torch.Tensor:
        return sd[name] if cfg.bias else torch.zeros(shape, dtype=sd["wte.weight"].dtype)

    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = sd[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = sd[ours + "ln_2.weight"]
        out.update(_attention(sd, cfg, ours, theirs, kinds))
        out[theirs + "self_attn.sinks"] = (sd[ours + "attn.sinks"] if cfg.attn_sinks
                                           else torch.full((cfg.n_head,), float("-inf")))
        out[theirs + "mlp.router.weight"] = sd[ours + "mlp.router.weight"]
        out[theirs + "mlp.router.bias"] = bias(ours + "mlp.router.bias", (E,))
        fc = sd[ours + "mlp.fc"]  # (E, C, 2H): gate columns, then up
        H = fc.size(-1) // 2
        out[theirs + "mlp.experts.gate_up_proj"] = torch.stack(fc.split(H, dim=-1), dim=-1).reshape(E, C, 2 * H)
        fc_b = bias(ours + "mlp.fc_bias", (E, 2 * H))
        out[theirs + "mlp.experts.gate_up_proj_bias"] = torch.stack(fc_b.split(H, dim=-1), dim=-1).reshape(E, 2 * H)
        out[theirs + "mlp.experts.down_proj"] = sd[ours + "mlp.proj"]
        out[theirs + "mlp.experts.down_proj_bias"] = bias(ours + "mlp.proj_bias", (E, C))
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
    make_config, make_weights = {LLAMA: (llama_config, llama_state_dict), QWEN3: (qwen3_config, llama_state_dict),
                                 GPT_OSS: (gpt_oss_config, gpt_oss_state_dict),
                                 GPT2: (gpt2_config, gpt2_state_dict)}[arch]
    config, weights = make_config(cfg, tokenizer.eot_id), make_weights(sd, cfg)
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
