"""Command line: one table of subcommands (COMMANDS), each a function that declares its arguments and a
thin handler over a library function. The train flag set lives in flags.py. Errors a user can cause
are PicoError: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import os
import sys
import time
from typing import Callable, Optional

from . import __version__
from . import checkpoint as ckpt
from .analysis import sae_report, sae_train
from .analysis.attention import attention_report
from .analysis.lens import lens_report
from .analysis.neighbors import monosemantic_report, neighbors_report
from .analysis.patching import patching_report
from .analysis.sae import steering_hooks
from .bench import format_report, run_bench
from .config import SampleConfig
from .data.corpus import build_corpus, prepared_table
from .data.prepare import info_table
from .data.sources import generate_numbers
from .device import DEVICE_CHOICES, enable_transparent_huge_pages, resolve_device
from .errors import PicoError
from .evaluate import evaluate_runs
from .experiments.compare import compare_runs
from .experiments.course import run_course
from .experiments.report import write_report
from .experiments.sweep import run_sweep
from .experiments.tensorboard import tensorboard_sinks
from .export import GGUF_DTYPES, export_gguf, export_hf
from .flags import (
    CLASSIC_DEFAULTS,
    DATA_FLAGS,
    Parser,
    add_train_arguments,
    complete,
    configs_from_args,
    data_config,
    parse_models,
    resume_configs,
)
from .fsio import write_json, write_text
from .models.hooks import hooks_attached
from .sampling import for_sampling, generate_text, sample_settings
from .tables import md_table
from .training import train, train_models
from .training.distributed import broadcast_object, join_processes, teardown_distributed
from .training.runs import multi_runs, resume_models
from .training.stop import STOP

# --------------------------------------------------------------------------- handlers


def train_from_flags(a: argparse.Namespace) -> dict:
    """`pico-llm train` (and every process under `torchrun -m picollm train`): a new run, several, or
    --resume of one (the flags that can change applied, the others refused)."""
    if a.resume and multi_runs(a.resume):  # a multi-model folder: every model that is not finished
        return resume_models(a.resume, lambda stored: resume_configs(a, stored), stop_at_step=a.stop_at_step,
                             progress=not a.no_progress, sinks_of=tensorboard_sinks)
    if a.resume:
        mcfg, dcfg, tcfg = resume_configs(a, ckpt.load_config(a.resume))
        return {mcfg.model: train(mcfg, dcfg, tcfg, a.resume, resume=True, stop_at_step=a.stop_at_step,
                                  progress=not a.no_progress, sinks=tensorboard_sinks(tcfg)(a.resume))}
    names, models, data, train_cfg = configs_from_args(a)
    name = a.run_name or time.strftime("%Y%m%d-%H%M%S-") + "-".join(names)
    if not a.run_name:  # under torchrun every rank takes rank 0's timestamp
        name = broadcast_object(name, join_processes(train_cfg))
    return train_models(names, models, data, train_cfg, a.output_dir, name, overwrite=a.overwrite,
                        stop_at_step=a.stop_at_step, progress=not a.no_progress, sinks=tensorboard_sinks(train_cfg))


def cmd_train(a: argparse.Namespace) -> int:
    """Exit status 0, or 128 + the signal that stopped it (training/stop.py)."""
    complete(a)
    try:
        with STOP:
            train_from_flags(a)
        return STOP.exit_status()
    finally:
        teardown_distributed()


def check_greedy(a: argparse.Namespace) -> None:
    """--greedy takes the most probable token, so a sampling flag beside it would be ignored: refused."""
    given = [flag for flag, on in (("--top_p", a.top_p is not None), ("--top_k", a.top_k is not None),
                                   ("--temperature", a.temperature != 1.0)) if on]
    if a.greedy and given:
        raise PicoError(f"--greedy takes the most probable token, so {' and '.join(given)} would be ignored; "
                        "give one or the other")


def cmd_generate(a: argparse.Namespace) -> int:
    check_greedy(a)
    device = resolve_device(a.device_id)
    model, tok, (mcfg, dcfg, tcfg) = ckpt.load_run(a.run, device)
    if a.steer and (a.decoder == "fused" or a.precision == "int8"):
        raise PicoError("--steer runs hooks, which the fused decoder (and so --weights int8) does not; use "
                        "--decoder torch or auto")
    # bf16: test loss moved by <= 0.0002 nats for each family; int8: see bench/RESULTS.md
    model, decoder = for_sampling(model, a.precision, device, "torch" if a.steer else a.decoder)
    prompt = tcfg.prompt if a.prompt is None else a.prompt  # "": unconditional, from end-of-text
    base = SampleConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        greedy=a.greedy, stop_at_eot=a.stop_at_eot, seed=a.seed)
    if a.num_samples < 1:
        raise PicoError("--num_samples must be >= 1")
    with hooks_attached(model, steering_hooks(a.steer, model)):  # the fused C step runs no hooks: torch
        return _generate(a, model, tok, prompt, base, device, decoder)


def _generate(a: argparse.Namespace, model, tok, prompt: str, base: SampleConfig, device: str, decoder) -> int:
    if a.compare_p:
        rows = [(label, text) for label, cfg in sample_settings(a.compare_p, base)
                for text in generate_text(model, tok, prompt, cfg, num_samples=1 if cfg.greedy else a.num_samples,
                                          device=device, decoder=decoder)]
        print(md_table(["setting", "sample"], rows), end="")
        return 0
    for text in generate_text(model, tok, prompt, base, num_samples=a.num_samples, device=device, decoder=decoder):
        print(text)
        if a.num_samples > 1:
            print("---")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    if a.batch_size < 1 or a.eval_batches < 1:
        raise PicoError("--batch_size and --eval_batches must be >= 1")
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        raise PicoError(f"--json {a.json}: its directory does not exist")
    results = evaluate_runs(a.run, log=lambda m: print(m, file=sys.stderr), input_files=a.input_files,
                            batch_size=a.batch_size, max_batches=a.eval_batches, device=resolve_device(a.device_id),
                            precision=a.precision, weights=a.weights)
    one = list(results) == [a.run]  # a run; else a folder of runs: one block per run, headed by its path
    for run, result in results.items():
        if not one:
            print(f"{run}:")
        for k, v in result.items():
            print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    if a.json:  # nan (no sequence long enough to score) is written as null; a folder: {run: figures}
        write_json(a.json, results[a.run] if one else results)
    return 0


def cmd_attention(a: argparse.Namespace) -> int:
    r = attention_report(a.run, prompt=a.prompt, layer=a.layer, heads=a.heads, out=a.out, json_path=a.json,
                         all_layers=a.all, seed=a.seed, device=resolve_device(a.device_id))
    print("tokens: " + " ".join(r["tokens"]))
    print(r["table"])
    print(f"wrote {a.out}" + (f" and {a.json}" if a.json else ""))
    return 0


def cmd_lens(a: argparse.Namespace) -> int:
    r = lens_report(a.run, prompt=a.prompt, out=a.out, json_path=a.json, device=resolve_device(a.device_id))
    print(r["table"])
    print(f"wrote {a.out}" + (f" and {a.json}" if a.json else ""))
    return 0


def cmd_patch(a: argparse.Namespace) -> int:
    r = patching_report(a.run, a.clean, a.corrupt, target=a.target, out=a.out, json_path=a.json,
                        device=resolve_device(a.device_id))
    print(r["table"])
    print(f"wrote {a.out}" + (f" and {a.json}" if a.json else ""))
    return 0


def cmd_neighbors(a: argparse.Namespace) -> int:
    print(neighbors_report(a.run, tokens=a.tokens, k=a.k, n_clusters=a.clusters, text=a.text, seed=a.seed,
                           top=a.top, device=resolve_device(a.device_id)))
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    if a.action == "info":
        print(info_table(), end="")
        return 0
    if a.action == "prepare":
        corpus = build_corpus(data_config(complete(a)), progress=not a.no_progress)
        tok = corpus.tokenizer
        print(prepared_table(corpus), end="")
        print(f"tokenizer: {tok.name}, {tok.vocab_size} ids (identity {tok.identity[:16]})")
        return 0
    if a.count < 1:
        raise PicoError("--count must be >= 1")
    if os.path.isdir(a.out):
        raise PicoError(f"--out {a.out} is a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(a.out))):
        raise PicoError(f"--out {a.out}: directory {os.path.dirname(os.path.abspath(a.out))} does not exist")
    lines = generate_numbers(a.count, seed=a.seed)
    write_text(a.out, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} sequences to {a.out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    if a.format == "gguf":
        res = export_gguf(a.run, a.out, dtype=a.dtype or "f32", overwrite=a.overwrite)
        print(f"  {a.out}  ({res['bytes']:,} bytes: {res['tensors']} tensors, {res['vocab']} tokens)")
        print(f"exported {a.run} as GGUF ({res['architecture']}, {res['dtype']}): "
              f"llama-cli -m {a.out}, or llama_cpp.Llama({a.out!r})")
        return 0
    if a.dtype is not None:
        raise PicoError("--dtype is for --format gguf (an hf export keeps the run's float32 weights)")
    cls = export_hf(a.run, a.out, overwrite=a.overwrite)
    for name in sorted(os.listdir(a.out)):
        print(f"  {os.path.join(a.out, name)}  ({os.path.getsize(os.path.join(a.out, name)):,} bytes)")
    print(f"exported {a.run} as {cls}: transformers.AutoModelForCausalLM.from_pretrained({a.out!r})")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve.app import serve  # FastAPI and uvicorn load only for this command
    from .serve.protocol import load_chat_template

    return serve(a.runs, a.host, a.port, device_id=a.device_id, precision=a.precision, decoder=a.decoder,
                 max_active=a.max_active, max_tokens_limit=a.max_tokens_limit,
                 chat_template=load_chat_template(a.chat_template), log=lambda m: print(m, flush=True))


def cmd_bench(a: argparse.Namespace) -> int:
    res = run_bench(quick=a.quick, device=resolve_device(a.device_id), precision=a.precision, compile=a.compile,
                    log=lambda m: print(m, file=sys.stderr))
    print(format_report(res))
    if a.json:
        write_json(a.json, res)
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    with STOP:
        run_sweep(a.spec, a.output_dir, tuple(a.set), tensorboard=a.tensorboard, overwrite=a.overwrite,
                  progress=not a.no_progress, dry_run=a.dry_run)
    return STOP.exit_status()


def cmd_compare(a: argparse.Namespace) -> int:
    compare_runs(a.runs, out=a.out, patience=a.patience)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    out = write_report(a.path, out=a.out, max_new_tokens=a.max_new_tokens, seed=a.seed,
                       log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- arguments of each subcommand


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device_id", default="cpu", help=f"where the model runs: {DEVICE_CHOICES} (as train's; "
                   "an unavailable device falls back to the CPU)")


def generate_args(g: argparse.ArgumentParser) -> None:
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
    g.add_argument("--precision", "--weights", dest="precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="weights for sampling: auto = bf16 where the hardware runs it fast (as training's autocast), "
                        "else fp32; int8 = the fused decoder with int8 weights, a scale per 32 inputs (Q8_0-like)")
    add_device_arg(g)
    g.add_argument("--decoder", choices=["auto", "fused", "torch"], default="auto",
                   help="Transformer decode step: fused = one C call per token on a CPU (compiled at first use), "
                        "torch = PyTorch ops; auto = fused where it can serve the model")
    g.add_argument("--steer", action="append", default=[], metavar="SAE_DIR:FEATURE=SCALE",
                   help="add SCALE x the SAE feature's decoder row at its site at every position (repeatable; "
                        "decodes with --decoder torch)")


def eval_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("run", help="a run directory, or a folder: every run under it")
    e.add_argument("--input_files", nargs="+", default=None, help="evaluate on these files instead of the test split")
    e.add_argument("--batch_size", type=int, default=32)
    e.add_argument("--eval_batches", type=int, default=50)
    e.add_argument("--json", default=None)
    e.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: the precision the run trained in (its --precision, resolved for this machine)")
    e.add_argument("--weights", choices=["model", "int8"], default="model",
                   help="int8: score the Transformer as `generate --weights int8` computes it, its matmul weights and "
                        "their inputs rounded to int8 (the test-loss cost of int8)")
    add_device_arg(e)


def attention_args(at: argparse.ArgumentParser) -> None:
    at.add_argument("run")
    at.add_argument("--prompt", default=None, help="default: the run's training prompt")
    at.add_argument("--layer", type=int, default=0)
    at.add_argument("--heads", default="all", help="all | 0-3 | 0,2,5")
    at.add_argument("--all", action="store_true", help="every layer and head: a layer x head grid")
    at.add_argument("--out", default="attention.png", help="the figure: .png, .pdf or .svg")
    at.add_argument("--json", default=None, help="also write tokens, weights and scores as JSON")
    at.add_argument("--seed", type=int, default=0, help="seed of the random sequences scored for induction")
    add_device_arg(at)


def lens_args(ln: argparse.ArgumentParser) -> None:
    ln.add_argument("run")
    ln.add_argument("--prompt", default=None, help="default: the run's training prompt")
    ln.add_argument("--out", default="lens.png", help="the figure: .png, .pdf or .svg")
    ln.add_argument("--json", default=None, help="also write every layer's top tokens, ranks and probabilities as JSON")
    add_device_arg(ln)


def patch_args(pa: argparse.ArgumentParser) -> None:
    pa.add_argument("run")
    pa.add_argument("--clean", required=True, help="the prompt whose activations are patched in")
    pa.add_argument("--corrupt", required=True, help="the prompt run with patches (same token length as --clean)")
    pa.add_argument("--target", default=None, help="one token; default: the clean run's top next token")
    pa.add_argument("--out", default="patching.png", help="the figure: .png, .pdf or .svg")
    pa.add_argument("--json", default=None, help="also write every site's scores as JSON")
    add_device_arg(pa)


def neighbors_args(nb: argparse.ArgumentParser) -> None:
    nb.add_argument("run")
    nb.add_argument("--tokens", default=None, help="comma-separated token texts, e.g. Lily,dog,7")
    nb.add_argument("--k", type=int, default=8, help="neighbours per token")
    nb.add_argument("--clusters", type=int, default=None, metavar="K", help="k-means with K clusters")
    nb.add_argument("--text", default=None, help="with --clusters: cluster this text's hidden states, not embeddings")
    nb.add_argument("--top", type=int, default=10, help="tokens listed per cluster")
    nb.add_argument("--seed", type=int, default=0)
    add_device_arg(nb)


def data_args(d: argparse.ArgumentParser) -> None:
    actions = d.add_subparsers(dest="action", required=True, parser_class=Parser)
    numbers = actions.add_parser("numbers", help="write the built-in numeric corpus to a file")
    numbers.add_argument("--out", required=True)
    numbers.add_argument("--count", type=int, default=3333)
    numbers.add_argument("--seed", type=int, default=0)
    prepare = actions.add_parser("prepare", help="split, tokenize and cache the data that train's data flags name; "
                                                 "print where it is")
    add_train_arguments(prepare, only=DATA_FLAGS)
    actions.add_parser("info", help="what is in the prepared-data cache: sizes, token counts, tokens per byte")


def export_args(x: argparse.ArgumentParser) -> None:
    x.add_argument("run")
    x.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a transformers directory (LlamaForCausalLM or GPT2LMHeadModel); "
                        "gguf: one file for llama.cpp, Ollama and LM Studio (Llama-style runs)")
    x.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf)")
    x.add_argument("--dtype", choices=list(GGUF_DTYPES), default=None,
                   help="gguf weights: f32 (default), f16, or q8_0 (llama.cpp's 8-bit blocks)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")


def serve_args(sv: argparse.ArgumentParser) -> None:
    sv.add_argument("runs", nargs="+", metavar="RUN", help="run directories (a folder of runs: every run inside); "
                    "requests name each by its folder name")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    sv.add_argument("--max_active", type=int, default=8,
                    help="requests decoded at once, a token each in turn; the rest wait in arrival order")
    sv.add_argument("--max_tokens_limit", type=int, default=1024, help="the largest max_tokens a request may ask")
    sv.add_argument("--chat_template", default=None, metavar="FILE.json",
                    help="the chat layout: a JSON object with system/user/assistant/generation/stop "
                         "(default: 'User: ...' / 'Assistant: ...' lines; see picollm/serve/protocol.py)")
    sv.add_argument("--precision", "--weights", dest="precision", choices=["auto", "fp32", "bf16", "int8"],
                    default="auto", help="weights for sampling, as generate's")
    sv.add_argument("--decoder", choices=["auto", "fused", "torch"], default="auto", help="as generate's")
    add_device_arg(sv)


def bench_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs (a minute or two)")
    b.add_argument("--json", default=None, help="also write the results here")
    b.add_argument("--device_id", default="cpu")
    b.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (ours; the reference is fp32)")
    b.add_argument("--compile", action="store_true", help="torch.compile the Transformer")


def sweep_args(sw: argparse.ArgumentParser) -> None:
    sw.add_argument("spec", help="a sweep spec, e.g. sweeps/pos_emb.toml")
    sw.add_argument("--output_dir", default="runs", help="the sweep goes to OUTPUT_DIR/<spec name>/")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a [base] flag, e.g. --set max_steps_per_epoch=500 (repeatable)")
    sw.add_argument("--tensorboard", action="store_true", help="TensorBoard event files in every run")
    sw.add_argument("--overwrite", action="store_true", help="retrain every point, finished or not")
    sw.add_argument("--dry_run", action="store_true", help="validate, list the points and their state; train nothing")
    sw.add_argument("--no_progress", action="store_true", help="no progress bars")


def compare_args(cp: argparse.ArgumentParser) -> None:
    cp.add_argument("runs", nargs="+", metavar="RUN", help="run directories (any other directory: every run under it)")
    cp.add_argument("--out", default=None, help="directory for compare.md and compare.png (default: the runs' parent)")
    cp.add_argument("--patience", type=int, default=3,
                    help="consecutive rising test-loss evaluations (with falling train loss) that flag overfitting")


def report_args(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("path", metavar="RUN_OR_SWEEP")
    rp.add_argument("--out", default=None, help="the HTML file (default: RUN_OR_SWEEP/report.html)")
    rp.add_argument("--max_new_tokens", type=int, default=40, help="length of the samples")
    rp.add_argument("--seed", type=int, default=0, help="sampling seed")


def sae_args(s: argparse.ArgumentParser) -> None:
    actions = s.add_subparsers(dest="action", required=True, parser_class=Parser)
    for name, module, help_text in (
            ("train", sae_train, "train a sparse autoencoder on a hook point's activations over the run's data"),
            ("report", sae_report, "an HTML page of an SAE's metrics and its top features' contexts")):
        sub = actions.add_parser(name, help=help_text)
        module.add_args(sub)
        sub.set_defaults(sae_run=module.run)


def cmd_sae(a: argparse.Namespace) -> int:
    return a.sae_run(a)


def course_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--quick", action="store_true", help="tiny models and few steps: a few minutes on 2 CPU cores")
    c.add_argument("--data", nargs="+", default=["numbers"], metavar="numbers|tinystories|FILE",
                   help="the corpus: the built-in numbers (default), tinystories (with --tinystories_path), or "
                        "your text files (which also run the custom-corpus part)")
    c.add_argument("--tinystories_path", default=None,
                   help="a local TinyStories .txt/.parquet/.jsonl: the LSTM sanity check also runs on it")
    c.add_argument("--output_dir", default="course", help="every part's runs and the report course.html go here")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a train flag for every run and sweep point, e.g. --set device_id=cuda (repeatable)")
    c.add_argument("--only", default=None, help="comma-separated parts to run (default: all), e.g. lstm,topp")


def cmd_course(a: argparse.Namespace) -> int:
    with STOP:
        run_course(a.output_dir, quick=a.quick, data=a.data, tinystories_path=a.tinystories_path,
                   sets=tuple(a.set), only=a.only.split(",") if a.only else None, run=main,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    return STOP.exit_status()


# --------------------------------------------------------------------------- the table

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: tuple[Command, ...] = (
    ("train", "train one or several models", add_train_arguments, cmd_train),
    ("generate", "sample from a trained run", generate_args, cmd_generate),
    ("eval", "test loss, perplexity, bits per byte, continuation accuracy", eval_args, cmd_eval),
    ("attention", "attention heat-maps of a layer's heads on a prompt; per-head scores", attention_args, cmd_attention),
    ("lens", "the logit lens: each layer's residual stream read through the final norm and head", lens_args, cmd_lens),
    ("patch", "activation patching: clean activations into a corrupt run, per layer, position and head",
     patch_args, cmd_patch),
    ("neighbors", "nearest tokens in embedding space; k-means clusters", neighbors_args, cmd_neighbors),
    ("data", "prepare data once (data prepare), see what is cached (data info), write a built-in corpus",
     data_args, cmd_data),
    ("export", "write a Transformer run as a Hugging Face transformers model or a GGUF file", export_args, cmd_export),
    ("serve", "an OpenAI-compatible HTTP server (completions, chat, streaming) with a playground page at /",
     serve_args, cmd_serve),
    ("bench", "speed: training tokens/s and MFU, generation, k-gram, tokenizer", bench_args, cmd_bench),
    ("sweep", "train one run per point of a grid / list over train flags (TOML spec)", sweep_args, cmd_sweep),
    ("compare", "overlaid loss curves and a table of runs; early-stopping and overfitting", compare_args, cmd_compare),
    ("report", "one self-contained HTML page for a run or a sweep", report_args, cmd_report),
    ("sae", "sparse autoencoders: sae train (on a hook point), sae report (features, contexts)", sae_args, cmd_sae),
    ("course", "every question of the pico-llm course, run in order, in one HTML report", course_args, cmd_course),
)


def package_version() -> str:
    try:
        return importlib.metadata.version("picollm")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return __version__


def build_parser() -> Parser:
    """The command line; `p.commands` maps each command name to its parser."""
    p = Parser(prog="pico-llm", description="A laboratory for tiny language models.")
    p.add_argument("--version", action="version", version=f"pico-llm {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, help_text, add_args, handler in COMMANDS:
        add_args(sub.add_parser(name, help=help_text))
        sub.choices[name].set_defaults(func=handler)
    p.commands = sub.choices
    return p


def check_command(word: str) -> None:
    """A first word that names no command: one line, with the closest command if one is close."""
    names = [c[0] for c in COMMANDS]
    if word.startswith("-") or word in names:
        return
    close = difflib.get_close_matches(word, names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "choose from: " + ", ".join(names)
    raise PicoError(f"unknown command {word!r}; {hint}")


def run_cli(fn: Callable[[], int]) -> int:
    """Runs a command; a PicoError becomes one line on stderr and exit status 2."""
    enable_transparent_huge_pages()
    try:
        return fn()
    except PicoError as e:
        rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"  # under torchrun
        print(f"error: {e}" if rank == "0" else f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training step, or a second signal
        print(f"interrupted ({STOP.name or 'SIGINT'})", file=sys.stderr)
        return STOP.exit_status(130)


def main(argv: Optional[list[str]] = None) -> int:
    def go() -> int:
        words, parser = sys.argv[1:] if argv is None else list(argv), build_parser()
        if not words:  # the usage and the list of commands
            parser.print_help(sys.stderr)
            return 2
        check_command(words[0])
        args, extra = parser.parse_known_args(words)
        if extra:  # named by the command's parser, which knows its flags
            parser.commands[args.command].unrecognized(extra)
        return args.func(args)

    return run_cli(go)


def classic_main(argv: Optional[list[str]] = None) -> int:
    """The course starter's command line: same flags, same meanings, same defaults where they run here."""

    def go() -> int:
        p = Parser(prog="pico-llm.py", description="Train k-gram / LSTM / Transformer models (classic flags).")
        add_train_arguments(p)
        p.add_argument("--monosemantic_enabled", action="store_true", default=False)
        args = complete(p.parse_args(argv), CLASSIC_DEFAULTS)
        if args.run_name is None:
            args.run_name = time.strftime("classic-%Y%m%d-%H%M%S")
        try:
            with STOP:
                train_from_flags(args)
        finally:
            teardown_distributed()
        if STOP.requested:
            return STOP.exit_status()
        if args.monosemantic_enabled:  # the starter's stub: each generated token with its embedding neighbours
            root = args.resume or os.path.join(args.output_dir, args.run_name)
            names = [] if args.resume else parse_models(args.models)
            for run in [root] if len(names) <= 1 else [os.path.join(root, m) for m in names]:
                print(monosemantic_report(run))
        return 0

    return run_cli(go)
