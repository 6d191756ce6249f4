"""Configuration dataclasses. Each validates itself in __post_init__ and round-trips through JSON,
so a run directory's config.json is all that is needed to rebuild a model or resume a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from .errors import PicoError

MODELS = ("lstm", "kgram", "transformer")
TOKENIZERS = ("bpe", "gpt2", "byte")
EOT = "<|endoftext|>"  # the one special token: separates documents, ends generation
MIN_BPE_VOCAB = 257  # 256 byte-level tokens + EOT
SPLIT_RULE = "hash-v1"  # a stable hash of each document (data/prepare.py); runs from before it say "seeded-shuffle"
DATASETS = ("files", "numbers")
INPUT_MODES = ("lines", "documents")
BATCHINGS = ("packed", "padded")
POS_EMBS = ("none", "learned", "sinusoidal", "rope")
NORMS = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post")
MLPS = ("gelu", "swiglu", "relu2", "swiglu_oss")  # swiglu_oss: gpt-oss's clamped SwiGLU (models/transformer.py)
WINDOW_PATTERNS = ("all", "alternate")  # which layers slide: every one, or the even ones (gpt-oss: 0, 2, ...)
KGRAM_VARIANTS = ("onehot", "embedding", "conv")
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("auto", "adamw", "muon")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Architecture styles (sizes come from n_layer / n_head / n_embd). Explicit flags override these.
PRESETS: dict[str, dict[str, Any]] = {
    "pico": dict(pos_emb="rope", norm="rmsnorm", norm_placement="pre", mlp="swiglu", bias=False, tie_weights=True),
    "mingpt": dict(pos_emb="learned", norm="layernorm", norm_placement="pre", mlp="gelu", bias=True, tie_weights=False),
    "gpt2": dict(pos_emb="learned", norm="layernorm", norm_placement="pre", mlp="gelu", bias=True, tie_weights=True),
    "llama": dict(pos_emb="rope", norm="rmsnorm", norm_placement="pre", mlp="swiglu", bias=False, tie_weights=False),
    # Llama 3: grouped-query attention (a kv head per 4 query heads, at least 1), RoPE theta 500000
    "llama3": dict(pos_emb="rope", norm="rmsnorm", norm_placement="pre", mlp="swiglu", bias=False, tie_weights=False,
                   n_kv_heads=-4, rope_theta=500000.0),
    # gpt-oss (HF's GptOssForCausalLM, scaled down): a kv head per 8 query heads, even layers sliding over 32
    # keys, attention sinks, 8 experts of gpt-oss's clamped SwiGLU with 2 per token, biases, untied head
    "gpt-oss": dict(pos_emb="rope", norm="rmsnorm", norm_placement="pre", mlp="swiglu_oss", bias=True,
                    tie_weights=False, n_kv_heads=-8, sliding_window=32, window_pattern="alternate", attn_sinks=True,
                    n_experts=8, experts_per_token=2, rope_theta=150000.0),
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise PicoError(msg)


def _choice(name: str, value: str, options) -> None:
    _check(value in options, f"unknown {name} {value!r}; choose one of: {', '.join(options)}")


class _JSON:
    """JSON round-trip for a flat dataclass; unknown keys are ignored with no error (forward compat)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class DataConfig(_JSON):
    dataset: str = "files"  # "numbers": the built-in numeric corpus; "files": input files / TinyStories
    input_files: list[str] = field(default_factory=list)
    input_dir: Optional[str] = None
    input_mode: str = "lines"  # lines: one example per non-empty line; documents: one per file
    limit_custom_examples: Optional[int] = None
    numbers_count: int = 20000
    tinystories_weight: float = 0.0
    tinystories_path: Optional[str] = None
    tinystories_subset: Union[int, str] = 20000  # the first N stories, or "all"
    tinystories_valid_path: Optional[str] = None  # the official validation file: TinyStories' test split
    test_fraction: float = 0.1
    split: str = SPLIT_RULE  # how documents are held out; a run's own rule is kept in its config.json
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    batching: str = "packed"  # packed windows | padded examples
    seed: int = 1337

    def __post_init__(self):
        _choice("dataset", self.dataset, DATASETS)
        _choice("input_mode", self.input_mode, INPUT_MODES)
        _choice("tokenizer", self.tokenizer, TOKENIZERS)
        _choice("batching", self.batching, BATCHINGS)
        _check(0.0 <= self.tinystories_weight <= 1.0,
               f"--tinystories_weight must be in [0, 1], got {self.tinystories_weight}")
        _check(0.0 < self.test_fraction < 1.0, f"--test_fraction must be in (0, 1), got {self.test_fraction} "
               "(a run needs a test split: its test loss is what every table reports)")
        _check(self.limit_custom_examples is None or self.limit_custom_examples >= 1,
               "--limit_custom_examples must be >= 1")
        _check(self.numbers_count >= 1, "--numbers_count must be >= 1")
        subset = self.tinystories_subset
        _check(subset == "all" or (isinstance(subset, int) and not isinstance(subset, bool) and subset >= 1),
               f"--tinystories_subset must be a number >= 1 or 'all', got {subset!r}")
        _check(self.tinystories_valid_path is None or self.tinystories_weight > 0,
               "--tinystories_valid_path is TinyStories' test split: it needs --tinystories_weight > 0")
        _check(self.vocab_size >= MIN_BPE_VOCAB,
               f"--vocab_size must be >= {MIN_BPE_VOCAB} (256 bytes + {EOT}), got {self.vocab_size}")
        _choice("split", self.split, (SPLIT_RULE, "seeded-shuffle"))
        if self.dataset == "files":
            _check(bool(self.input_files or self.input_dir or self.tinystories_weight > 0),
                   "no training data: give --input_files, --input_dir, --tinystories_weight > 0 or --dataset numbers")


    @classmethod
    def from_dict(cls, d: dict):
        """A config.json written before the hash split has no "split": its run held out a seeded shuffle."""
        return super().from_dict({"split": "seeded-shuffle", **d})

    @property
    def subset_count(self) -> Optional[int]:
        """The number of TinyStories stories to read; None: all of them."""
        return None if self.tinystories_subset == "all" else self.tinystories_subset


