"""The train flag set, defined once: `pico-llm train`, the classic `pico-llm.py` entry point and sweep
specs all read this table. Each flag has a name, a type, a default, help and (for the closed sets) the
values its config field accepts, taken from config.py's constants; the configs validate the values.

Parsed flags are turned into configs by `configs_from_args`. A parse leaves out the flags that were
not given (argparse.SUPPRESS), so `complete()` knows which ones the user set: `--resume` applies those
it can and refuses the others by name (`resume_configs`)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .config import (
    BATCHINGS,
    DATASETS,
    INPUT_MODES,
    KGRAM_VARIANTS,
    LR_SCHEDULES,
    MLPS,
    MODELS,
    NORM_PLACEMENTS,
    NORMS,
    OPTIMIZERS,
    POS_EMBS,
    PRECISIONS,
    PRESETS,
    TOKENIZERS,
    WINDOW_PATTERNS,
    DataConfig,
    ModelConfig,
    TrainConfig,
    resolve_model_config,
)
from .device import DEVICE_CHOICES
from .errors import PicoError


def shown_default(value: Any) -> Optional[str]:
    """A default as --help shows it, or None where there is nothing to show (None, False, [], a switch)."""
    if value is None or value is False or value == [] or value is argparse.SUPPRESS:
        return None
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """--help with "(default: X)" after each flag that has a default (train's flags say theirs in their
    help: their parse default is SUPPRESS)."""

    def _format_action(self, action):
        shown = shown_default(action.default) if action.option_strings else None
        if shown is not None and "default" not in (action.help or ""):
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: {shown.replace('%', '%%')})".strip()
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """argparse that raises PicoError (one line, exit 2) instead of printing usage, names the closest
    flag for a misspelt one, and shows defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise PicoError(f"{self.prog}: {message}")

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.unrecognized(extra)
        return parsed

    def unrecognized(self, extra: list[str]) -> None:
        """argparse's error for arguments no flag takes, with "did you mean" for a misspelt flag."""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        words = [w.split("=", 1)[0] for w in extra if w.startswith("--")]
        close = next((m[0] for w in words if (m := difflib.get_close_matches(w, known, n=1))), None)
        self.error("unrecognized arguments: " + " ".join(extra) + (f"; did you mean {close}?" if close else ""))


def parse_subset(s: str):
    """--tinystories_subset: a number of stories, or "all"."""
    if s.strip().lower() == "all":
        return "all"
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of stories or 'all', got {s!r}") from None


def parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


@dataclass(frozen=True)
class Flag:
    name: str
    group: str  # data | model | training
    type: Optional[Callable] = str  # None: a switch (given or not)
    default: Any = None  # model flags default to None so that presets apply
    help: str = ""
    values: tuple = ()  # the accepted values, shown in --help (the configs check them)
    many: bool = False  # takes several values (nargs="*")
    metavar: Optional[str] = None

    @property
    def switch(self) -> bool:
        return self.type is None


def _one_of(values) -> str:
    return " | ".join(values)


