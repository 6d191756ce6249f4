"""`pico-llm sae report DIR [--out FILE.html] [--features K] [--contexts M] [--tokens T]`: one self-contained
HTML page (inline CSS, the figure a base64 PNG, no script) for an SAE directory (sae.py):

  - the SAE's config.json and metrics.json, each metric with a line on what it means;
  - a feature-density histogram: log10 of each feature's firing frequency over the first T tokens of the
    run's test split (non-overlapping windows of the run's block_size), dead features counted apart;
  - for the K most frequently firing features that are neither dead nor dense: the M test windows where
    the feature peaks, ~12 tokens before and 4 after the peak, each token shaded by the feature's
    activation, and the tokens its decoder row most promotes and suppresses through the head.

The token effects are a logit lens on W_dec[f]: a row in the residual stream (hook_embed, resid_pre/mid/
post, attn_out, mlp_out, ln_final.hook_normalized) is multiplied by the head's weight; a row in an MLP's
hidden space (blocks.i.mlp.hook_post) first goes through that MLP's output projection (blocks.i.mlp.proj),
a row of per-head outputs (blocks.i.attn.hook_z) through the attention's output projection. No final norm
is applied (the page says so); other sites get no token effects.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import checkpoint as ckpt
from ..data.batches import eval_windows
from ..data.corpus import build_corpus
from ..device import DEVICE_CHOICES, resolve_device
from ..errors import PicoError
from ..fsio import output_file, write_text
from ..models.hooks import run_with_cache, select
from ..pages import esc, png_data_uri, visible
from ..plots import feature_density
from .sae import load_sae, read_metrics
from .sae_train import DENSE_THRESHOLD as DENSE_FREQ  # dense: fires on more than this fraction of tokens

REPORT = "report.html"
BEFORE, AFTER = 12, 4  # context tokens around a feature's peak
BATCH = 16  # windows per forward pass
N_LOGITS = 8  # promoted / suppressed tokens shown per feature

METRIC_MEANINGS = {
    "l0": "mean number of features active on a test token (sparsity; lower is sparser)",
    "explained_variance": "1 - |x - x̂|² / |x - mean x|² on the test activations: how much of the site the "
                          "reconstruction keeps (1: all)",
    "ce_loss_recovered": "(loss_zero - loss_sae) / (loss_zero - loss_clean): of the loss increase from zero-ablating "
                         "the site, the fraction the reconstruction recovers (1: as good as the real activations)",
    "kl_div": "KL divergence of the next-token distribution with the reconstruction spliced in from the clean "
              "one (nats per token; 0: identical)",
    "dead_fraction": "fraction of features that never fired on the test tokens",
    "dense_fraction": f"fraction of features that fire on more than {DENSE_FREQ:.0%} of test tokens (too often to "
                      f"mean one thing)",
    "loss_clean": "test loss of the model as it is (nats per token)",
    "loss_sae": "test loss with the SAE's reconstruction spliced in at the site",
    "loss_zero": "test loss with the site zero-ablated",
    "eval_tokens": "test tokens the metrics were measured on",
    "tokens_trained": "activation vectors the SAE was trained on",
    "seconds": "training time",
}

RESIDUAL_SITE = re.compile(r"hook_embed|blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)"
                           r"|ln_final\.hook_normalized")

CSS = """
body { margin:0; background:#f6f7fa; color:#1d2330; font:15px/1.5 -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
main { max-width:1120px; margin:0 auto; padding:28px 28px 56px; }
header { border-bottom:3px solid #3b5bdb; margin-bottom:20px; padding-bottom:10px; }
h1 { font-size:26px; margin:0 0 4px; } h2 { font-size:20px; margin:32px 0 10px; border-bottom:1px solid #e3e6ec; }
h3 { font-size:16px; margin:0 0 6px; }
.sub, figcaption, footer { color:#5d6678; font-size:13px; }
code, .mono, .tok { font-family:Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size:13px; }
table { border-collapse:collapse; background:#fff; border:1px solid #e3e6ec; font-size:14px; margin:8px 0 14px; width:100%; }
th, td { padding:6px 11px; text-align:left; border-bottom:1px solid #e3e6ec; vertical-align:top; }
th { background:#eef1f7; font-size:13px; } td.num { text-align:right; font-variant-numeric:tabular-nums; }
figure { margin:12px 0; background:#fff; border:1px solid #e3e6ec; border-radius:10px; padding:10px; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; } figcaption { text-align:center; }
section.feature { background:#fff; border:1px solid #e3e6ec; border-radius:10px; padding:12px 16px; margin:14px 0; }
.effects { font-size:13px; margin:4px 0 8px; } .effects .v { color:#5d6678; }
.ctx { margin:3px 0; white-space:nowrap; overflow-x:auto; }
.ctx .act { display:inline-block; width:70px; color:#5d6678; font-size:12px; text-align:right; margin-right:8px; }
.tok { white-space:pre; border-radius:2px; padding:1px 0; }
.tok.peak { outline:1px solid #c2410c; }
.esc { color:#c2410c; }
"""


# --------------------------------------------------------------------------- loading


def resolve_run(sae_dir: str, run: str) -> str:
    """The SAE's run directory: as recorded, else relative to the SAE directory."""
    for path in (run, os.path.join(sae_dir, run)):
        if os.path.isdir(path) and ckpt.is_run(path):
            return path
    raise PicoError(f"{sae_dir}: the SAE's run {run} does not exist (or is not a run directory)")


def split_windows(corpus, block_size: int, n_tokens: int) -> list[torch.Tensor]:
    """Batches (B, T) of non-overlapping windows over the start of each source's test split, about
    n_tokens in all (split by source weight; whole windows, so up to a window more)."""
    out, left = [], n_tokens
    for s in corpus.sources:
        want = max(1, math.ceil(n_tokens * s.weight))
        max_batches = max(1, math.ceil(want / (block_size * BATCH)))
        for x, _ in eval_windows(s.test, block_size, BATCH, max_batches):
            rows = min(x.size(0), math.ceil(min(want, left) / x.size(1)))
            if rows <= 0:
                break
            out.append(x[:rows])
            want, left = want - x[:rows].numel(), left - x[:rows].numel()
    if not out:
        raise PicoError("the run's test split has no tokens to read features on")
    return out


# --------------------------------------------------------------------------- features


def feature_acts(model, sae, site: str, idx: torch.Tensor) -> torch.Tensor:
    """idx (B, T) -> the SAE's feature activations at the site (B, T, N)."""
    _, cache = run_with_cache(model, idx, [site])
    a = cache[site]
    a = a.reshape(*a.shape[:2], -1).float()  # (B, T, d_in): hook_z's heads side by side
    if a.size(-1) != sae.cfg.d_in:
        raise PicoError(f"the SAE reads {sae.cfg.d_in}-wide activations but {site} of its run is {a.size(-1)} wide")
    return sae.encode(a)


@dataclass
class Scan:
    windows: list[torch.Tensor] = field(default_factory=list)  # each (T,) token ids
    counts: Optional[torch.Tensor] = None  # (N,) tokens each feature fired on
    peak: Optional[torch.Tensor] = None  # (W, N) each feature's largest activation in each window
    n_tokens: int = 0


@torch.no_grad()
def scan(model, sae, site: str, batches: list[torch.Tensor], device: str) -> Scan:
    s, peaks = Scan(counts=torch.zeros(sae.cfg.features, dtype=torch.long)), []
    for x in batches:
        f = feature_acts(model, sae, site, x.to(device))  # (B, T, N)
        s.counts += (f > 0).sum(dim=(0, 1)).cpu()
        peaks.append(f.amax(dim=1).cpu())  # (B, N)
        s.windows.extend(x)
        s.n_tokens += x.numel()
    s.peak = torch.cat(peaks)
    return s


def pick_features(counts: torch.Tensor, n_tokens: int, k: int) -> list[int]:
    """The k most frequently firing features, dead (never fired) and dense (> DENSE_FREQ) ones left out."""
    freq = counts.double() / n_tokens
    live = torch.nonzero((counts > 0) & (freq <= DENSE_FREQ)).flatten()
    order = live[torch.argsort(freq[live], descending=True, stable=True)]
    return order[:k].tolist()


def top_windows(peak: torch.Tensor, f: int, m: int) -> list[int]:
    """The (at most m) windows where feature f peaks highest, among those where it fires."""
    vals, idx = peak[:, f].sort(descending=True, stable=True)
    return [int(i) for v, i in zip(vals[:m], idx[:m]) if v > 0]


def residual_directions(model, site: str, w_dec: torch.Tensor) -> tuple[Optional[torch.Tensor], str]:
    """(W_dec's rows as directions the head reads (N, C), or None; what was done, in words)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(mlp\.hook_post|attn\.hook_z)", site)
    blocks = getattr(model, "blocks", None)
    if m and blocks is not None and int(m.group(1)) < len(blocks):
        part = "mlp" if m.group(2).startswith("mlp") else "attn"
        proj = getattr(blocks[int(m.group(1))], part).proj  # nn.Linear: C <- d_in
        return (w_dec @ proj.weight.t(), f"each W_dec row is mapped into the residual stream by "
                f"blocks.{m.group(1)}.{part}.proj (its weight, not its bias), then multiplied by the head's weight")
    if RESIDUAL_SITE.fullmatch(site):
        return w_dec, "each W_dec row is in the residual stream already: it is multiplied by the head's weight"
    return None, f"{site} is not the residual stream nor one linear map from it: no token effects are shown"


def token_effects(model, site: str, w_dec: torch.Tensor) -> tuple[Optional[torch.Tensor], str]:
    """(the head's logit change per unit of each feature (N, V), or None; a note for the page)."""
    dirs, note = residual_directions(model, site, w_dec)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if dirs is not None and (head is None or head.size(1) != dirs.size(1)):
        dirs, note = None, f"the head does not read {site}'s width: no token effects are shown"
    if dirs is None:
        return None, note
    note += "; no final norm is applied (a logit lens on the direction, ln_f's gain and centring left out)"
    return dirs.float() @ head.detach().float().t(), note  # (N, V)


# --------------------------------------------------------------------------- HTML


def _token_html(tok, i: int) -> str:
    """One token as text: a newline shown as ↵, control characters as escapes."""
    return visible(tok.decode([i]), newline='<span class="esc">↵</span>')


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return esc("–" if v is None else v)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def settings_html(cfg, metrics: dict) -> str:
    extra = cfg.extra or {}
    rows = [[esc(k), f"<code>{_num(v)}</code>"] for k, v in (("run", cfg.run), ("site", cfg.site), ("d_in", cfg.d_in),
                                                          ("features", cfg.features), ("kind", cfg.kind),
                                                          ("k", cfg.k), ("l1", cfg.l1), *extra.items())]
    mrows = [[esc(k), f'<span class="mono">{_num(v)}</span>', esc(METRIC_MEANINGS.get(k, ""))] for k, v in metrics.items()]
    out = "<h2>Configuration</h2>" + _table(["setting", "value"], rows) + "<h2>Metrics</h2>"
    if not mrows:
        return out + '<p class="sub">No metrics.json in this SAE directory.</p>'
    return out + _table(["metric", "value", "meaning"], mrows)


def density_html(s: Scan, features: int) -> str:
    freq = (s.counts.double() / s.n_tokens).tolist()
    dead = sum(1 for f in freq if f == 0)
    dense = sum(1 for f in freq if f > DENSE_FREQ)
    uri = png_data_uri(lambda buf: feature_density(freq, dead, buf, dense=DENSE_FREQ))
    cap = (f"log10 firing frequency of the {features - dead} features that fired over {s.n_tokens:,} test tokens; "
           f"{dead} dead (never fired, not in the histogram), {dense} dense (> {DENSE_FREQ:g})")
    return (f'<h2>Feature density</h2><figure><img src="{uri}" alt="{esc(cap)}">'
            f"<figcaption>{esc(cap)}</figcaption></figure>")


def context_html(tok, ids: list[int], acts: list[float], peak: int, scale: float) -> str:
    """The tokens around a peak, each shaded by its activation / scale; the peak outlined."""
    lo, hi = max(0, peak - BEFORE), min(len(ids), peak + AFTER + 1)
    spans = []
    for p in range(lo, hi):
        alpha = max(0.0, min(1.0, acts[p] / scale)) if scale > 0 else 0.0
        cls = "tok peak" if p == peak else "tok"
        spans.append(f'<span class="{cls}" style="background: rgba(234, 88, 12, {alpha:.3f})" '
                     f'title="{acts[p]:.4g}">{_token_html(tok, ids[p])}</span>')
    return f'<div class="ctx"><span class="act">{acts[peak]:.3g}</span>{"".join(spans)}</div>'


def effects_html(tok, logits: Optional[torch.Tensor]) -> str:
    if logits is None:
        return ""
    n = min(N_LOGITS, logits.numel())

    def row(label: str, vals, idx) -> str:
        cells = " ".join(f'<span class="tok">{_token_html(tok, int(i))}</span> <span class="v">{v:+.3g}</span>'
                         for v, i in zip(vals.tolist(), idx.tolist()))
        return f'<div class="effects"><b>{label}</b>: {cells}</div>'

    up, down = logits.topk(n), (-logits).topk(n)
    return row("promotes", up.values, up.indices) + row("suppresses", -down.values, down.indices)


@torch.no_grad()
def features_html(model, sae, tok, s: Scan, picked: list[int], wanted: int, contexts: int, device: str) -> str:
    effects, note = token_effects(model, sae.cfg.site, sae.W_dec.detach())
    cache: dict[int, torch.Tensor] = {}  # window -> its feature activations (T, N)
    short = f" (of the {wanted} asked for: only these fired without being dense)" if len(picked) < wanted else ""
    parts = [f"<h2>Top features</h2><p class=\"sub\">The {len(picked)} most frequently firing features{short}, dead "
             f"and dense ones left out; each context is a test window cut to {BEFORE} tokens before and {AFTER} after the "
             f"feature's peak there, tokens shaded by the activation over the feature's largest. Token effects: "
             f"{esc(note)}.</p>"]
    for f in picked:
        wins = top_windows(s.peak, f, contexts)
        for w in wins:
            if w not in cache:
                cache[w] = feature_acts(model, sae, sae.cfg.site, s.windows[w][None].to(device))[0].cpu()
        scale = float(s.peak[:, f].max())
        rows = []
        for w in wins:
            acts = cache[w][:, f].tolist()
            rows.append(context_html(tok, s.windows[w].tolist(), acts, max(range(len(acts)), key=acts.__getitem__), scale))
        freq = int(s.counts[f]) / s.n_tokens
        parts.append(f'<section class="feature" id="feature-{f}"><h3>feature {f}</h3>'
                     f'<div class="sub">fires on {freq:.3%} of tokens · largest activation {scale:.4g} · '
                     f"{len(wins)} context{'s' if len(wins) != 1 else ''}</div>"
                     f"{effects_html(tok, None if effects is None else effects[f])}{''.join(rows)}</section>")
    if not picked:
        parts.append('<p class="sub">No feature fired without being dense: nothing to show.</p>')
    return "".join(parts)


def render_page(sae_dir: str, features: int = 16, contexts: int = 8, tokens: int = 65536, device: str = "cpu") -> str:
    """The report's HTML for an SAE directory."""
    sae = load_sae(sae_dir, device)
    run = resolve_run(sae_dir, sae.cfg.run)
    model, tok, (mcfg, dcfg, _) = ckpt.load_run(run, device)
    select(model, [sae.cfg.site])  # an unknown site: one line naming the model's
    corpus = build_corpus(dcfg, tokenizer=tok, progress=False)
    s = scan(model, sae, sae.cfg.site, split_windows(corpus, mcfg.block_size, tokens), device)
    picked = pick_features(s.counts, s.n_tokens, features)
    title = f"SAE {os.path.basename(os.path.normpath(sae_dir))} · {sae.cfg.site}"
    body = (settings_html(sae.cfg, read_metrics(sae_dir)) + density_html(s, sae.cfg.features)
            + features_html(model, sae, tok, s, picked, features, contexts, device))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)} · pico-llm</title><style>{CSS}</style></head>\n<body><main>"
            f"<header><h1>{esc(title)}</h1><div class=\"sub\"><code>{esc(os.path.abspath(sae_dir))}</code> · run "
            f"<code>{esc(os.path.abspath(run))}</code> · {time.strftime('%Y-%m-%d %H:%M')}</div></header>\n{body}\n"
            f"<footer>Generated by <code>pico-llm sae report</code>.</footer></main></body></html>\n")


def write_report(sae_dir: str, out: Optional[str] = None, features: int = 16, contexts: int = 8,
                 tokens: int = 65536, device: str = "cpu") -> str:
    """Writes the page (default SAE_DIR/report.html; OUT may be a file or a directory); returns its path."""
    for flag, v in (("--features", features), ("--contexts", contexts), ("--tokens", tokens)):
        if v < 1:
            raise PicoError(f"{flag} must be >= 1, got {v}")
    load_sae(sae_dir)  # a missing or damaged directory: one line, before anything else
    out = output_file(out, sae_dir, REPORT)
    write_text(out, render_page(sae_dir, features, contexts, tokens, device))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae_dir", metavar="DIR", help="an SAE directory (what `pico-llm sae train` wrote)")
    p.add_argument("--out", default=None, help=f"the HTML file, or a directory for {REPORT} (default DIR/{REPORT})")
    p.add_argument("--features", type=int, default=16, help="how many features get a section")
    p.add_argument("--contexts", type=int, default=8, help="top activating contexts per feature")
    p.add_argument("--tokens", type=int, default=65536,
                   help="test tokens the firing frequencies and contexts are read over")
    p.add_argument("--device_id", default="cpu", help=f"where the model runs: {DEVICE_CHOICES}")


def run(a: argparse.Namespace) -> int:
    out = write_report(a.sae_dir, a.out, a.features, a.contexts, a.tokens, resolve_device(a.device_id))
    print(f"wrote {out}")
    return 0
