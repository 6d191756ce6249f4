"""Activation patching (denoising): run the corrupt prompt, put back one activation from the clean run,
and measure how much of the clean behaviour returns.

Metric: m = logit(target) - logit(foil) at the last position. target: the clean run's top next token
unless given; foil: the corrupt run's own top prediction, or, when that is the target, the clean run's
second best. Scores are normalised, (m - m_corrupt) / (m_clean - m_corrupt): 1 = the clean run's logit
difference restored, 0 = no change from the corrupt run (scores may leave [0, 1]).

Sites (Transformer only: an LSTM or k-gram MLP has no attention heads or attention / MLP outputs and is
refused with one line):
  resid_pre   blocks.{i}.hook_resid_pre at one position, per (layer, position)
  attn_out    blocks.{i}.hook_attn_out at one position, per (layer, position)
  mlp_out     blocks.{i}.hook_mlp_out at one position, per (layer, position)
  heads       blocks.{i}.attn.hook_z of one head at every position, per (layer, head)
The patched runs of one site and layer go as one batch (a row per position or head).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..checkpoint import load_run
from ..errors import PicoError
from ..fsio import write_json
from ..models.hooks import run_with_cache, run_with_hooks
from ..plots import annotated_heatmaps
from .attention import FIGURE_FORMATS, _check_output, token_label
from .lens import check_prompt_ids

SITES = {"resid_pre": "blocks.{}.hook_resid_pre", "attn_out": "blocks.{}.hook_attn_out",
         "mlp_out": "blocks.{}.hook_mlp_out", "heads": "blocks.{}.attn.hook_z"}


def require_attention(model, run: str = "this run") -> None:
    cfg = getattr(model, "cfg", None)
    kind = cfg.model if cfg is not None else type(model).__name__
    if kind != "transformer":
        raise PicoError(f"activation patching needs a transformer (attention heads, attn_out and mlp_out); "
                        f"{run} is a {kind}")


def logit_diff(logits: torch.Tensor, target: int, foil: int) -> torch.Tensor:
    """(B, T, V) -> (B,): logit(target) - logit(foil) at the last position, in float32."""
    last = logits[:, -1].float()
    return last[:, target] - last[:, foil]


def choose_foil(clean_last: torch.Tensor, corrupt_last: torch.Tensor, target: int) -> int:
    """The corrupt run's top token, or the clean run's second best when that is the target."""
    foil = int(corrupt_last.argmax())
    if foil == target:
        foil = int(clean_last.topk(2).indices[1])
    return foil


def patch_run(model, corrupt: torch.Tensor, patches: dict) -> torch.Tensor:
    """Logits of the corrupt ids (B, T) with activations replaced: patches {hook name: fn(activation) ->
    the patched activation}. With patches {name: lambda a: clean_activation} over every position of
    blocks.0.hook_resid_pre the clean logits come back."""
    with torch.no_grad():
        return run_with_hooks(model, corrupt, {n: (lambda a, hp, f=f: f(a)) for n, f in patches.items()})


def _position_patch(clean: torch.Tensor):
    """Row b of a batch of T corrupt runs gets the clean activation (1, T, ...) at position b."""
    def fn(a: torch.Tensor) -> torch.Tensor:
        a = a.clone()
        rows = torch.arange(a.size(0), device=a.device)
        a[rows, rows] = clean[0, : a.size(0)].to(a.dtype)
        return a

    return fn


def _head_patch(clean: torch.Tensor):
    """Row h of a batch of nh corrupt runs gets head h's clean z (1, T, nh, hs) at every position."""
    def fn(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        heads = torch.arange(z.size(0), device=z.device)
        z[heads, :, heads] = clean[0].transpose(0, 1).to(z.dtype)  # (nh, T, hs)
        return z

    return fn


@torch.no_grad()
def activation_patching(model, clean_ids: list[int], corrupt_ids: list[int], target: Optional[int] = None) -> dict:
    """Scores of every site: {"target", "foil", "m_clean", "m_corrupt", "scores": {site: (n_layer, T) or
    (n_layer, n_head) CPU tensor}}. Clean and corrupt must be as many tokens."""
    require_attention(model)
    check_prompt_ids(model, clean_ids, "--clean")
    check_prompt_ids(model, corrupt_ids, "--corrupt")
    if len(clean_ids) != len(corrupt_ids):
        raise PicoError(f"--clean is {len(clean_ids)} tokens and --corrupt {len(corrupt_ids)}; "
                        "patching needs prompts of the same token length")
    device = next(model.parameters()).device
    clean = torch.tensor([clean_ids], dtype=torch.long, device=device)
    corrupt = torch.tensor([corrupt_ids], dtype=torch.long, device=device)
    L, T, nh = model.cfg.n_layer, len(clean_ids), model.cfg.n_head
    names = [site.format(i) for site in SITES.values() for i in range(L)]
    clean_logits, cache = run_with_cache(model, clean, names)
    corrupt_logits, _ = run_with_cache(model, corrupt, [])
    target = int(clean_logits[0, -1].argmax()) if target is None else target
    foil = choose_foil(clean_logits[0, -1].float(), corrupt_logits[0, -1].float(), target)
    m_clean = float(logit_diff(clean_logits, target, foil)[0])
    m_corrupt = float(logit_diff(corrupt_logits, target, foil)[0])
    if abs(m_clean - m_corrupt) < 1e-6:
        raise PicoError(f"the logit difference is the same on both prompts ({m_clean:.4g}); nothing to restore: "
                        "choose prompts (or a --target) the model tells apart")
    scores = {}
    for site, pattern in SITES.items():
        rows = []
        for i in range(L):
            name = pattern.format(i)
            n, patch = (nh, _head_patch) if site == "heads" else (T, _position_patch)
            logits = patch_run(model, corrupt.expand(n, T), {name: patch(cache[name])})
            rows.append((logit_diff(logits, target, foil) - m_corrupt) / (m_clean - m_corrupt))
        scores[site] = torch.stack(rows).cpu()
    return {"target": target, "foil": foil, "m_clean": m_clean, "m_corrupt": m_corrupt, "scores": scores}


def one_token(tok, text: str) -> int:
    """The id of a --target token, as written or with a leading space; else a one-line error."""
    for t in (text, " " + text):
        ids = tok.encode(t)
        if len(ids) == 1:
            return ids[0]
    pieces = " ".join(token_label(tok.decode([i])) for i in tok.encode(text))
    raise PicoError(f"--target {text!r} is not one token of this run's tokenizer (it is: {pieces})")


def format_patching(result: dict) -> str:
    """Each site's scores as text: a row per layer, a column per position (or head)."""
    out = [f"target {result['target_token']} vs foil {result['foil_token']}: m_clean {result['m_clean']:.4f}, "
           f"m_corrupt {result['m_corrupt']:.4f} (scores: 1 = clean restored, 0 = corrupt)"]
    for site, grid in result["scores"].items():
        cols = result["tokens"] if site != "heads" else [f"h{h}" for h in range(len(grid[0]))]
        w = max(6, *(len(c) for c in cols))
        out.append(f"{site:>9} " + " ".join(f"{c[:w]:>{w}}" for c in cols))
        out += [f"{'layer ' + str(i):>9} " + " ".join(f"{v:>{w}.2f}" for v in row) for i, row in enumerate(grid)]
    return "\n".join(out)


def patching_report(run_dir: str, clean: str, corrupt: str, target: Optional[str] = None,
                    out: Optional[str] = "patching.png", json_path: Optional[str] = None, device: str = "cpu") -> dict:
    """`pico-llm patch`: one heat-map panel per site written to `out`, and with json_path everything as
    JSON. Returns the JSON's content plus "table" (the scores as text)."""
    _check_output(out, "--out", FIGURE_FORMATS)
    _check_output(json_path, "--json")
    model, tok, _ = load_run(run_dir, device)
    require_attention(model, run_dir)
    target_id = None if target is None else one_token(tok, target)
    clean_ids, corrupt_ids = tok.encode(clean), tok.encode(corrupt)
    r = activation_patching(model, clean_ids, corrupt_ids, target_id)

    def name(i: int) -> str:
        return token_label(tok.decode([i]))

    tokens = [name(a) if a == b else f"{name(a)}/{name(b)}" for a, b in zip(clean_ids, corrupt_ids)]
    result = {
        "run": run_dir, "clean": clean, "corrupt": corrupt, "clean_ids": clean_ids, "corrupt_ids": corrupt_ids,
        "tokens": tokens, "target": r["target"], "target_token": name(r["target"]), "foil": r["foil"],
        "foil_token": name(r["foil"]), "m_clean": round(r["m_clean"], 6), "m_corrupt": round(r["m_corrupt"], 6),
        "sites": {site: pattern.replace("{}", "{i}") for site, pattern in SITES.items()},
        "scores": {site: [[round(float(v), 6) for v in row] for row in grid] for site, grid in r["scores"].items()},
    }
    if out is not None:
        layers = [f"layer {i}" for i in range(model.cfg.n_layer)]
        panels = [{"title": site if site != "heads" else "heads (all positions)", "values": grid.numpy(),
                   "rows": layers, "text": [[f"{v:.2f}" for v in row] for row in grid.tolist()],
                   "cols": tokens if site != "heads" else [f"head {h}" for h in range(grid.size(1))]}
                  for site, grid in r["scores"].items()]
        lim = max(1.0, float(max(g.abs().max() for g in r["scores"].values())))
        annotated_heatmaps(panels, out, cmap="RdBu", vmin=-lim, vmax=lim, cbar_label="restored (1 = clean)",
                           title=f"{os.path.basename(os.path.normpath(run_dir))}: {clean!r} vs {corrupt!r}, "
                                 f"logit({result['target_token']}) - logit({result['foil_token']})")
    if json_path is not None:
        write_json(json_path, result)
    result["table"] = format_patching(result)
    return result