F = Flag
TRAIN_FLAGS: tuple[Flag, ...] = (
    # data
    F("dataset", "data", default="files", values=DATASETS,
      help="numbers: the built-in numeric-sequence corpus; files: --input_files/--input_dir/TinyStories"),
    F("input_files", "data", default=[], many=True, help="text files, one example per non-empty line"),
    F("input_dir", "data", help="a directory of *.txt files (recursive)"),
    F("input_mode", "data", default="lines", values=INPUT_MODES),
    F("limit_custom_examples", "data", int),
    F("numbers_count", "data", int, 20000, "sequences in the built-in numeric corpus"),
    F("tinystories_weight", "data", float, 0.0, "probability that an example comes from TinyStories (0 skips loading it)"),
    F("tinystories_path", "data", help="local TinyStories .txt / .parquet / .jsonl"),
    F("tinystories_valid_path", "data",
      help="the official TinyStories-valid file (.txt / .parquet / .jsonl): TinyStories' test split, all of it, "
           "instead of a hash split (from the hub: its validation split)"),
    F("tinystories_subset", "data", parse_subset, 20000, "the first N stories, or all"),
    F("test_fraction", "data", float, 0.1),
    F("tokenizer", "data", default="bpe", values=TOKENIZERS),
    F("vocab_size", "data", int, 4096, "bpe vocabulary size"),
    F("batching", "data", default="packed", values=BATCHINGS),
    # model
    F("models", "model", default="transformer", help="comma-separated: " + ",".join(MODELS)),
    F("block_size", "model", int, 64),
    F("embed_size", "model", int, 128),
    F("preset", "model", values=tuple(PRESETS), help="transformer style"),
    F("n_heads", "model", int),
    F("n_blocks", "model", int),
    F("pos_emb", "model", values=POS_EMBS),
    F("norm", "model", values=NORMS),
    F("norm_placement", "model", values=NORM_PLACEMENTS),
    F("mlp", "model", values=MLPS),
    F("bias", "model", parse_bool),
    F("tie_weights", "model", parse_bool),
    F("n_kv_heads", "model", int, help="key/value heads: n_heads (default), 1 (multi-query) or a divisor "
      "of n_heads (grouped-query)"),
    F("sliding_window", "model", int, help="each query sees its last W keys (0: full attention)"),
    F("window_pattern", "model", values=WINDOW_PATTERNS,
      help="which layers slide: all, or alternate (even layers slide, odd ones see everything: gpt-oss)"),
    F("attn_sinks", "model", parse_bool, help="a learned logit per head in the softmax's denominator (gpt-oss)"),
    F("qk_norm", "model", parse_bool, help="RMSNorm over each q and k head before RoPE (OLMo 2, Qwen 3)"),
    F("logit_softcap", "model", float, help="C: logits = C tanh(logits / C), Gemma 2 (0: off)"),
    F("n_experts", "model", int, help="a routed mixture of E expert MLPs instead of the dense MLP (0: dense)"),
    F("experts_per_token", "model", int, help="K: the experts each token goes through (default 2)"),
    F("use_position_emb", "model", parse_bool, help="false: no positional embedding"),
    F("use_post_norm", "model", None, help="same as --norm_placement post"),
    F("dropout", "model", float),
    F("hidden_size", "model", int, help="LSTM hidden size (default: embed_size)"),
    F("lstm_layers", "model", int),
    F("kgram_k", "model", int),
    F("kgram_variant", "model", values=KGRAM_VARIANTS),
    F("num_inner_mlp_layers", "model", int),
    F("kgram_chunk_size", "model", int, 0, "k-gram positions per chunk, a memory knob (0: all at once)"),
    # training
    F("epochs", "training", int, help="default 1 (8 with --dataset numbers); with --resume, extends the run"),
    F("max_steps_per_epoch", "training", int),
    F("batch_size", "training", int, 32,
      "the global batch (rows per optimizer step), split over processes and --grad_accum_steps"),
    F("grad_accum_steps", "training", int, 1,
      "micro-batches per step in each process, batch_size / (processes x this) rows each "
      "(with --resume, changes the run's)"),
    F("learning_rate", "training", float, 3e-3),
    F("optimizer", "training", default="auto", values=OPTIMIZERS,
      help="auto: muon for the Transformer, adamw for the others; muon: torch.optim.Muon on the Transformer "
           "blocks' matrices, AdamW on the rest"),
    F("weight_decay", "training", float, 0.1),
    F("warmup_steps", "training", int, 20),
    F("lr_schedule", "training", default="cosine", values=LR_SCHEDULES, help="cosine: warmup + cosine decay"),
    F("grad_clip", "training", float, 1.0),
    F("moe_aux_weight", "training", float, 0.01,
      "weight of the mixture of experts' load-balancing loss (added to the LM loss, logged apart)"),
    F("eval_interval", "training", int, 0, "also evaluate every N steps (0: epoch ends only)"),
    F("eval_batches", "training", int, 20),
    F("log_interval", "training", int, 10),
    F("seed", "training", int, 1337),
    F("device_id", "training", default="auto", help=f"{DEVICE_CHOICES} (auto: CUDA, else MPS, else CPU; "
      "an unavailable device falls back to the CPU)"),
    F("precision", "training", default="auto", values=PRECISIONS,
      help="auto: bf16 autocast where the hardware runs it fast, else fp32"),
    F("compile", "training", None, help="torch.compile the model (falls back to eager on failure)"),
    F("prompt", "training", help="the prompt of the samples printed at the end (default: 'Once upon a'; "
      "'0 1 2 3 4' with --dataset numbers)"),
    F("max_new_tokens", "training", int, 20, "length of the samples printed at the end"),
    F("output_dir", "training", default="runs"),
    F("run_name", "training", help="default: a timestamp and the model names"),
    F("resume", "training", metavar="RUN", help="continue a run directory (see --epochs to extend it)"),
    F("overwrite", "training", None, help="replace an existing run of the same name"),
    F("stop_at_step", "training", int, help="stop (with a checkpoint) after this step"),
    F("no_progress", "training", None, help="no progress bar"),
    F("tensorboard", "training", None,
      help="also write TensorBoard event files in the run directory (pip install -e '.[tensorboard]')"),
)
FLAGS: dict[str, Flag] = {f.name: f for f in TRAIN_FLAGS}

