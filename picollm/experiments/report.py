"""`pico-llm report RUN_OR_SWEEP [--out FILE]`: one self-contained HTML page (inline CSS, figures as
base64 data URIs, no script, nothing fetched) with a run's figures, loss curves, samples at several
top-p values and configuration; for a sweep (or any directory of runs, at any depth) its results table and
plots first, then a section per run."""

from __future__ import annotations

import base64
import io
import math
import os
import time
from typing import Callable, Optional

from .. import checkpoint as ckpt
from ..config import SampleConfig
from ..errors import PicoError
from ..fsio import output_file
from ..pages import esc, png_data_uri, visible
from ..plots import loss_panels, run_curves
from ..sampling import generate_text, sample_settings
from .compare import find_runs, run_labels, run_stats
from .sweep import RESULT_COLUMNS, _cell, read_sweep, results, sweep_figures

REPORT = "report.html"
SAMPLE_P = "greedy,0.5,0.95,1.0"

CSS = """
:root { --ink:#1d2330; --muted:#5d6678; --line:#e3e6ec; --bg:#f6f7fa; --card:#fff; --accent:#3b5bdb; --warn:#c2410c; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink); line-height:1.5;
       font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 32px 28px 64px; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 28px; padding-bottom: 12px; }
h1 { font-size: 28px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.sub { color: var(--muted); font-size: 13px; }
code, .mono { font-family: "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 13px; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 12px; margin: 12px 0 8px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.05em; }
.card .v { font-size:22px; font-weight:600; font-variant-numeric: tabular-nums; }
figure { margin: 14px 0; background:var(--card); border:1px solid var(--line); border-radius:10px; padding:10px; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { color:var(--muted); font-size:13px; text-align:center; margin-top:6px; }
table { border-collapse: collapse; width: 100%; background: var(--card); border:1px solid var(--line);
        border-radius: 10px; overflow: hidden; font-size: 14px; margin: 8px 0 16px; }
th, td { padding: 7px 12px; text-align: left; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #eef1f7; font-weight: 600; font-size: 13px; }
tbody tr:nth-child(even) { background: #fafbfd; }
tbody tr:hover { background: #f0f4ff; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: 700; color: var(--accent); }
.kv { display:grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 0 18px; }
.kv table td:first-child { color: var(--muted); width: 45%; }
.sample { white-space: pre-wrap; word-break: break-word; }
.sample .prompt { color: var(--muted); }
.esc { color: var(--warn); }
.flag { color: var(--warn); font-weight: 600; }
.ok { color: #2f7d32; }
details { background: var(--card); border:1px solid var(--line); border-radius:10px; padding: 10px 16px; margin: 12px 0; }
details > summary { cursor: pointer; font-weight: 600; font-size: 16px; }
footer { color: var(--muted); font-size: 12px; margin-top: 48px; }
"""


