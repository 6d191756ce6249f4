"""Attention maps and per-head scores of a Transformer run.

Scores of a head (each a mean attention weight, so in [0, 1]):
  previous-token  attention from position i to i-1, averaged over i >= 1 of the prompt;
  sink            attention from position i to position 0, averaged over i >= 1 of the prompt
                  (at i = 1 the first token is also the previous one, so both scores count it);
  induction       on [eot, r, r] with r a seeded random sequence of L distinct tokens of the model's own
                  vocabulary, attention from each position i of the second copy to i - L + 1, the token
                  that followed the previous occurrence of the current token (as TransformerLens scores
                  induction heads); averaged over the second copy and several sequences. It does not use
                  the prompt: a prompt rarely repeats itself, and a random one shows what a head does
                  with tokens it cannot predict from meaning.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..checkpoint import load_run
from ..errors import PicoError
from ..fsio import write_json
from ..models.hooks import run_with_cache
from ..plots import attention_heatmaps

SCORE_NAMES = ("prev_token", "sink", "induction")
LOOKS_LIKE = {"prev_token": "previous-token", "sink": "sink", "induction": "induction"}
FIGURE_FORMATS = (".png", ".pdf", ".svg")
INDUCTION_SEQS = 8  # random sequences averaged for the induction score


def require_transformer(model, run: str = "this run") -> None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.model != "transformer":
        kind = cfg.model if cfg is not None else type(model).__name__
        raise PicoError(f"attention maps need a transformer; {run} is not one (model: {kind})")


def parse_heads(spec: str, n_head: int) -> list[int]:
    """'all' | '0-3' | '0,2,5' | '0-1,3' -> sorted-as-given distinct head indices, each < n_head."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_head))
    heads: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise PicoError(f"--heads: range {part!r} runs backwards")
                items = range(lo, hi + 1)
            else:
                items = [int(part)]
        except ValueError:
            raise PicoError(f"--heads: {spec!r} is not 'all', a range like 0-3, or a list like 0,2,5") from None
        for h in items:
            if not 0 <= h < n_head:
                raise PicoError(f"--heads: head {h} out of range; the model has {n_head} heads (0-{n_head - 1})")
            if h not in heads:
                heads.append(h)
    return heads


def check_layer(layer: int, n_layer: int) -> None:
    if not 0 <= layer < n_layer:
        raise PicoError(f"--layer {layer} out of range; the model has {n_layer} layers (0-{n_layer - 1})")


def token_label(text: str) -> str:
    """A token's text made readable as an axis label: escapes as repr() writes them, spaces as '␣'."""
    return repr(text)[1:-1].replace(" ", "\u2423") or "''"


def patterns(model, idx: torch.Tensor) -> list[torch.Tensor]:
    """idx (B, T) -> every layer's attention weights (B, nh, T, T), from the hook_pattern hook points
    (run in eval mode, without gradients)."""
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layer)]
    _, cache = run_with_cache(model, idx, names)
    return [cache[n] for n in names]


def attention_weights(model, ids: list[int]) -> list[torch.Tensor]:
    """Token ids (one sequence) -> attention weights, a list per layer of (n_head, T, T) CPU tensors."""
    device = next(model.parameters()).device
    return [a[0].float().cpu() for a in patterns(model, torch.tensor([ids], dtype=torch.long, device=device))]


def attention_maps(model, tokenizer, prompt: str) -> tuple[list[str], list[torch.Tensor]]:
    """(readable token labels, attention weights per layer (n_head, T, T)) of a prompt."""
    require_transformer(model)
    if prompt == "":
        raise PicoError("--prompt must not be empty")
    ids = tokenizer.encode(prompt)
    block = model.cfg.block_size
    if len(ids) > block:
        raise PicoError(f"the prompt is {len(ids)} tokens, longer than the model's block_size {block}; shorten it")
    return [token_label(tokenizer.decode([i])) for i in ids], attention_weights(model, ids)


def prev_token_scores(att: torch.Tensor) -> torch.Tensor:
    """(n_head, T, T) -> (n_head,): mean attention from i to i-1 over i >= 1 (nan when T < 2)."""
    T = att.size(-1)
    if T < 2:
        return torch.full(att.shape[:1], float("nan"))
    i = torch.arange(1, T)
    return att[:, i, i - 1].mean(-1)


def sink_scores(att: torch.Tensor) -> torch.Tensor:
    """(n_head, T, T) -> (n_head,): mean attention from i to 0 over i >= 1 (nan when T < 2)."""
    if att.size(-1) < 2:
        return torch.full(att.shape[:1], float("nan"))
    return att[:, 1:, 0].mean(-1)


def induction_sequences(vocab_size: int, bos_id: int, seq_len: int, n_seqs: int, seed: int) -> torch.Tensor:
    """(n_seqs, 1 + 2 * seq_len): [bos, r, r] with r seq_len tokens drawn from the vocabulary minus bos,
    distinct within a sequence when the vocabulary is large enough."""
    g = torch.Generator().manual_seed(seed)
    candidates = torch.tensor([t for t in range(vocab_size) if t != bos_id])
    rows = []
    for _ in range(n_seqs):
        if len(candidates) >= seq_len:
            r = candidates[torch.randperm(len(candidates), generator=g)[:seq_len]]
        else:
            r = candidates[torch.randint(len(candidates), (seq_len,), generator=g)]
        rows.append(torch.cat([torch.tensor([bos_id]), r, r]))
    return torch.stack(rows)