# Defaults of the classic starter entry point where they differ from `pico-llm train`'s.
CLASSIC_DEFAULTS = dict(models="lstm", tokenizer="gpt2", tinystories_weight=0.5, block_size=1024, embed_size=1024,
                        device_id="cuda:0", default_epochs=3, learning_rate=1e-3, batch_size=16)
# `--dataset numbers` without --epochs: eight passes over the 20000-sequence corpus (~290k tokens), about
# 1150 steps of batch 32 x 64 tokens; every family gets the same budget (a Transformer about two minutes
# on 2 CPU cores). Otherwise one epoch.
NUMBERS_EPOCHS, DEFAULT_EPOCHS = 8, 1
# Without --prompt: a story opening, or the numeric corpus's counting run with --dataset numbers.
NUMBERS_PROMPT, DEFAULT_PROMPT = "0 1 2 3 4", "Once upon a"


# `pico-llm data prepare`: the flags that determine the data (--seed seeds the numeric corpus).
DATA_FLAGS = tuple(f.name for f in TRAIN_FLAGS if f.group == "data") + ("seed", "no_progress")


def add_train_arguments(p: argparse.ArgumentParser, only: Optional[tuple[str, ...]] = None) -> None:
    """The training flag set (or the flags named in `only`), starter names first. Flags not given are left
    out of the parse (argparse.SUPPRESS): `complete()` fills in the defaults and records which were given."""
    groups = {}
    for f in TRAIN_FLAGS:
        if only is not None and f.name not in only:
            continue
        g = groups.get(f.group) or groups.setdefault(f.group, p.add_argument_group(f.group))
        default = None if f.switch else shown_default(f.default)
        shown = "; ".join(([_one_of(f.values)] if f.values else []) + ([f"default: {default}"] if default else []))
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"{f.help} ({shown})".strip() if shown else f.help or None)
        if f.switch:
            g.add_argument("--" + f.name, action="store_true", **kw)
        else:
            g.add_argument("--" + f.name, type=f.type, nargs="*" if f.many else None, metavar=f.metavar, **kw)


def train_parser(prog: str = "pico-llm train", add_help: bool = True) -> Parser:
    p = Parser(prog=prog, add_help=add_help)
    add_train_arguments(p)
    return p


def complete(a: argparse.Namespace, overrides: Optional[dict] = None) -> argparse.Namespace:
    """The flags given plus every default (the table's, then `overrides` for another entry point);
    `a.given` is the set of flag names that were given."""
    given = {f.name for f in TRAIN_FLAGS if hasattr(a, f.name)}
    defaults = {f.name: (False if f.switch else f.default) for f in TRAIN_FLAGS}
    defaults.update(overrides or {})
    for name, value in defaults.items():
        if name not in given:
            setattr(a, name, list(value) if isinstance(value, list) else value)
    a.given = given
    return a


