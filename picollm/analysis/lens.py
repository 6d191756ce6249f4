"""The logit lens: every point of the residual stream read through the model's own final norm and head.

Points read (hooks.py names): the Transformer's `hook_embed` (token embedding plus positions) and each
block's `blocks.{i}.hook_resid_post`; the LSTM's `blocks.{i}.hook_resid_post` (its embedding is not in
the space the head reads). Each is mapped to logits by `head(ln_f(x))` with the model's own modules:
ln_f is the model's RMSNorm or LayerNorm for a pre-norm Transformer, and nn.Identity for a post-norm
one (whose blocks end in a norm already) and for the LSTM (no norm). The last point is what the head
reads, so its logits are the model's logits (tested to be equal).

Per layer and position: the lens's top token and its probability, and the rank (1 = top) and
probability of the token the model finally predicts there (the argmax of the real logits).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from ..checkpoint import load_run
from ..errors import PicoError
from ..fsio import write_json
from ..models.hooks import run_with_cache
from ..plots import annotated_heatmaps
from .attention import FIGURE_FORMATS, _check_output, token_label


def residual_points(model) -> list[tuple[str, str]]:
    """[(row label, hook name)] of the residual stream, from the embedding to the last layer."""
    cfg = getattr(model, "cfg", None)
    kind = cfg.model if cfg is not None else type(model).__name__
    if kind == "transformer":
        return [("embed", "hook_embed")] + [(f"block {i}", f"blocks.{i}.hook_resid_post") for i in range(cfg.n_layer)]
    if kind == "lstm":
        return [(f"layer {i}", f"blocks.{i}.hook_resid_post") for i in range(cfg.lstm_layers)]
    raise PicoError(f"the logit lens needs a transformer or an LSTM (a residual stream); this run is a {kind}")


def unembed(model, x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) residual -> (B, T, V) logits through the model's own final norm (if any) and head."""
    ln_f = getattr(model, "ln_f", None) or nn.Identity()
    return model.head(ln_f(x))


def check_prompt_ids(model, ids: list[int], what: str = "the prompt") -> None:
    if not ids:
        raise PicoError(f"{what} is empty (no tokens)")
    ctx = getattr(model, "max_context", None)
    if ctx is not None and len(ids) > ctx:
        raise PicoError(f"{what} is {len(ids)} tokens, longer than the model's block_size {ctx}; shorten it")


@torch.no_grad()
def lens_logits(model, idx: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """idx (B, T) -> (hook names, lens logits (L, B, T, V), the model's logits (B, T, V))."""
    names = [n for _, n in residual_points(model)]
    logits, cache = run_with_cache(model, idx, names)
    return names, torch.stack([unembed(model, cache[n]) for n in names]), logits


def logit_lens(model, ids: list[int]) -> dict:
    """One sequence of token ids -> {"final": (T,) the model's predictions, "top", "top_prob", "rank",
    "prob": each (L, T)}: the lens's top token and its probability, and the rank (1 = top) and probability
    of the final prediction, at each residual point (row) and position (column). CPU tensors."""
    check_prompt_ids(model, ids)
    device = next(model.parameters()).device
    _, lens, logits = lens_logits(model, torch.tensor([ids], dtype=torch.long, device=device))
    lens, final = lens[:, 0].float(), logits[0].float().argmax(-1)  # (L, T, V), (T,)
    probs = lens.softmax(-1)
    top_prob, top = probs.max(-1)  # (L, T)
    target = lens.gather(-1, final.expand(lens.size(0), -1)[..., None])  # (L, T, 1)
    rank = (lens > target).sum(-1) + 1  # (L, T)
    prob = probs.gather(-1, final.expand(lens.size(0), -1)[..., None])[..., 0]
    return {"final": final.cpu(), "top": top.cpu(), "top_prob": top_prob.cpu(), "rank": rank.cpu(),
            "prob": prob.cpu()}


def format_lens(rows: list[str], tokens: list[str], finals: list[str], top: list[list[str]], prob) -> str:
    """The lens as text: a row per residual point, a column per position, each cell 'top p(final)'."""
    width = max(9, *(len(t) + 5 for row in top for t in row))
    lines = [f"{'position':>9} " + " ".join(f"{t[:width]:>{width}}" for t in tokens),
             f"{'final':>9} " + " ".join(f"{t[:width]:>{width}}" for t in finals)]
    for r, label in enumerate(rows):
        cells = [f"{top[r][c]} {float(prob[r][c]):.2f}" for c in range(len(tokens))]
        lines.append(f"{label:>9} " + " ".join(f"{s:>{width}}" for s in cells))
    return "\n".join(lines)


def lens_report(run_dir: str, prompt: Optional[str] = None, out: Optional[str] = "lens.png",
                json_path: Optional[str] = None, device: str = "cpu") -> dict:
    """`pico-llm lens`: the heat-map (residual points x positions, colour = probability of the final
    prediction, cell text = the lens's top token) written to `out`, and with json_path everything as JSON.
    Returns the JSON's content plus "table" (the text table)."""
    _check_output(out, "--out", FIGURE_FORMATS)
    _check_output(json_path, "--json")
    model, tok, (_, _, tcfg) = load_run(run_dir, device)
    rows = residual_points(model)
    prompt = tcfg.prompt if prompt is None else prompt
    if prompt == "":
        raise PicoError("--prompt must not be empty")
    ids = tok.encode(prompt)
    lens = logit_lens(model, ids)
    label = [token_label(tok.decode([i])) for i in range(tok.vocab_size)] if tok.vocab_size <= 4096 else None

    def name(i: int) -> str:
        return label[i] if label is not None else token_label(tok.decode([i]))

    tokens, finals = [name(i) for i in ids], [name(int(i)) for i in lens["final"]]
    top = [[name(int(i)) for i in row] for row in lens["top"]]
    result = {
        "run": run_dir, "prompt": prompt, "token_ids": ids, "tokens": tokens,
        "final_prediction": [{"id": int(i), "token": t} for i, t in zip(lens["final"], finals)],
        "layers": [{"layer": lab, "hook": hook, "positions": [
            {"top_id": int(lens["top"][r][c]), "top_token": top[r][c], "top_prob": round(float(lens["top_prob"][r][c]), 6),
             "final_rank": int(lens["rank"][r][c]), "final_prob": round(float(lens["prob"][r][c]), 6)}
            for c in range(len(ids))]} for r, (lab, hook) in enumerate(rows)],
    }
    if out is not None:
        cols = [f"{t} → {f}" for t, f in zip(tokens, finals)]
        panel = {"title": "probability of the final prediction (cell: the lens's top token)",
                 "values": lens["prob"].numpy(), "rows": [r for r, _ in rows], "cols": cols, "text": top}
        annotated_heatmaps([panel], out, title=f"{os.path.basename(os.path.normpath(run_dir))}: {prompt!r}",
                           cbar_label="p(final prediction)")
    if json_path is not None:
        write_json(json_path, result)
    result["table"] = format_lens([r for r, _ in rows], tokens, finals, top, lens["prob"])
    return result