@torch.no_grad()
def induction_scores(model, bos_id: int, seq_len: Optional[int] = None, n_seqs: int = INDUCTION_SEQS,
                     seed: int = 0) -> tuple[torch.Tensor, int]:
    """(scores (n_layer, n_head), seq_len used). seq_len defaults to min(32, (block_size - 1) // 2); the
    scores are nan when the block is too short for two copies of 2 tokens."""
    cfg = model.cfg
    L = seq_len or min(32, (cfg.block_size - 1) // 2)
    if L < 2 or 1 + 2 * L > cfg.block_size:
        return torch.full((cfg.n_layer, cfg.n_head), float("nan")), L
    device = next(model.parameters()).device
    seqs = induction_sequences(cfg.vocab_size, bos_id, L, n_seqs, seed).to(device)
    attn = patterns(model, seqs)
    i = torch.arange(1 + L, 1 + 2 * L, device=device)  # the second copy
    j = i - L + 1  # the token after the previous occurrence of token i
    return torch.stack([a[:, :, i, j].float().mean(dim=(0, 2)) for a in attn]).cpu(), L  # (n_layer, n_head)


def head_scores(attn: list[torch.Tensor], induction: torch.Tensor) -> list[dict]:
    """One row per (layer, head): prev_token and sink on the prompt's attention, induction as given."""
    rows = []
    for layer, att in enumerate(attn):
        prev, sink = prev_token_scores(att), sink_scores(att)
        for h in range(att.size(0)):
            rows.append({"layer": layer, "head": h, "prev_token": _num(prev[h]), "sink": _num(sink[h]),
                         "induction": _num(induction[layer, h])})
    return rows


def _num(x) -> Optional[float]:
    v = float(x)
    return None if math.isnan(v) else round(v, 4)


def looks_like(row: dict, threshold: float = 0.5) -> str:
    """The name of the row's highest score when it reaches the threshold, else ''."""
    best = max(((row[k], k) for k in SCORE_NAMES if row[k] is not None), default=None)
    return LOOKS_LIKE[best[1]] if best and best[0] >= threshold else ""


def format_scores(rows: list[dict]) -> str:
    """The scores as an aligned text table (a '-' where a score is undefined)."""
    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"{'layer':>5} {'head':>4} {'prev':>6} {'sink':>6} {'induction':>9}  looks like"]
    for r in rows:
        lines.append(f"{r['layer']:>5} {r['head']:>4} {cell(r['prev_token']):>6} {cell(r['sink']):>6} "
                     f"{cell(r['induction']):>9}  {looks_like(r)}".rstrip())
    return "\n".join(lines)


def _check_output(path: Optional[str], flag: str, exts: Optional[tuple] = None) -> None:
    if path is None:
        return
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise PicoError(f"{flag} {path}: directory {d} does not exist")
    if os.path.isdir(path):
        raise PicoError(f"{flag} {path} is a directory")
    if exts and os.path.splitext(path)[1].lower() not in exts:
        raise PicoError(f"{flag} {path}: use one of {', '.join(exts)}")


def attention_report(run_dir: str, prompt: Optional[str] = None, layer: int = 0, heads: str = "all",
                     out: Optional[str] = "attention.png", json_path: Optional[str] = None, all_layers: bool = False,
                     seed: int = 0, device: str = "cpu") -> dict:
    """`pico-llm attention`: heat-maps of the chosen heads (all layers x heads with all_layers) written to
    `out`, every head's scores, and with json_path the weights and scores as JSON. Returns the JSON's
    content plus "table" (the scores as text)."""
    _check_output(out, "--out", FIGURE_FORMATS)
    _check_output(json_path, "--json")
    model, tok, (mcfg, _, tcfg) = load_run(run_dir, device)
    require_transformer(model, run_dir)
    if all_layers:
        layers, head_list = list(range(mcfg.n_layer)), list(range(mcfg.n_head))
    else:
        check_layer(layer, mcfg.n_layer)
        layers, head_list = [layer], parse_heads(heads, mcfg.n_head)
    prompt = tcfg.prompt if prompt is None else prompt
    tokens, attn = attention_maps(model, tok, prompt)
    ind, ind_len = induction_scores(model, tok.eot_id, seed=seed)
    rows = head_scores(attn, ind)
    result = {
        "run": run_dir, "prompt": prompt, "token_ids": tok.encode(prompt), "tokens": tokens,
        "layers": layers, "heads": head_list,
        "attention": [{"layer": li, "head": h, "weights": [[round(float(w), 6) for w in row] for row in attn[li][h]]}
                      for li in layers for h in head_list],
        "scores": rows,
        "induction": {"seq_len": ind_len, "n_seqs": INDUCTION_SEQS, "seed": seed},
    }
    if out is not None:
        by_key = {(r["layer"], r["head"]): r for r in rows}

        def panel(li, h):
            r = by_key[(li, h)]
            s = " · ".join(f"{n} {'-' if r[k] is None else format(r[k], '.2f')}"
                           for n, k in (("prev", "prev_token"), ("sink", "sink"), ("ind", "induction")))
            return f"layer {li} · head {h}\n{s}", attn[li][h].numpy()

        if all_layers:
            grid = [[panel(li, h) for h in head_list] for li in layers]
        else:
            cells = [panel(layer, h) for h in head_list]
            ncols = min(4, len(cells))
            grid = [cells[i:i + ncols] for i in range(0, len(cells), ncols)]
        attention_heatmaps(grid, tokens, out, title=f"{os.path.basename(os.path.normpath(run_dir))}: {prompt!r}",
                           label_every_panel=not all_layers)
    if json_path is not None:
        write_json(json_path, result)
    result["table"] = format_scores(rows)
    return result