def parse_models(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise PicoError("--models is empty")
    for m in names:
        if m not in MODELS:
            raise PicoError(f"unknown model {m!r}; choose from: {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise PicoError(f"--models lists a model twice: {spec}")
    return names


def data_config(a: argparse.Namespace) -> DataConfig:
    return DataConfig(dataset=a.dataset, input_files=list(a.input_files or []), input_dir=a.input_dir,
                      input_mode=a.input_mode, limit_custom_examples=a.limit_custom_examples,
                      numbers_count=a.numbers_count, tinystories_weight=a.tinystories_weight,
                      tinystories_path=a.tinystories_path, tinystories_subset=a.tinystories_subset,
                      tinystories_valid_path=a.tinystories_valid_path,
                      test_fraction=a.test_fraction, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                      batching=a.batching, seed=a.seed)


def train_config(a: argparse.Namespace) -> TrainConfig:
    epochs = a.epochs if a.epochs is not None else NUMBERS_EPOCHS if a.dataset == "numbers" \
        else getattr(a, "default_epochs", DEFAULT_EPOCHS)
    prompt = a.prompt if a.prompt is not None else NUMBERS_PROMPT if a.dataset == "numbers" else DEFAULT_PROMPT
    return TrainConfig(epochs=epochs, max_steps_per_epoch=a.max_steps_per_epoch, batch_size=a.batch_size,
                       grad_accum_steps=a.grad_accum_steps, learning_rate=a.learning_rate,
                       optimizer=a.optimizer,
                       weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, lr_schedule=a.lr_schedule,
                       grad_clip=a.grad_clip, moe_aux_weight=a.moe_aux_weight, eval_interval=a.eval_interval, eval_batches=a.eval_batches,
                       log_interval=a.log_interval, device=a.device_id, precision=a.precision, compile=a.compile,
                       seed=a.seed, prompt=prompt, max_new_tokens=a.max_new_tokens, tensorboard=a.tensorboard)


def model_flags(a: argparse.Namespace) -> dict:
    """ModelConfig fields from the classic flag names (None: the preset's or the config's default)."""
    pos_emb = a.pos_emb
    if a.use_position_emb is False:
        pos_emb = "none"
    elif a.use_position_emb and pos_emb is None and a.preset is None:
        pos_emb = "learned"
    return dict(block_size=a.block_size, n_embd=a.embed_size, n_head=a.n_heads, n_layer=a.n_blocks, pos_emb=pos_emb,
                norm=a.norm, norm_placement="post" if a.use_post_norm else a.norm_placement, mlp=a.mlp, bias=a.bias,
                tie_weights=a.tie_weights, dropout=a.dropout, hidden_size=a.hidden_size, lstm_layers=a.lstm_layers,
                kgram_k=a.kgram_k, kgram_variant=a.kgram_variant, num_inner_mlp_layers=a.num_inner_mlp_layers,
                kgram_chunk_size=a.kgram_chunk_size, n_kv_heads=a.n_kv_heads, sliding_window=a.sliding_window,
                window_pattern=a.window_pattern, attn_sinks=a.attn_sinks, qk_norm=a.qk_norm,
                logit_softcap=a.logit_softcap, n_experts=a.n_experts, experts_per_token=a.experts_per_token)


def check_output_dir(path: str) -> None:
    """--output_dir is a directory or can become one: refused before anything is written when it, or the
    nearest part of its path that exists, is a file."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise PicoError(f"--output_dir {path}: {p} is a file, not a directory")


def configs_from_args(a: argparse.Namespace):
    """(model names, {model: ModelConfig}, DataConfig, TrainConfig) from completed train flags (validated)."""
    names = parse_models(a.models)
    check_output_dir(a.output_dir)
    data, train = data_config(a), train_config(a)
    models = {m: resolve_model_config(preset=a.preset, model=m, **model_flags(a)) for m in names}
    if train.optimizer == "muon" and names != ["transformer"]:
        raise PicoError("--optimizer muon is for the Transformer's hidden matrices; train "
                        f"{', '.join(n for n in names if n != 'transformer')} with --optimizer adamw (a separate run)")
    return names, models, data, train


# --------------------------------------------------------------------------- --resume

# Flags that --resume applies to the run's stored TrainConfig (flag -> field). --epochs extends the run.
RESUME_APPLIES = {"epochs": "epochs", "grad_accum_steps": "grad_accum_steps", "tensorboard": "tensorboard",
                  "device_id": "device", "precision": "precision", "compile": "compile",
                  "eval_interval": "eval_interval", "log_interval": "log_interval", "prompt": "prompt",
                  "max_new_tokens": "max_new_tokens"}
# Flags about this invocation, not the run.
SESSION_FLAGS = {"resume", "stop_at_step", "no_progress"}


def resume_configs(a: argparse.Namespace, stored: tuple[ModelConfig, DataConfig, TrainConfig]):
    """The stored configs of the run being resumed with the given flags that can change applied; a
    given flag that cannot change (data, model, optimisation settings) is refused by name."""
    mcfg, dcfg, tcfg = stored
    for name in sorted(a.given - SESSION_FLAGS - set(RESUME_APPLIES)):
        raise PicoError(f"--{name} cannot change when resuming {a.resume} (it is part of the run's data, model "
                        f"or optimisation); resume without it, or train a new run. On --resume these apply: "
                        + ", ".join("--" + k for k in RESUME_APPLIES))
    changes = {RESUME_APPLIES[n]: getattr(a, n) for n in a.given & set(RESUME_APPLIES)}
    if changes.get("epochs") is not None and changes["epochs"] < tcfg.epochs:
        raise PicoError(f"--epochs {changes['epochs']}: {a.resume} was planned for {tcfg.epochs} epochs; "
                        "--resume can extend a run, not shorten it (use --stop_at_step to stop early)")
    return mcfg, dcfg, dataclasses.replace(tcfg, **changes)
