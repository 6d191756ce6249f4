"""`pico-llm course`: every question of the pico-llm course project, run in order and written up in one
self-contained HTML report.

Each part is a list of ordinary pico-llm command lines (train, sweep, generate, attention, neighbors,
sae), run one after the other through the same command line a student types, into OUTPUT_DIR/<part>/;
the report shows those command lines, the figures and tables they wrote, and a reading generated from the
measured numbers alone (a function of the numbers: change them and the reading changes). A rerun skips
every run that is finished (its summary.json is there) and resumes sweeps where they stopped. A part
whose data is missing (TinyStories without a local copy, a custom corpus without --data FILE) is skipped
with the reason, and the others still run.

    quick   tiny models and a few hundred steps: the whole course in a few minutes on 2 CPU cores
    full    (no --quick) larger runs, about half an hour here; --set KEY=VALUE (repeatable) overrides a
            train flag of every run and sweep point, e.g. --set embed_size=256 --set device_id=cuda
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import checkpoint as ckpt
from ..config import SampleConfig
from ..errors import PicoError
from ..fsio import write_json, write_text
from ..pages import esc, png_data_uri, visible
from ..sampling import generate
from .compare import run_stats
from .report import CSS, _figure
from .sweep import _cell, parse_override, read_sweep, result_columns, results

REPORT = "course.html"
Runner = Callable[[list[str]], int]  # runs one pico-llm command line (the CLI's main), returns its status


# ----------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    """What --quick changes: corpus, model and steps."""

    numbers: int
    block: int
    embed: int
    steps: int  # steps per epoch
    epochs: int
    eval_interval: int
    vocab: int = 512


QUICK = Sizes(numbers=5000, block=32, embed=32, steps=120, epochs=4, eval_interval=40)
FULL = Sizes(numbers=20000, block=64, embed=64, steps=400, epochs=8, eval_interval=100)


@dataclass
class Course:
    out: str
    quick: bool
    data: list[str]  # ["numbers"], ["tinystories"] or files
    tinystories_path: Optional[str]
    sets: list[str]
    run: Runner
    log: Callable[[str], None] = print
    outputs: dict = field(default_factory=dict)  # command line -> its printed output

    @property
    def sizes(self) -> Sizes:
        return QUICK if self.quick else FULL

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    # -- the flags every run gets

    def data_flags(self, which: Optional[str] = None) -> list[str]:
        which = which or self.data_kind
        z = self.sizes
        if which == "numbers":
            return ["--dataset", "numbers", "--numbers_count", str(z.numbers), "--vocab_size", str(z.vocab)]
        if which == "tinystories":
            return ["--tinystories_path", self.tinystories_path, "--tinystories_weight", "1",
                    "--tinystories_subset", str(z.numbers), "--vocab_size", "2048"]
        return ["--input_files", *self.data, "--vocab_size", "2048"]

    @property
    def data_kind(self) -> str:
        return self.data[0] if self.data[0] in ("numbers", "tinystories") else "files"

    def common(self) -> list[str]:
        z = self.sizes
        return ["--block_size", str(z.block), "--embed_size", str(z.embed), "--epochs", str(z.epochs),
                "--max_steps_per_epoch", str(z.steps), "--eval_interval", str(z.eval_interval), "--batch_size", "32",
                "--no_progress"]

    def overrides(self) -> list[str]:
        """--set KEY=VALUE as train flags (later flags win over earlier ones)."""
        out = []
        for item in self.sets:
            key, value = parse_override(item)
            if isinstance(value, bool):
                value = str(value).lower()
            out += [f"--{key}", str(value)]
        return out

    def prompt(self) -> str:
        return "0 1 2 3 4" if self.data_kind == "numbers" else "Once upon a"

    def train(self, part: str, name: str, *flags: str, data: Optional[str] = None) -> list[str]:
        """The train command line: data and size flags, then the part's own (which win), then --set's."""
        merged = _flag_pairs([*self.data_flags(data), *self.common(), "--prompt", self.prompt(), *flags,
                              *self.overrides()])
        argv = ["train"]
        for k, v in merged.items():
            argv += [f"--{k}"] if v is True else [f"--{k}", *(v if isinstance(v, list) else [str(v)])]
        return argv + ["--output_dir", self.path(part), "--run_name", name]

    def sweep(self, part: str, name: str, description: str, grid: dict, base: Optional[dict] = None) -> list[str]:
        """A sweep spec written into the course folder (a student can rerun or edit it), and its command."""
        flags = self.train(part, "x")[1:-4]  # the train flags, without --output_dir/--run_name
        lines = [f'name = "{name}"', f'description = "{description}"', "", "[base]"]
        base_flags = _flag_pairs(flags) | (base or {})
        base_flags.pop("no_progress", None)
        for k, v in base_flags.items():
            lines.append(f"{k} = {_toml(v)}")
        lines += ["", "[grid]"] + [f"{k} = [{', '.join(_toml(v) for v in vs)}]" for k, vs in grid.items()]
        spec = self.path("specs", f"{name}.toml")
        os.makedirs(os.path.dirname(spec), exist_ok=True)
        write_text(spec, "\n".join(lines) + "\n")
        return ["sweep", spec, "--output_dir", self.path(part), "--no_progress"]


def _number(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _flag_pairs(argv: list[str]) -> dict:
    """--key value ... -> {key: value}, a later flag replacing an earlier one: a flag with no value is True,
    one with several (--input_files a b) a list; numbers stay numbers."""
    out, i = {}, 0
    while i < len(argv):
        key, j = argv[i][2:], i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        values = [_number(v) for v in argv[i + 1:j]]
        out.pop(key, None)  # re-inserted: the order of the flags as last given
        out[key] = True if not values else values[0] if len(values) == 1 else values
        i = j
    return out


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


# ----------------------------------------------------------------------------- parts


@dataclass
class Part:
    key: str
    title: str
    question: str
    commands: Callable[[Course], list[list[str]]]
    measure: Callable[[Course], dict]  # the numbers the reading and tables use, from the files written
    reading: Callable[[dict], str]  # a function of those numbers alone
    figures: Callable[[Course], list[tuple[str, str]]] = lambda c: []  # (png path, caption)
    tables: Callable[[Course, dict], list[tuple[str, list[str], list[list[str]]]]] = lambda c, m: []
    skip: Callable[[Course], Optional[str]] = lambda c: None  # why the part cannot run here, or None


def _f(x, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _records(run: str) -> list[dict]:
    return ckpt.read_metrics(run) if os.path.isfile(os.path.join(run, "metrics.jsonl")) else []


def _evals(run: str) -> list[tuple[int, float]]:
    return [(r["step"], r["test_loss"]) for r in _records(run) if r.get("test_loss") is not None]


def _summary(run: str) -> dict:
    return ckpt.read_summary(run) if os.path.isfile(os.path.join(run, ckpt.SUMMARY)) else {}


def _run_numbers(run: str) -> dict:
    s, ev = _summary(run), _evals(run)
    return {"first_step": ev[0][0] if ev else None, "first_test": ev[0][1] if ev else None,
            "last_step": ev[-1][0] if ev else None, "test_loss": s.get("test_loss"), "train_loss": s.get("train_loss"),
            "bits_per_byte": s.get("bits_per_byte"), "accuracy": s.get("continuation_accuracy"),
            "params": s.get("params")}


def _sweep_rows(root: str) -> list[dict]:
    meta = read_sweep(root) if os.path.isdir(root) else None
    return results(root, meta) if meta else []


def _sweep_table(root: str) -> list[tuple[str, list[str], list[list[str]]]]:
    meta = read_sweep(root) if os.path.isdir(root) else None
    if not meta:
        return []
    rows = results(root, meta)
    cols = result_columns(rows, meta["swept"])
    return [("sweep results", [c.replace("_", " ") for c in cols], [[_cell(c, r.get(c)) for c in cols] for r in rows])]


def _sweep_figures(root: str) -> list[tuple[str, str]]:
    if not os.path.isdir(root):
        return []
    return [(os.path.join(root, f), f.replace("_", " ").removesuffix(".png"))
            for f in sorted(os.listdir(root)) if f.endswith(".png")]


def _best_worst(rows: list[dict], key: str) -> dict:
    scored = [r for r in rows if r.get("test_loss") is not None and math.isfinite(r["test_loss"])]
    if not scored:
        return {"key": key, "points": 0}
    best, worst = min(scored, key=lambda r: r["test_loss"]), max(scored, key=lambda r: r["test_loss"])
    return {"key": key, "points": len(scored), "best": best.get(key), "best_loss": best["test_loss"],
            "worst": worst.get(key), "worst_loss": worst["test_loss"]}


def _best_worst_reading(m: dict, what: str) -> str:
    if not m.get("points"):
        return f"No point of the {what} sweep finished."
    if m["points"] == 1:
        return f"Only one point finished ({m['key']} = {m['best']}, test loss {_f(m['best_loss'])})."
    return (f"Test loss is lowest at {m['key']} = {m['best']} ({_f(m['best_loss'])}) and highest at "
            f"{m['key']} = {m['worst']} ({_f(m['worst_loss'])}), {_f(m['worst_loss'] - m['best_loss'])} nats apart.")


# -- 1. the starter LSTM


def lstm_commands(c: Course) -> list[list[str]]:
    cmds = [c.train("lstm", "numbers", "--models", "lstm", data="numbers")]
    if c.tinystories_path:
        cmds.append(c.train("lstm", "tinystories", "--models", "lstm", data="tinystories"))
    return cmds


def lstm_measure(c: Course) -> dict:
    out = {"numbers": _run_numbers(c.path("lstm", "numbers"))}
    if c.tinystories_path:
        out["tinystories"] = _run_numbers(c.path("lstm", "tinystories"))
    return out


def lstm_reading(m: dict) -> str:
    parts = []
    for name, label in (("numbers", "the numeric corpus"), ("tinystories", "TinyStories")):
        r = m.get(name)
        if not r or r["test_loss"] is None:
            continue
        falls = r["first_test"] is not None and r["test_loss"] < r["first_test"]
        text = (f"On {label} the LSTM's test loss went from {_f(r['first_test'])} at step {r['first_step']} to "
                f"{_f(r['test_loss'])} at step {r['last_step']} ({_f(r['bits_per_byte'])} bits per byte): "
                + ("it learns." if falls else "it did not fall: check the learning rate and data."))
        if r.get("accuracy") is not None:
            text += f" It continues {_f(100 * r['accuracy'], '{:.1f}')}% of held-out sequences correctly."
        parts.append(text)
    if "tinystories" not in m:
        parts.append("TinyStories was skipped: no local copy (--tinystories_path FILE).")
    return " ".join(parts) or "The LSTM run did not finish."


# -- 2. k-gram one-hot vs embedding


def kgram_commands(c: Course) -> list[list[str]]:
    return [c.sweep("kgram", "kgram_variants", "the k-gram MLP with one-hot vs embedding inputs",
                    {"kgram_variant": ["onehot", "embedding"]}, {"models": "kgram"})]


def kgram_measure(c: Course) -> dict:
    rows = {r["kgram_variant"]: r for r in _sweep_rows(c.path("kgram", "kgram_variants"))}
    return {v: {"test_loss": r.get("test_loss"), "params": r.get("params")} for v, r in rows.items()}


def kgram_reading(m: dict) -> str:
    if not {"onehot", "embedding"} <= set(m):
        return "The k-gram sweep did not finish both variants."
    o, e = m["onehot"], m["embedding"]
    better = "embedding" if e["test_loss"] < o["test_loss"] else "one-hot"
    return (f"One-hot inputs: test loss {_f(o['test_loss'])} with {o['params']:,} parameters; embedding inputs: "
            f"{_f(e['test_loss'])} with {e['params']:,}. The {better} variant is lower by "
            f"{_f(abs(o['test_loss'] - e['test_loss']))} nats, and the one-hot model holds "
            f"{o['params'] / max(1, e['params']):.1f}x the parameters (its first layer reads k x vocabulary inputs).")


# -- 3. the RMSNorm Transformer with a KV cache


def transformer_commands(c: Course) -> list[list[str]]:
    run = c.path("transformer", "rmsnorm")
    return [c.train("transformer", "rmsnorm", "--models", "transformer", "--norm", "rmsnorm"),
            ["generate", run, "--greedy", "--max_new_tokens", "24"]]


def kv_cache_check(run: str, prompt_text: str) -> dict:
    """Greedy decoding with the KV cache against recomputing the whole prefix per token, up to the context
    (past it, generate slides its window differently): the tokens and the time of each, measured here."""
    model, tok, (mcfg, _, _) = ckpt.load_run(run)
    prompt = torch.tensor([tok.encode(prompt_text)[: mcfg.block_size // 2] or [tok.eot_id]])
    n_new = mcfg.block_size - prompt.size(1)
    cfg = SampleConfig(max_new_tokens=n_new, greedy=True)
    t0 = time.perf_counter()
    cached = generate(model, prompt, cfg, decoder="torch")
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = prompt
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model(idx[:, -mcfg.block_size:])[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat((idx, nxt), 1)
    t_full = time.perf_counter() - t0
    same = int((cached[0, prompt.size(1):] == idx[0, prompt.size(1):]).sum())
    return {"tokens": n_new, "same": same, "cache_tok_s": n_new / t_cache, "recompute_tok_s": n_new / t_full}


def transformer_measure(c: Course) -> dict:
    run = c.path("transformer", "rmsnorm")
    out = _run_numbers(run)
    if out["test_loss"] is not None:
        out["kv"] = kv_cache_check(run, c.prompt())
    return out


def transformer_reading(m: dict) -> str:
    if m.get("test_loss") is None:
        return "The Transformer run did not finish."
    text = (f"The RMSNorm Transformer reached test loss {_f(m['test_loss'])} ({_f(m['bits_per_byte'])} bits per "
            f"byte) after {m['last_step']} steps, from {_f(m['first_test'])} at step {m['first_step']}.")
    kv = m.get("kv")
    if kv:
        agree = "the same" if kv["same"] == kv["tokens"] else f"{kv['same']} of {kv['tokens']} equal"
        text += (f" Greedy decoding with the KV cache gave {agree} tokens as recomputing the whole prefix for "
                 f"each of {kv['tokens']} tokens (up to the context), at {kv['cache_tok_s']:,.0f} tokens/s against "
                 f"{kv['recompute_tok_s']:,.0f} ({kv['cache_tok_s'] / kv['recompute_tok_s']:.1f}x).")
    return text


# -- 4. nucleus sampling


TOP_P = "greedy,0.2,0.5,0.95,1.0"


def topp_commands(c: Course) -> list[list[str]]:
    return [["generate", c.path("transformer", "rmsnorm"), "--compare_p", TOP_P, "--num_samples", "3",
             "--max_new_tokens", "30", "--seed", "0"]]


def _md_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [x.strip().replace("\\|", "|") for x in line.strip().strip("|").split(" | ")]
            rows.append(cells)
    return rows[1:]  # without the header


def topp_measure(c: Course) -> dict:
    out = c.outputs.get(shlex.join(topp_commands(c)[0]), "")
    per: dict[str, list[str]] = {}
    for setting, sample in _md_rows(out):
        per.setdefault(setting, []).append(sample)
    stats = {}
    for setting, samples in per.items():
        words = [w for s in samples for w in s.split()]
        stats[setting] = {"samples": len(samples), "words": len(words),
                          "distinct": len(set(words)) / max(1, len(words))}
    return {"settings": stats, "samples": per}


def topp_reading(m: dict) -> str:
    s = m.get("settings", {})
    if not s:
        return "No samples were drawn (the Transformer run did not finish)."
    parts = [f"{k}: {100 * v['distinct']:.0f}% distinct words" for k, v in s.items()]
    low, high = min(s, key=lambda k: s[k]["distinct"]), max(s, key=lambda k: s[k]["distinct"])
    shares = [v["distinct"] for v in s.values()]  # in the table's order: greedy, then p rising
    trend = ("rises with p at every step" if all(a <= b for a, b in zip(shares, shares[1:]))
             else "does not rise steadily with p here")
    return (f"Share of distinct words among each setting's samples — {'; '.join(parts)}. The least varied is "
            f"{low}, the most {high}; the share {trend}.")


def topp_tables(c: Course, m: dict):
    rows = [[k, str(len(v)), *[" / ".join(v)]] for k, v in m.get("samples", {}).items()]
    stats = [[k, str(v["words"]), f"{100 * v['distinct']:.0f}%"] for k, v in m.get("settings", {}).items()]
    return [("samples at each top-p", ["setting", "samples", "text"], rows),
            ("distinct words", ["setting", "words", "distinct"], stats)]


# -- 5. a custom corpus


def custom_skip(c: Course) -> Optional[str]:
    return None if c.data_kind == "files" else "no custom corpus: give --data FILE [FILE ...] to train on your text"


def custom_commands(c: Course) -> list[list[str]]:
    return [c.train("custom", "transformer", "--models", "transformer")]


def custom_measure(c: Course) -> dict:
    return _run_numbers(c.path("custom", "transformer"))


def custom_reading(m: dict) -> str:
    if m.get("test_loss") is None:
        return "The run on the custom corpus did not finish."
    return (f"On your corpus the Transformer reached test loss {_f(m['test_loss'])}, {_f(m['bits_per_byte'])} bits "
            f"per byte (bits per byte compare across tokenizers), from {_f(m['first_test'])} at step "
            f"{m['first_step']}.")


# -- 6. overfitting vs underfitting


def fit_commands(c: Course) -> list[list[str]]:
    z = c.sizes
    return [c.train("fit", "overfit", "--models", "transformer", "--numbers_count", str(max(100, z.numbers // 30)),
                    "--embed_size", str(2 * z.embed), "--n_blocks", "3", "--epochs", str(60 * z.epochs),
                    "--eval_interval", str(max(5, z.eval_interval // 4)), "--learning_rate", "3e-3",
                    "--weight_decay", "0"),
            c.train("fit", "underfit", "--models", "transformer", "--embed_size", "8", "--n_blocks", "1",
                    "--n_heads", "1", "--learning_rate", "3e-4")]


def fit_measure(c: Course) -> dict:
    out = {}
    for name in ("overfit", "underfit"):
        recs = _records(c.path("fit", name))
        st = run_stats(recs) if recs else {}
        out[name] = {k: st.get(k) for k in ("best_step", "best_test_loss", "test_loss", "train_loss", "gap")}
        out[name]["overfitting"] = st.get("overfitting")
    return out


def _gap(g) -> str:
    return "n/a from" if g is None else f"{_f(abs(g))} {'above' if g >= 0 else 'below'}"


def fit_reading(m: dict) -> str:
    parts = []
    o = m.get("overfit", {})
    if o.get("test_loss") is not None:
        span = o.get("overfitting")
        if span:
            parts.append(f"Small data, large model: the test loss rises for {span['rises']} evaluations in a row "
                         f"(steps {span['from_step']} to {span['to_step']}, up {_f(span['test_rise'])}) while the train "
                         f"loss falls by {_f(span['train_fall'])}: overfitting. Its lowest test loss is "
                         f"{_f(o['best_test_loss'])} at step {o['best_step']}; it ends at {_f(o['test_loss'])}, "
                         f"{_gap(o['gap'])} the train loss.")
        else:
            parts.append(f"Small data, large model: the test loss ended at {_f(o['test_loss'])}, {_gap(o['gap'])} "
                         "the train loss, with no sustained rise: no overfitting detected at this length (train "
                         "longer, or use fewer documents).")
    u = m.get("underfit", {})
    if u.get("test_loss") is not None:
        parts.append(f"A tiny model at a low learning rate ends at train loss {_f(u['train_loss'])} and test loss "
                     f"{_f(u['test_loss'])} ({_gap(u['gap'])} the train loss): both stay high and close, "
                     "underfitting.")
    return " ".join(parts) or "The fitting runs did not finish."


# -- 7-10. sweeps


def _sweep_part(key: str, name: str, description: str, grid: dict, swept: str, what: str,
                base: Optional[dict] = None) -> dict:
    return dict(commands=lambda c: [c.sweep(key, name, description, grid, {"models": "transformer", **(base or {})})],
                measure=lambda c: _best_worst(_sweep_rows(c.path(key, name)), swept),
                reading=lambda m: _best_worst_reading(m, what),
                figures=lambda c: _sweep_figures(c.path(key, name)),
                tables=lambda c, m: _sweep_table(c.path(key, name)))


def hyper_commands(c: Course) -> list[list[str]]:
    z = c.sizes
    return [c.sweep("hyper", "embed_size", "embedding size", {"embed_size": [z.embed // 2, z.embed, 2 * z.embed]},
                    {"models": "transformer"}),
            c.sweep("hyper", "learning_rate", "learning rate", {"learning_rate": [3e-4, 3e-3, 3e-2]},
                    {"models": "transformer"}),
            c.sweep("hyper", "depth_heads", "depth and heads", {"n_blocks": [1, 2], "n_heads": [1, 4]},
                    {"models": "transformer"})]


def hyper_measure(c: Course) -> dict:
    return {key: _best_worst(_sweep_rows(c.path("hyper", name)), key)
            for key, name in (("embed_size", "embed_size"), ("learning_rate", "learning_rate"),
                              ("n_blocks", "depth_heads"))}


def hyper_reading(m: dict) -> str:
    return " ".join(f"{label}: {_best_worst_reading(m[key], label)}" for key, label in
                    (("embed_size", "Embedding size"), ("learning_rate", "Learning rate"),
                     ("n_blocks", "Depth (with 1 or 4 heads)")) if key in m)


def hyper_figures(c: Course) -> list[tuple[str, str]]:
    return [f for name in ("embed_size", "learning_rate", "depth_heads") for f in _sweep_figures(c.path("hyper", name))]


def hyper_tables(c: Course, m: dict):
    return [(f"{name}: {t[0]}", t[1], t[2]) for name in ("embed_size", "learning_rate", "depth_heads")
            for t in _sweep_table(c.path("hyper", name))]


# -- 11. attention heads


def heads_commands(c: Course) -> list[list[str]]:
    run = c.path("transformer", "rmsnorm")
    return [["attention", run, "--all", "--out", c.path("heads", "attention.png"),
             "--json", c.path("heads", "attention.json")]]


def heads_measure(c: Course) -> dict:
    p = c.path("heads", "attention.json")
    if not os.path.isfile(p):
        return {}
    with open(p) as f:
        scores = json.load(f).get("scores", [])
    rows = [r for r in scores if r.get("prev_token") is not None]
    if not rows:
        return {}
    prev = max(rows, key=lambda r: r["prev_token"])
    ind = [r for r in rows if r.get("induction") is not None]
    out = {"heads": len(rows), "prev_layer": prev["layer"], "prev_head": prev["head"], "prev": prev["prev_token"]}
    if ind:
        best = max(ind, key=lambda r: r["induction"])
        out.update(ind_layer=best["layer"], ind_head=best["head"], induction=best["induction"])
    return out


def heads_reading(m: dict) -> str:
    if not m:
        return "No attention scores were written."
    text = (f"Of {m['heads']} heads, layer {m['prev_layer']} head {m['prev_head']} puts the most weight on the "
            f"previous token: {_f(m['prev'], '{:.2f}')} of its attention on average.")
    if m.get("induction") is not None:
        text += (f" The strongest induction score (attending to the token after an earlier copy of the current "
                 f"one, on repeated random sequences) is layer {m['ind_layer']} head {m['ind_head']}, "
                 f"{_f(m['induction'], '{:.2f}')}.")
    return text


# -- 13. monosemantic: embedding neighbours


def neighbor_commands(c: Course) -> list[list[str]]:
    tokens = ["1", "2", "5", "10"] if c.data_kind == "numbers" else ["the", "cat", "happy", "ran"]
    return [["neighbors", c.path("transformer", "rmsnorm"), "--tokens", ",".join(tokens), "--k", "5"]]


def neighbor_measure(c: Course) -> dict:
    out = c.outputs.get(shlex.join(neighbor_commands(c)[0]), "")
    return {"lines": [line for line in out.splitlines() if line.strip()][:40]}


def neighbor_reading(m: dict) -> str:
    lines = m.get("lines", [])
    if not lines:
        return "No neighbours were computed."
    return (f"The neighbours table ({len(lines)} lines above) lists each token's nearest tokens by cosine similarity "
            "of the learned embeddings: tokens the model uses alike sit together.")


# -- 14. attention variants and 15. SAE features


def sae_commands(c: Course) -> list[list[str]]:
    run = c.path("transformer", "rmsnorm")
    sae = c.path("sae", "resid")
    tokens = "100000" if c.quick else "1000000"
    features = str(4 * c.sizes.embed)
    return [["sae", "train", run, "--site", "blocks.0.hook_resid_post", "--features", features, "--k", "8",
             "--tokens", tokens, "--batch_tokens", "1024", "--out", sae, "--no_progress"],
            ["sae", "report", sae, "--out", c.path("sae", "report.html")]]


def sae_measure(c: Course) -> dict:
    p = c.path("sae", "resid", "metrics.json")
    if not os.path.isfile(p):
        return {}
    with open(p) as f:
        m = json.load(f)
    keys = ("explained_variance", "ce_loss_recovered", "l0", "dead_fraction")
    return {k: m.get(k) for k in keys}


def sae_reading(m: dict) -> str:
    if not m:
        return "The sparse autoencoder did not finish."
    return (f"A sparse autoencoder on layer 0's residual stream explains {_f(m.get('explained_variance'), '{:.1%}')} "
            f"of its variance with {_f(m.get('l0'), '{:.1f}')} active features per token on average, and recovers "
            f"{_f(m.get('ce_loss_recovered'), '{:.1%}')} of the loss lost by zero-ablating the stream; "
            f"{_f(m.get('dead_fraction'), '{:.1%}')} of its features never fired. Its feature report (report.html "
            "in the part's folder) shows each feature's top contexts.")


def parts() -> list[Part]:
    return [
        Part("lstm", "1. Sanity check: the starter LSTM",
             "Does the starter LSTM learn, on the numeric '3seqs'-style corpus and on TinyStories?",
             lstm_commands, lstm_measure, lstm_reading,
             figures=lambda c: [(c.path("lstm", n, "loss.png"), f"LSTM on {n}") for n in ("numbers", "tinystories")]),
        Part("kgram", "2. The k-gram MLP: one-hot vs embedding inputs",
             "How do one-hot and embedding inputs of the k-gram MLP compare, in loss and in size?",
             kgram_commands, kgram_measure, kgram_reading,
             figures=lambda c: _sweep_figures(c.path("kgram", "kgram_variants")),
             tables=lambda c, m: _sweep_table(c.path("kgram", "kgram_variants"))),
        Part("transformer", "3. The RMSNorm Transformer with a KV cache",
             "Train a Transformer with RMSNorm; does decoding with a KV cache give what recomputation gives?",
             transformer_commands, transformer_measure, transformer_reading,
             figures=lambda c: [(c.path("transformer", "rmsnorm", "loss.png"), "RMSNorm Transformer")]),
        Part("topp", "4. Nucleus (top-p) sampling",
             "How do samples change with p, from greedy to p = 1.0?",
             topp_commands, topp_measure, topp_reading, tables=topp_tables),
        Part("custom", "5. Your own corpus", "What does the Transformer reach on a corpus of your choice?",
             custom_commands, custom_measure, custom_reading, skip=custom_skip,
             figures=lambda c: [(c.path("custom", "transformer", "loss.png"), "on your corpus")]),
        Part("fit", "6. Overfitting vs underfitting",
             "What do overfitting and underfitting look like in the loss curves?",
             fit_commands, fit_measure, fit_reading,
             figures=lambda c: [(c.path("fit", n, "loss.png"), n) for n in ("overfit", "underfit")]),
        Part("hyper", "7. Hyper-parameters: embedding size, depth and heads, learning rate",
             "Which embedding size, depth, number of heads and learning rate work best at this scale?",
             hyper_commands, hyper_measure, hyper_reading, figures=hyper_figures, tables=hyper_tables),
        Part("posemb", "8. Positional embeddings",
             "What do positional embeddings buy: none, learned, sinusoidal, rotary?",
             **_sweep_part("posemb", "pos_emb", "positional embeddings",
                           {"pos_emb": ["none", "learned", "sinusoidal", "rope"]}, "pos_emb", "positional-embedding")),
        Part("heads", "9. Attention heads",
             "What do the heads attend to? Previous-token and induction heads, and the heat-maps.",
             heads_commands, heads_measure, heads_reading,
             figures=lambda c: [(c.path("heads", "attention.png"), "attention of every head, every layer")]),
        Part("norm", "10. Pre-norm vs post-norm",
             "Where should the norm go: before each sublayer (pre) or after the residual sum (post)?",
             **_sweep_part("norm", "norm_placement", "pre- vs post-norm", {"norm_placement": ["pre", "post"]},
                           "norm_placement", "norm-placement")),
        Part("monosemantic", "11. Monosemantic analysis: embedding neighbours",
             "Which tokens does the model treat alike? Nearest neighbours in embedding space.",
             neighbor_commands, neighbor_measure, neighbor_reading,
             tables=lambda c, m: [("neighbours", ["output"], [[line] for line in m.get("lines", [])])]),
        Part("variants", "12. Newer attention: grouped-query and multi-query attention, sliding windows",
             "What do fewer key/value heads and a sliding window cost in loss?",
             **_sweep_part("variants", "attention", "MHA / GQA / MQA", {"n_kv_heads": [4, 2, 1]}, "n_kv_heads",
                           "key/value-head", base={"n_heads": 4})),
        Part("sae", "13. Sparse autoencoder features",
             "Can a sparse autoencoder split the residual stream into interpretable features?",
             sae_commands, sae_measure, sae_reading),
    ]


# ----------------------------------------------------------------------------- running


def _finished(argv: list[str]) -> bool:
    """A train command whose run is complete, or an SAE already written (in one rename): a rerun skips it."""
    if argv[0] == "train":
        flags = _flag_pairs(argv[1:])
        return os.path.isfile(os.path.join(str(flags["output_dir"]), str(flags["run_name"]), ckpt.SUMMARY))
    if argv[:2] == ["sae", "train"]:
        return os.path.isfile(os.path.join(argv[argv.index("--out") + 1], "metrics.json"))
    return False


def run_course(out: str = "course", quick: bool = False, data: Optional[list[str]] = None,
               tinystories_path: Optional[str] = None, sets: tuple[str, ...] = (), only: Optional[list[str]] = None,
               run: Optional[Runner] = None, log: Callable[[str], None] = print) -> str:
    """Runs every part (or those named in `only`), then writes OUT/course.html; returns its path."""
    data = data or ["numbers"]
    if data[0] == "tinystories" and not tinystories_path:
        raise PicoError("--data tinystories needs --tinystories_path FILE (a local copy: the hub is not reachable "
                        "offline)")
    if data[0] not in ("numbers", "tinystories"):
        missing = [f for f in data if not os.path.isfile(f)]
        if missing:
            raise PicoError(f"--data: {missing[0]} does not exist")
    if tinystories_path and not os.path.isfile(tinystories_path):
        raise PicoError(f"--tinystories_path {tinystories_path} does not exist")
    for item in sets:
        parse_override(item)
    all_parts = parts()
    if only:
        unknown = sorted(set(only) - {p.key for p in all_parts})
        if unknown:
            raise PicoError(f"--only: unknown part {unknown[0]!r}; parts: {', '.join(p.key for p in all_parts)}")
    if run is None:
        raise PicoError("run_course needs a runner (the command line's main)")
    c = Course(os.path.abspath(out), quick, data, tinystories_path and os.path.abspath(tinystories_path), list(sets), run,
               log)
    os.makedirs(c.out, exist_ok=True)
    sections, t_all = [], time.perf_counter()
    for p in all_parts:
        if only and p.key not in only:
            continue
        sections.append(_run_part(c, p))
    write_json(c.path("course.json"), {"quick": quick, "data": data, "sets": list(sets),
                                       "seconds": time.perf_counter() - t_all,
                                       "parts": [{k: v for k, v in s.items() if k != "html"} for s in sections]})
    page = c.path(REPORT)
    write_text(page, render(c, sections))
    log(f"course report: {page}")
    return page


def _run_part(c: Course, p: Part) -> dict:
    why = p.skip(c)
    if why:
        c.log(f"[{p.key}] skipped: {why}")
        return {"key": p.key, "title": p.title, "question": p.question, "skipped": why, "commands": [],
                "figures": [], "tables": [], "numbers": {}, "reading": ""}
    cmds = p.commands(c)
    os.makedirs(c.path(p.key), exist_ok=True)
    t0 = time.perf_counter()
    failures = []
    for argv in cmds:
        line = shlex.join(argv)
        if _finished(argv):
            c.log(f"[{p.key}] done already: pico-llm {line}")
            continue
        c.log(f"[{p.key}] pico-llm {line}")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            status = c.run(list(argv))
        c.outputs[line] = buf.getvalue()
        write_text(c.path(p.key, f"output-{len(c.outputs)}.txt"), buf.getvalue())
        if status != 0:
            failures.append(f"pico-llm {line} exited with {status}")
    for line in (shlex.join(a) for a in cmds):  # outputs of commands skipped on a rerun
        if line not in c.outputs and not line.startswith(("train ", "sae train ")):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                c.run(shlex.split(line))
            c.outputs[line] = buf.getvalue()
    numbers = p.measure(c)
    return {"key": p.key, "title": p.title, "question": p.question, "skipped": None,
            "commands": ["pico-llm " + shlex.join(a) for a in cmds], "failures": failures,
            "figures": [(f, cap) for f, cap in p.figures(c) if os.path.isfile(f)],
            "tables": p.tables(c, numbers), "numbers": numbers, "reading": p.reading(numbers),
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- the page


COURSE_CSS = CSS + """
.question { font-style: italic; color: var(--muted); }
pre.cmd { background:#1d2330; color:#e8ecf4; padding:10px 12px; border-radius:8px; overflow-x:auto; font-size:12.5px;
          white-space: pre-wrap; word-break: break-all; }