@dataclass
class ModelConfig(_JSON):
    model: str = "transformer"
    vocab_size: int = 0  # filled in from the tokenizer
    block_size: int = 64
    n_embd: int = 128
    dropout: float = 0.0
    # transformer
    n_layer: int = 2
    n_head: int = 4
    preset: str = "pico"
    pos_emb: str = "rope"  # none | learned | sinusoidal | rope
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_placement: str = "pre"  # pre | post
    mlp: str = "swiglu"  # gelu | swiglu
    bias: bool = False
    tie_weights: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_kv_heads: int = 0  # key/value heads: 0 = n_head (multi-head), 1 = multi-query, between: grouped-query;
    #                      -g (presets): one kv head per g query heads, at least 1
    sliding_window: int = 0  # 0: full attention; W: a query sees its last W keys, itself included
    window_pattern: str = "all"  # which layers slide: all, or alternate (even layers slide, odd see everything)
    attn_sinks: bool = False  # a learned logit per head in the softmax's denominator (gpt-oss)
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (OLMo 2, Qwen 3)
    logit_softcap: float = 0.0  # 0: off; C: logits = C tanh(logits / C) (Gemma 2)
    n_experts: int = 0  # 0: a dense MLP; E: a routed mixture of E expert MLPs
    experts_per_token: int = 2  # K experts per token, their outputs weighted by the softmax of their router logits
    # lstm
    hidden_size: int = 0  # 0: same as n_embd
    lstm_layers: int = 1
    # k-gram MLP
    kgram_k: int = 3
    kgram_variant: str = "onehot"  # onehot | embedding | conv
    num_inner_mlp_layers: int = 1
    kgram_chunk_size: int = 0  # positions per chunk (a memory knob); 0: the whole sequence at once

    def __post_init__(self):
        _choice("model", self.model, MODELS)
        _choice("preset", self.preset, tuple(PRESETS))
        _choice("pos_emb", self.pos_emb, POS_EMBS)
        _choice("norm", self.norm, NORMS)
        _choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _choice("mlp", self.mlp, MLPS)
        _choice("window_pattern", self.window_pattern, WINDOW_PATTERNS)
        _choice("kgram_variant", self.kgram_variant, KGRAM_VARIANTS)
        _check(self.block_size >= 2, f"--block_size must be >= 2, got {self.block_size}")
        _check(self.n_embd >= 1, "--embed_size must be >= 1")
        _check(self.n_layer >= 1 and self.n_head >= 1, "--n_blocks and --n_heads must be >= 1")
        if self.n_kv_heads < 0:  # a preset's ratio: one kv head per -n_kv_heads query heads, a divisor of n_head
            self.n_kv_heads = max(1, self.n_head // -self.n_kv_heads)
            while self.n_head % self.n_kv_heads:
                self.n_kv_heads -= 1
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_head
        if self.model == "transformer":  # heads mean nothing to the LSTM and the k-gram MLP
            _check(self.n_embd % self.n_head == 0,
                   f"--embed_size ({self.n_embd}) must be divisible by --n_heads ({self.n_head})")
            if self.pos_emb == "rope":
                _check((self.n_embd // self.n_head) % 2 == 0, "rope needs an even head size (embed_size / n_heads)")
            _check(self.n_head % self.n_kv_heads == 0,
                   f"--n_heads ({self.n_head}) must be a multiple of --n_kv_heads ({self.n_kv_heads})")
            _check(self.sliding_window >= 0, f"--sliding_window must be >= 0 (0: off), got {self.sliding_window}")
            _check(self.logit_softcap >= 0, f"--logit_softcap must be >= 0 (0: off), got {self.logit_softcap}")
            _check(self.n_experts >= 0, f"--n_experts must be >= 0 (0: a dense MLP), got {self.n_experts}")
            if self.n_experts:
                _check(1 <= self.experts_per_token <= self.n_experts,
                       f"--experts_per_token must be in 1..{self.n_experts} (--n_experts), got {self.experts_per_token}")
        _check(0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)")
        _check(self.kgram_k >= 1, "--kgram_k must be >= 1")
        _check(self.num_inner_mlp_layers >= 0, "--num_inner_mlp_layers must be >= 0")
        _check(self.kgram_chunk_size >= 0, "--kgram_chunk_size must be >= 0")
        _check(self.lstm_layers >= 1 and self.hidden_size >= 0, "--lstm_layers must be >= 1, --hidden_size >= 0")
        if self.hidden_size == 0:
            self.hidden_size = self.n_embd

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def window(self, layer: int) -> int:
        """The sliding window of a layer, 0 where it sees every earlier key."""
        if not self.sliding_window or (self.window_pattern == "alternate" and layer % 2):
            return 0
        return self.sliding_window


def resolve_model_config(preset: Optional[str] = None, **flags) -> ModelConfig:
    """Preset first, then every flag that was given explicitly (not None) on top."""
    preset = preset or "pico"
    _choice("preset", preset, tuple(PRESETS))
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in flags.items() if v is not None})
    return ModelConfig(**values)


@dataclass
class TrainConfig(_JSON):
    epochs: int = 1
    max_steps_per_epoch: Optional[int] = None
    batch_size: int = 16  # the global batch: rows per optimizer step, whatever the number of processes
    grad_accum_steps: int = 1  # micro-batches per step and process: batch_size / (world_size * grad_accum_steps) rows
    learning_rate: float = 3e-3
    optimizer: str = "auto"  # auto (muon for the Transformer, adamw for the others) | adamw | muon (training/optim.py)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # cosine (warmup + cosine decay) | constant
    grad_clip: float = 1.0
    moe_aux_weight: float = 0.01  # the mixture of experts' load-balancing loss, added to the LM loss
    eval_interval: int = 0  # 0: evaluate at epoch ends only
    eval_batches: int = 20
    log_interval: int = 10
    device: str = "cpu"
    precision: str = "auto"  # bf16 autocast where the hardware runs it fast (CUDA, AMX / AVX512-BF16 CPUs)
    compile: bool = False
    seed: int = 1337
    prompt: str = "Once upon a"
    max_new_tokens: int = 20
    tensorboard: bool = False  # also write TensorBoard event files beside metrics.jsonl

    def __post_init__(self):
        _check(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum_steps >= 1, f"--grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _check(self.batch_size % self.grad_accum_steps == 0,
               f"--batch_size ({self.batch_size}) must be divisible by --grad_accum_steps ({self.grad_accum_steps})")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "--max_steps_per_epoch must be >= 1")
        _check(self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}")
        _check(self.warmup_steps >= 0, "--warmup_steps must be >= 0")
        _check(self.eval_interval >= 0 and self.eval_batches >= 1, "--eval_interval >= 0 and --eval_batches >= 1")
        _check(self.moe_aux_weight >= 0, f"--moe_aux_weight must be >= 0, got {self.moe_aux_weight}")
        _check(self.log_interval >= 1, f"--log_interval must be >= 1, got {self.log_interval}")
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("precision", self.precision, PRECISIONS)
        _check(self.prompt != "", "--prompt must not be empty")
        _check(self.max_new_tokens >= 1, "--max_new_tokens must be >= 1")

    @classmethod
    def from_dict(cls, d: dict):
        """A config.json written before --optimizer has none: its run trained with AdamW."""
        return super().from_dict({"optimizer": "adamw", **d})


@dataclass
class SampleConfig(_JSON):
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None  # None or 1.0: plain sampling; greedy=True overrides
    greedy: bool = False
    stop_at_eot: bool = False
    seed: Optional[int] = None

    def __post_init__(self):
        _check(self.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        _check(self.top_p is None or 0.0 < self.top_p <= 1.0, f"--top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k is None or self.top_k >= 1, f"--top_k must be >= 1, got {self.top_k}")