def _figure(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def _fmt(v, fmt: str = "{:.4f}") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def _table(head: list[str], rows: list[list], numeric: Optional[set] = None, best: Optional[dict] = None) -> str:
    """rows of already-formatted cells (HTML); numeric: column indices aligned right; best: {col: row}."""
    numeric, best = numeric or set(), best or {}
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for j, c in enumerate(r):
            cls = " ".join(k for k, on in (("num", j in numeric), ("best", best.get(j) == i)) if on)
            cells.append(f'<td class="{cls}">{c}</td>' if cls else f"<td>{c}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div></div>' for k, v in items) + "</div>"


# --------------------------------------------------------------------------- one run

def samples(run: str, prompt: Optional[str] = None, spec: str = SAMPLE_P, max_new_tokens: int = 40,
            seed: int = 0) -> tuple[str, list[tuple[str, str]]]:
    """(prompt, [(setting, completion)]) sampled from a run at each setting of `spec`."""
    model, tok, (_, _, tcfg) = ckpt.load_run(run)
    prompt = prompt or tcfg.prompt
    out = []
    for label, cfg in sample_settings(spec, SampleConfig(max_new_tokens=max_new_tokens, seed=seed)):
        text = generate_text(model, tok, prompt, cfg)[0]
        out.append((label, text[len(prompt):] if text.startswith(prompt) else text))
    return prompt, out


def _samples_html(run: str, max_new_tokens: int, seed: int) -> str:
    if not ckpt.is_run(run):
        return '<p class="sub">No weights saved yet: no samples.</p>'
    prompt, rows = samples(run, max_new_tokens=max_new_tokens, seed=seed)
    cells = [[esc(label), f'<span class="sample mono"><span class="prompt">{visible(prompt)}</span>'
              f"{visible(text)}</span>"] for label, text in rows]
    return (f'<p class="sub">Prompt <code>{esc(prompt)}</code>, {max_new_tokens} new tokens, seed {seed}; '
            "top-p keeps the most probable tokens whose probability reaches p, 1.0 is plain sampling.</p>"
            + _table(["setting", "prompt + completion"], cells))


def _config_html(run: str) -> str:
    parts = []
    for title, cfg in zip(("model", "data", "training"), ckpt.load_config(run)):
        rows = [[f"<code>{esc(k)}</code>", esc(_fmt(v, "{:g}"))] for k, v in cfg.to_dict().items()]
        parts.append(f"<div><h3>{title}</h3>{_table(['setting', 'value'], rows)}</div>")
    return '<div class="kv">' + "".join(parts) + "</div>"


def _run_body(run: str, max_new_tokens: int, seed: int, plots: bool = True) -> str:
    records = ckpt.read_metrics(run)
    summary = ckpt.read_summary(run) if os.path.isfile(os.path.join(run, ckpt.SUMMARY)) else None
    st = run_stats(records)
    parts = []
    if summary:
        cards = [("test loss", _fmt(summary.get("test_loss"))), ("bits / byte", _fmt(summary.get("bits_per_byte"), "{:.3f}")),
                 ("perplexity", _fmt(summary.get("perplexity"), "{:.2f}"))]
        if summary.get("continuation_accuracy") is not None:
            cards.append(("continuation acc.", _fmt(summary["continuation_accuracy"], "{:.3f}")))
        cards += [("parameters", f"{summary.get('params', 0):,}"), ("steps", str(summary.get("steps"))),
                  ("tokens / s", _fmt(summary.get("tokens_per_s"), "{:,.0f}"))]
        parts.append(_cards(cards))
        rows = [[f"<code>{esc(k)}</code>", esc(_fmt(v))] for k, v in summary.items()]
        parts.append("<h3>summary.json</h3>" + _table(["metric", "value"], rows))
    else:
        parts.append('<p class="flag">Training has not finished (no summary.json); figures so far.</p>')
    o = st["overfitting"]
    gap = (f"train/test gap {_fmt(st['first_gap'], '{:+.4f}')} at the first evaluation, "
           f"{_fmt(st['gap'], '{:+.4f}')} at the end" if st["gap"] is not None else "")
    verdict = (f'<span class="flag">overfitting</span>: test loss rose at {o["rises"]} consecutive evaluations '
               f"(steps {o['from_step']}-{o['to_step']}) while the train loss fell"
               if o else '<span class="ok">no overfitting detected</span>')
    if st["best_step"] is not None:
        parts.append(f"<p>Best test loss <b>{_fmt(st['best_test_loss'])}</b> at step <b>{st['best_step']}</b> "
                     f"(the early-stopping point) of {st['steps']}; {gap}. {verdict}.</p>")
    if plots and records:
        uri = png_data_uri(lambda f: run_curves(records, f, title=f"{os.path.basename(os.path.normpath(run))}: loss"))
        parts.append(_figure(uri, "train loss per step and test loss per evaluation, the gap between them shaded; "
                                  "★ the best evaluation (the early-stopping point)"))
    parts.append("<h3>samples</h3>" + _samples_html(run, max_new_tokens, seed))
    parts.append("<h3>configuration</h3>" + _config_html(run))
    return "\n".join(parts)


# --------------------------------------------------------------------------- a sweep or a directory of runs

def _best_row(rows: list[dict], key: str, pick: Callable) -> Optional[int]:
    """The index of the row whose `key` is best by `pick` (min or max) among the rows where it is a finite
    number: a point may lack a metric (continuation accuracy on text data) or have diverged (NaN)."""
    ok = [i for i, r in enumerate(rows) if _finite(r.get(key))]
    return pick(ok, key=lambda i: rows[i][key]) if ok else None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _collection_body(root: str, max_new_tokens: int, seed: int, log: Callable[[str], None]) -> tuple[str, str]:
    meta = read_sweep(root)
    runs, notes = find_runs([root])  # every run at any depth under root
    for n in notes:
        log(n)
    labels = run_labels(runs)
    parts = []
    if meta:
        title = f"Sweep {meta['name']}"
        if meta.get("description"):
            parts.append(f"<p>{esc(meta['description'])}</p>")
        base = ", ".join(f"<code>{esc(k)}={esc(v)}</code>" for k, v in meta["base"].items())
        parts.append(f'<p class="sub">Swept: {", ".join(f"<code>{esc(k)}</code>" for k in meta["swept"])}. '
                     f"Every point: {base or 'the train defaults'}.</p>")
        rows = results(root, meta)
        if rows:
            cols = meta["swept"] + [c for c in RESULT_COLUMNS if any(r.get(c) is not None for r in rows)]
            best = {}
            for c, pick in (("test_loss", min), ("best_test_loss", min), ("bits_per_byte", min),
                            ("continuation_accuracy", max)):
                i = _best_row(rows, c, pick) if c in cols else None
                if i is not None:
                    best[cols.index(c)] = i
            cells = [[esc(_cell(c, r.get(c))) for c in cols] for r in rows]
            parts.append("<h2>Results</h2>" + _table([c.replace("_", " ") for c in cols], cells,
                                                     numeric=set(range(len(meta["swept"]), len(cols))), best=best))
            loss_buf, metric_buf = io.BytesIO(), io.BytesIO()
            sweep_figures(root, meta, rows, loss_buf, metric_buf)
            parts.append(_figure("data:image/png;base64," + base64.b64encode(loss_buf.getvalue()).decode(),
                                 "train loss (running mean) and test loss per evaluation of every point; ★ best"))
            parts.append(_figure("data:image/png;base64," + base64.b64encode(metric_buf.getvalue()).decode(),
                                 f"final metrics against {meta['x']}"))
        else:
            parts.append('<p class="flag">No point has finished yet.</p>')
    else:
        title = f"Runs in {os.path.basename(os.path.normpath(root))}"
        parts.append("<h2>Results</h2>")
        records = {lb: ckpt.read_metrics(r) for lb, r in zip(labels, runs)}
        uri = png_data_uri(lambda f: loss_panels(records, f, title="train and test loss"))
        parts.append(_figure(uri, "train loss (running mean) and test loss per evaluation; ★ best"))
    stats = [run_stats(ckpt.read_metrics(r)) for r in runs]
    rows = []
    for lb, st in zip(labels, stats):
        o = st["overfitting"]
        rows.append([esc(lb), esc(_fmt(st["test_loss"])), esc(_fmt(st["best_test_loss"])), esc(_fmt(st["best_step"])),
                     esc(_fmt(st["gap"], "{:+.4f}")),
                     f'<span class="flag">yes, steps {o["from_step"]}-{o["to_step"]}</span>' if o else "no"])
    parts.append("<h3>early stopping and overfitting</h3>" + _table(
        ["run", "final test loss", "best test loss", "best step", "gap (test - train)", "overfitting"], rows,
        numeric={1, 2, 3, 4}))
    parts.append("<h2>Runs</h2>" + "".join(f'<p class="sub">{esc(n)}</p>' for n in notes))
    for lb, r in zip(labels, runs):
        parts.append(f"<details><summary>{esc(lb)}</summary>{_run_body(r, max_new_tokens, seed)}</details>")
    return title, "\n".join(parts)


def render_report(path: str, max_new_tokens: int = 40, seed: int = 0, log: Callable[[str], None] = print) -> str:
    """The report's HTML for a run directory, or for every run at any depth under another directory (a
    sweep, a multi-model run, a folder of those); what was left out goes to `log` and onto the page."""
    if not os.path.exists(path):
        raise PicoError(f"{path} does not exist")
    if not os.path.isdir(path):
        raise PicoError(f"{path} is not a run or sweep directory")
    if os.path.isfile(os.path.join(path, ckpt.CONFIG)):
        title, body = f"Run {os.path.basename(os.path.normpath(path))}", _run_body(path, max_new_tokens, seed)
    else:
        title, body = _collection_body(path, max_new_tokens, seed, log)
    when = time.strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)} · pico-llm</title><style>{CSS}</style></head>\n<body><main>"
            f'<header><h1>{esc(title)}</h1><div class="sub"><code>{esc(os.path.abspath(path))}</code> · '
            f"pico-llm report · {when}</div></header>\n{body}\n"
            f"<footer>Losses in nats per token on held-out documents; bits per byte compare across tokenizers. "
            f"Generated by <code>pico-llm report</code>.</footer></main></body></html>\n")


def write_report(path: str, out: Optional[str] = None, max_new_tokens: int = 40, seed: int = 0,
                 log: Callable[[str], None] = print) -> str:
    """Writes the report (default PATH/report.html; OUT may be a file or a directory); returns its path."""
    if not os.path.exists(path):
        raise PicoError(f"{path} does not exist")
    out = output_file(out, path, REPORT)
    if max_new_tokens < 1:
        raise PicoError("--max_new_tokens must be >= 1")
    page = render_report(path, max_new_tokens, seed, log)
    ckpt.write_text(out, page)
    return out