p.reading { background:#eef3ff; border-left:4px solid var(--accent); padding:10px 14px; border-radius:6px; }
p.skipped { background:#fff4e5; border-left:4px solid var(--warn); padding:10px 14px; border-radius:6px; }
nav ol { columns: 2; font-size: 14px; }
"""


def _png_file(path: str) -> str:
    """A PNG on disk as a data URI (pages.png_data_uri over the file's bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    return png_data_uri(lambda buf: buf.write(data))


def render(c: Course, sections: list[dict]) -> str:
    """The self-contained page: inline CSS, figures as data URIs, no script."""
    mode = "--quick" if c.quick else "full"
    h = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>pico-llm course</title>"
         f"<style>{COURSE_CSS}</style></head><body><main>",
         f"<header><h1>The pico-llm course</h1><div class='sub'>{esc(mode)} · data: {esc(' '.join(c.data))}"
         f"{' · --set ' + esc(' '.join(c.sets)) if c.sets else ''} · {esc(time.strftime('%Y-%m-%d %H:%M'))}</div>"
         "</header>", "<nav><ol>"]
    h += [f"<li><a href='#{s['key']}'>{esc(s['title'])}</a></li>" for s in sections]
    h.append("</ol></nav>")
    for s in sections:
        h.append(f"<section id='{s['key']}' class='part'><h2>{esc(s['title'])}</h2>"
                 f"<p class='question'>{esc(s['question'])}</p>")
        if s["skipped"]:
            h.append(f"<p class='skipped'>Skipped: {esc(s['skipped'])}</p></section>")
            continue
        h.append("<h3>commands</h3><pre class='cmd'>" + esc("\n".join(s["commands"])) + "</pre>")
        for failure in s.get("failures", []):
            h.append(f"<p class='skipped'>{esc(failure)}</p>")
        h.append(f"<h3>reading</h3><p class='reading'>{esc(s['reading'])}</p>")
        for caption, head, rows in s["tables"]:
            h.append(f"<h3>{esc(caption)}</h3><table><thead><tr>" + "".join(f"<th>{esc(x)}</th>" for x in head)
                     + "</tr></thead><tbody>")
            for r in rows:
                h.append("<tr>" + "".join(f"<td class='sample'>{visible(str(x))}</td>" for x in r) + "</tr>")
            h.append("</tbody></table>")
        for path, caption in s["figures"]:
            h.append(_figure(_png_file(path), caption))
        h.append("</section>")
    h.append("</main></body></html>")
    return "\n".join(h)
