"""Command line: one table of subcommands; the classic flag set is defined once, here.

Each handler is a thin wrapper over a library function. Errors a user can cause are PicoError: one
line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

from .config import MODELS, PRESETS, DataConfig, SampleConfig, TrainConfig, resolve_model_config
from .errors import PicoError


class _Parser(argparse.ArgumentParser):
    """argparse that raises PicoError (one line, exit 2) instead of printing usage."""

    def error(self, message):
        raise PicoError(f"{self.prog}: {message}")


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


# Defaults that differ between `pico-llm train` and the classic starter entry point.
TRAIN_DEFAULTS = dict(models="transformer", tokenizer="bpe", tinystories_weight=0.0, block_size=64, embed_size=128,
                      device_id="cpu", epochs=1, learning_rate=3e-3, batch_size=32, kgram_chunk_size=0)
CLASSIC_DEFAULTS = dict(models="lstm", tokenizer="gpt2", tinystories_weight=0.5, block_size=1024, embed_size=1024,
                        device_id="cuda:0", epochs=3, learning_rate=1e-3, batch_size=16, kgram_chunk_size=0)
# `--dataset numbers` without --epochs: eight passes over the 20000-sequence corpus (~290k tokens), about
# 1150 steps of batch 32 x 64 tokens; every family gets the same budget (a Transformer about two minutes
# on 2 CPU cores).
NUMBERS_DEFAULTS = dict(epochs=8)


def add_train_arguments(p: argparse.ArgumentParser, defaults: dict) -> None:
    """The training flag set, starter names first. Model flags default to None so presets apply."""
    d = defaults
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["files", "numbers"], default="files",
                   help="numbers: the built-in numeric-sequence corpus; files: --input_files/--input_dir/TinyStories")
    g.add_argument("--input_files", nargs="*", default=[], help="text files, one example per non-empty line")
    g.add_argument("--input_dir", default=None, help="a directory of *.txt files (recursive)")
    g.add_argument("--input_mode", choices=["lines", "documents"], default="lines")
    g.add_argument("--limit_custom_examples", type=int, default=None)
    g.add_argument("--numbers_count", type=int, default=20000, help="sequences in the built-in numeric corpus")
    g.add_argument("--tinystories_weight", type=float, default=d["tinystories_weight"],
                   help="probability that an example comes from TinyStories (0 skips loading it)")
    g.add_argument("--tinystories_path", default=None, help="local TinyStories .txt / .parquet / .jsonl")
    g.add_argument("--tinystories_subset", type=int, default=20000)
    g.add_argument("--test_fraction", type=float, default=0.1)
    g.add_argument("--tokenizer", default=d["tokenizer"], help="bpe | gpt2 | byte")
    g.add_argument("--vocab_size", type=int, default=4096, help="bpe vocabulary size")
    g.add_argument("--batching", choices=["packed", "padded"], default="packed")

    g = p.add_argument_group("model")
    g.add_argument("--models", default=d["models"], help="comma-separated: lstm,kgram,transformer")
    g.add_argument("--block_size", type=int, default=d["block_size"])
    g.add_argument("--embed_size", type=int, default=d["embed_size"])
    g.add_argument("--preset", default=None, help=f"transformer style: {', '.join(PRESETS)}")
    g.add_argument("--n_heads", type=int, default=None)
    g.add_argument("--n_blocks", type=int, default=None)
    g.add_argument("--pos_emb", default=None, help="none | learned | sinusoidal | rope")
    g.add_argument("--norm", default=None, help="rmsnorm | layernorm")
    g.add_argument("--norm_placement", default=None, help="pre | post")
    g.add_argument("--mlp", default=None, help="gelu | swiglu")
    g.add_argument("--bias", type=_bool, default=None)
    g.add_argument("--tie_weights", type=_bool, default=None)
    g.add_argument("--use_position_emb", type=_bool, default=None, help="false: no positional embedding")
    g.add_argument("--use_post_norm", action="store_true", default=None, help="same as --norm_placement post")
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--hidden_size", type=int, default=None, help="LSTM hidden size (default: embed_size)")
    g.add_argument("--lstm_layers", type=int, default=None)
    g.add_argument("--kgram_k", type=int, default=None)
    g.add_argument("--kgram_variant", default=None, help="onehot | embedding | conv")
    g.add_argument("--num_inner_mlp_layers", type=int, default=None)
    g.add_argument("--kgram_chunk_size", type=int, default=d["kgram_chunk_size"],
                   help="k-gram positions per chunk, a memory knob (0: all at once)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help=f"default {d['epochs']} (8 with --dataset numbers)")
    g.add_argument("--max_steps_per_epoch", type=int, default=None)
    g.add_argument("--batch_size", type=int, default=d["batch_size"],
                   help="the global batch (rows per optimizer step), split over processes and --grad_accum_steps")
    g.add_argument("--grad_accum_steps", type=int, default=None,
                   help="micro-batches per step in each process, batch_size / (processes x this) rows each "
                        "(default 1; with --resume, changes the run's)")
    g.add_argument("--learning_rate", type=float, default=d["learning_rate"])
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--warmup_steps", type=int, default=20)
    g.add_argument("--lr_schedule", default="cosine", help="cosine (warmup + cosine decay) | constant")
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--eval_interval", type=int, default=0, help="also evaluate every N steps (0: epoch ends only)")
    g.add_argument("--eval_batches", type=int, default=20)
    g.add_argument("--log_interval", type=int, default=10)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--device_id", default=d["device_id"], help="cpu | cuda | cuda:N | mps (falls back to cpu)")
    g.add_argument("--precision", default="auto",
                   help="auto (bf16 autocast where the hardware runs it fast, else fp32) | fp32 | bf16 | fp16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on failure)")
    g.add_argument("--prompt", default="Once upon a")
    g.add_argument("--max_new_tokens", type=int, default=20, help="length of the samples printed at the end")
    g.add_argument("--output_dir", default="runs")
    g.add_argument("--run_name", default=None, help="default: a timestamp and the model names")
    g.add_argument("--resume", default=None, metavar="RUN", help="continue a run directory")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    g.add_argument("--stop_at_step", type=int, default=None, help="stop (with a checkpoint) after this step")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files in the run directory (pip install -e .[tensorboard])")


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


def configs_from_args(a: argparse.Namespace):
    """(model names, {model: ModelConfig}, DataConfig, TrainConfig) from parsed train flags (validated)."""
    names = parse_models(a.models)
    if a.epochs is None:
        a.epochs = NUMBERS_DEFAULTS["epochs"] if a.dataset == "numbers" else a.default_epochs
    data = DataConfig(dataset=a.dataset, input_files=list(a.input_files or []), input_dir=a.input_dir,
                      input_mode=a.input_mode, limit_custom_examples=a.limit_custom_examples,
                      numbers_count=a.numbers_count, tinystories_weight=a.tinystories_weight,
                      tinystories_path=a.tinystories_path, tinystories_subset=a.tinystories_subset,
                      test_fraction=a.test_fraction, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                      batching=a.batching, seed=a.seed)
    train = TrainConfig(epochs=a.epochs, max_steps_per_epoch=a.max_steps_per_epoch, batch_size=a.batch_size,
                        grad_accum_steps=1 if a.grad_accum_steps is None else a.grad_accum_steps,
                        learning_rate=a.learning_rate, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
                        lr_schedule=a.lr_schedule, grad_clip=a.grad_clip, eval_interval=a.eval_interval,
                        eval_batches=a.eval_batches, log_interval=max(1, a.log_interval), device=a.device_id,
                        precision=a.precision, compile=a.compile, seed=a.seed, prompt=a.prompt, max_new_tokens=a.max_new_tokens,
                        tensorboard=a.tensorboard)
    pos_emb = a.pos_emb
    if a.use_position_emb is False:
        pos_emb = "none"
    elif a.use_position_emb and pos_emb is None and a.preset is None:
        pos_emb = "learned"
    flags = dict(block_size=a.block_size, n_embd=a.embed_size, n_head=a.n_heads, n_layer=a.n_blocks, pos_emb=pos_emb,
                 norm=a.norm, norm_placement="post" if a.use_post_norm else a.norm_placement, mlp=a.mlp, bias=a.bias,
                 tie_weights=a.tie_weights, dropout=a.dropout, hidden_size=a.hidden_size, lstm_layers=a.lstm_layers,
                 kgram_k=a.kgram_k, kgram_variant=a.kgram_variant, num_inner_mlp_layers=a.num_inner_mlp_layers,
                 kgram_chunk_size=a.kgram_chunk_size)
    models = {m: resolve_model_config(preset=a.preset, model=m, **flags) for m in names}
    return names, models, data, train


def cmd_train(a: argparse.Namespace) -> int:
    """Also the entry point of every process under `torchrun -m picollm train` (see train.setup_distributed)."""
    from . import checkpoint as ckpt
    from .train import broadcast_object, join_processes, teardown_distributed, train, train_models

    try:
        if a.resume:
            mcfg, dcfg, tcfg = ckpt.load_config(a.resume)
            if a.grad_accum_steps is not None:  # e.g. resuming on fewer GPUs: same global batch, split otherwise
                tcfg = dataclasses.replace(tcfg, grad_accum_steps=a.grad_accum_steps)
            if a.tensorboard:
                tcfg = dataclasses.replace(tcfg, tensorboard=True)
            train(mcfg, dcfg, tcfg, a.resume, resume=True, stop_at_step=a.stop_at_step, progress=not a.no_progress)
            return 0
        names, models, data, train_cfg = configs_from_args(a)
        name = a.run_name or time.strftime("%Y%m%d-%H%M%S-") + "-".join(names)
        if not a.run_name:  # under torchrun every rank takes rank 0's timestamp
            name = broadcast_object(name, join_processes(train_cfg))
        train_models(names, models, data, train_cfg, a.output_dir, name, overwrite=a.overwrite,
                     stop_at_step=a.stop_at_step, progress=not a.no_progress)
        return 0
    finally:
        teardown_distributed()


def _load(run: str, device: str = "cpu"):
    from .checkpoint import load_run

    return load_run(run, device)


def cmd_generate(a: argparse.Namespace) -> int:
    from .sampling import generate_text, sample_settings
    from .train import md_cell, resolve_precision

    model, tok, (mcfg, dcfg, tcfg) = _load(a.run)
    dtype = resolve_precision(a.precision, "cpu")
    if dtype is not None:  # test loss moved by <= 0.0002 nats in bf16 for each family; decoding ~1.2x faster
        model = model.to(dtype)
    prompt = tcfg.prompt if a.prompt is None else a.prompt
    if prompt == "":
        raise PicoError("--prompt must not be empty")
    base = SampleConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        greedy=a.greedy, stop_at_eot=a.stop_at_eot, seed=a.seed)
    if a.num_samples < 1:
        raise PicoError("--num_samples must be >= 1")
    if a.compare_p:
        print("| setting | sample |\n|---|---|")
        for label, cfg in sample_settings(a.compare_p, base):
            n = 1 if cfg.greedy else a.num_samples
            for text in generate_text(model, tok, prompt, cfg, num_samples=n, decoder=a.decoder):
                print(f"| {label} | {md_cell(text)} |")
        return 0
    for text in generate_text(model, tok, prompt, base, num_samples=a.num_samples, decoder=a.decoder):
        print(text)
        if a.num_samples > 1:
            print("---")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    if a.batch_size < 1 or a.eval_batches < 1:
        raise PicoError("--batch_size and --eval_batches must be >= 1")
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        raise PicoError(f"--json {a.json}: its directory does not exist")
    result = evaluate_run(a.run, input_files=a.input_files, batch_size=a.batch_size, max_batches=a.eval_batches)
    for k, v in result.items():
        print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    if a.json:
        with open(a.json, "w") as f:  # nan (no sequence long enough to score) is written as null
            json.dump({k: None if isinstance(v, float) and v != v else v for k, v in result.items()}, f, indent=2)
    return 0


def cmd_attention(a: argparse.Namespace) -> int:
    from .analysis.attention import attention_report

    r = attention_report(a.run, prompt=a.prompt, layer=a.layer, heads=a.heads, out=a.out, json_path=a.json,
                         all_layers=a.all, seed=a.seed)
    print("tokens: " + " ".join(r["tokens"]))
    print(r["table"])
    print(f"wrote {a.out}" + (f" and {a.json}" if a.json else ""))
    return 0


def cmd_neighbors(a: argparse.Namespace) -> int:
    from .analysis.neighbors import neighbors_report

    print(neighbors_report(a.run, tokens=a.tokens, k=a.k, n_clusters=a.clusters, text=a.text, seed=a.seed,
                           top=a.top))
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from .data.sources import generate_numbers

    if a.count < 1:
        raise PicoError("--count must be >= 1")
    lines = generate_numbers(a.count, seed=a.seed)
    if os.path.isdir(a.out):
        raise PicoError(f"--out {a.out} is a directory")
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} sequences to {a.out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_hf

    cls = export_hf(a.run, a.out, overwrite=a.overwrite)
    for name in sorted(os.listdir(a.out)):
        print(f"  {os.path.join(a.out, name)}  ({os.path.getsize(os.path.join(a.out, name)):,} bytes)")
    print(f"exported {a.run} as {cls}: transformers.AutoModelForCausalLM.from_pretrained({a.out!r})")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import format_report, run_bench
    from .train import resolve_device

    res = run_bench(quick=a.quick, device=resolve_device(a.device_id), precision=a.precision, compile=a.compile,
                    log=lambda m: print(m, file=sys.stderr))
    print(format_report(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from .experiments.sweep import run_sweep

    run_sweep(a.spec, a.output_dir, tuple(a.set), tensorboard=a.tensorboard, overwrite=a.overwrite,
              progress=not a.no_progress, dry_run=a.dry_run)
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .experiments.compare import compare_runs

    compare_runs(a.runs, out=a.out, patience=a.patience)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .experiments.report import write_report

    print(f"wrote {write_report(a.path, out=a.out, max_new_tokens=a.max_new_tokens, seed=a.seed)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pico-llm", description="A laboratory for tiny language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one or several models")
    add_train_arguments(t, TRAIN_DEFAULTS)
    t.set_defaults(func=cmd_train, default_epochs=TRAIN_DEFAULTS["epochs"])

    g = sub.add_parser("generate", help="sample from a trained run")
    g.add_argument("run")
    g.add_argument("--prompt", default=None, help="default: the run's training prompt")
    g.add_argument("--max_new_tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=None)
    g.add_argument("--top_p", type=float, default=None)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--stop_at_eot", action="store_true")
    g.add_argument("--num_samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--compare_p", default=None, help="e.g. greedy,0.2,0.5,0.95,1.0: a Markdown table")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="weights for sampling: auto = bf16 where the hardware runs it fast (as training's autocast), else fp32")
    g.add_argument("--decoder", choices=["auto", "fused", "torch"], default="auto",
                   help="Transformer decode step: fused = one C call per token on a CPU (compiled at first use), "
                        "torch = PyTorch ops; auto = fused where it can serve the model and batch <= 4")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="test loss, perplexity, bits per byte, continuation accuracy")
    e.add_argument("run")
    e.add_argument("--input_files", nargs="+", default=None, help="evaluate on these files instead of the test split")
    e.add_argument("--batch_size", type=int, default=32)
    e.add_argument("--eval_batches", type=int, default=50)
    e.add_argument("--json", default=None)
    e.set_defaults(func=cmd_eval)

    at = sub.add_parser("attention", help="attention heat-maps of a layer's heads on a prompt; per-head scores")
    at.add_argument("run")
    at.add_argument("--prompt", default=None, help="default: the run's training prompt")
    at.add_argument("--layer", type=int, default=0)
    at.add_argument("--heads", default="all", help="all | 0-3 | 0,2,5")
    at.add_argument("--all", action="store_true", help="every layer and head: a layer x head grid")
    at.add_argument("--out", default="attention.png", help="the figure: .png, .pdf or .svg")
    at.add_argument("--json", default=None, help="also write tokens, weights and scores as JSON")
    at.add_argument("--seed", type=int, default=0, help="seed of the random sequences scored for induction")
    at.set_defaults(func=cmd_attention)

    nb = sub.add_parser("neighbors", help="nearest tokens in embedding space; k-means clusters")
    nb.add_argument("run")
    nb.add_argument("--tokens", default=None, help="comma-separated token texts, e.g. Lily,dog,7")
    nb.add_argument("--k", type=int, default=8, help="neighbours per token")
    nb.add_argument("--clusters", type=int, default=None, metavar="K", help="k-means with K clusters")
    nb.add_argument("--text", default=None, help="with --clusters: cluster this text's hidden states, not embeddings")
    nb.add_argument("--top", type=int, default=10, help="tokens listed per cluster")
    nb.add_argument("--seed", type=int, default=0)
    nb.set_defaults(func=cmd_neighbors)

    d = sub.add_parser("data", help="write a built-in corpus")
    d.add_argument("corpus", choices=["numbers"])
    d.add_argument("--out", required=True)
    d.add_argument("--count", type=int, default=3333)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data)

    x = sub.add_parser("export", help="write a Transformer run as a Hugging Face transformers model")
    x.add_argument("run")
    x.add_argument("--format", choices=["hf"], default="hf", help="hf: LlamaForCausalLM or GPT2LMHeadModel")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="speed: training tokens/s and MFU, generation, k-gram, tokenizer")
    b.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs (a minute or two)")
    b.add_argument("--json", default=None, help="also write the results here")
    b.add_argument("--device_id", default="cpu")
    b.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (ours; the reference is fp32)")
    b.add_argument("--compile", action="store_true", help="torch.compile the Transformer")
    b.set_defaults(func=cmd_bench)

    sw = sub.add_parser("sweep", help="train one run per point of a grid / list over train flags (TOML spec)")
    sw.add_argument("spec", help="a sweep spec, e.g. sweeps/pos_emb.toml")
    sw.add_argument("--output_dir", default="runs", help="the sweep goes to OUTPUT_DIR/<spec name>/")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a [base] flag, e.g. --set max_steps_per_epoch=500 (repeatable)")
    sw.add_argument("--tensorboard", action="store_true", help="TensorBoard event files in every run")
    sw.add_argument("--overwrite", action="store_true", help="retrain every point, finished or not")
    sw.add_argument("--dry_run", action="store_true", help="validate, list the points and their state; train nothing")
    sw.add_argument("--no_progress", action="store_true", help="no progress bars")
    sw.set_defaults(func=cmd_sweep)

    cp = sub.add_parser("compare", help="overlaid loss curves and a table of runs; early-stopping and overfitting")
    cp.add_argument("runs", nargs="+", metavar="RUN", help="run directories (a sweep directory: all its runs)")
    cp.add_argument("--out", default=None, help="directory for compare.md and compare.png (default: the runs' parent)")
    cp.add_argument("--patience", type=int, default=3,
                    help="consecutive rising test-loss evaluations (with falling train loss) that flag overfitting")
    cp.set_defaults(func=cmd_compare)

    rp = sub.add_parser("report", help="one self-contained HTML page for a run or a sweep")
    rp.add_argument("path", metavar="RUN_OR_SWEEP")
    rp.add_argument("--out", default=None, help="the HTML file (default: RUN_OR_SWEEP/report.html)")
    rp.add_argument("--max_new_tokens", type=int, default=40, help="length of the samples")
    rp.add_argument("--seed", type=int, default=0, help="sampling seed")
    rp.set_defaults(func=cmd_report)
    return p


def run_cli(fn: Callable[[], int]) -> int:
    """Runs a command; a PicoError becomes one line on stderr and exit status 2."""
    try:
        return fn()
    except PicoError as e:
        rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"  # under torchrun
        print(f"error: {e}" if rank == "0" else f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Optional[list[str]] = None) -> int:
    def go() -> int:
        args = build_parser().parse_args(argv)
        return args.func(args)

    return run_cli(go)


def classic_main(argv: Optional[list[str]] = None) -> int:
    """The course starter's command line: same flags, same meanings, same defaults where they run here."""

    def go() -> int:
        p = _Parser(prog="pico-llm.py", description="Train k-gram / LSTM / Transformer models (classic flags).")
        add_train_arguments(p, CLASSIC_DEFAULTS)
        p.add_argument("--monosemantic_enabled", action="store_true", default=False)
        p.set_defaults(default_epochs=CLASSIC_DEFAULTS["epochs"])
        args = p.parse_args(argv)
        if args.run_name is None:
            args.run_name = time.strftime("classic-%Y%m%d-%H%M%S")
        rc = cmd_train(args)
        if args.monosemantic_enabled:  # the starter's stub: each generated token with its embedding neighbours
            from .analysis.neighbors import monosemantic_report

            root = args.resume or os.path.join(args.output_dir, args.run_name)
            names = [] if args.resume else parse_models(args.models)
            for run in [root] if len(names) <= 1 else [os.path.join(root, m) for m in names]:
                print(monosemantic_report(run))
        return rc

    return run_cli(go)
