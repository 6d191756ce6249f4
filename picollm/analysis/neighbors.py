"""Embedding neighbours and k-means clusters of a trained run, and the starter's "monosemantic" annotation.

Which vectors stand for a token:
  transformer  input: the token embedding wte; output: the head's rows, when not tied to wte;
  lstm         input: the embedding table; output: the head's rows (V, hidden_size);
  kgram        input: the embedding table (embedding / conv variants), or for the onehot variant the
               rows of its first layer that a token contributes in the current-token slot of the window
               (the column of the starter's Linear(k*V, C) for that token at the last position);
               output: the rows of the last Linear (V, C).
Similarity is cosine; clusters come from spherical k-means (k-means on unit vectors, k-means++ seeding).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..checkpoint import load_run
from ..config import SampleConfig
from ..errors import PicoError
from ..models.hooks import run_with_cache
from ..sampling import generate

TABLE_TITLES = {"input": "input embedding", "output": "output embedding"}


def embedding_tables(model) -> dict[str, torch.Tensor]:
    """{"input": (V, C)[, "output": (V, D)]} float CPU copies; see the module docstring for each family."""
    cfg = model.cfg
    V = cfg.vocab_size
    if cfg.model == "transformer":
        tables = {"input": model.get_input_embeddings()}
        if not cfg.tie_weights:
            tables["output"] = model.get_output_embeddings()
    elif cfg.model == "lstm":
        tables = {"input": model.embedding.weight, "output": model.head.weight}
    else:
        if cfg.kgram_variant == "onehot":
            k = cfg.kgram_k
            first = model.in_proj.weight[(k - 1) * V: k * V]  # slot k-1: the current token
        else:
            first = model.wte.weight[:V]  # row V is the padding row
        tables = {"input": first, "output": model.net[-1].weight}
    return {name: t.detach().float().cpu() for name, t in tables.items()}


def resolve_token(tokenizer, text: str) -> int:
    """The id of a token given as text: the text itself when it is one token, else the text with a leading
    space (BPE vocabularies hold most words that way). Anything longer is refused, naming its pieces."""
    if text == "":
        raise PicoError("--tokens: an empty token (check the commas)")
    ids = tokenizer.encode(text)
    if len(ids) == 1:
        return ids[0]
    tried = [(text, ids)]
    if not text.startswith(" "):
        spaced = tokenizer.encode(" " + text)
        if len(spaced) == 1:
            return spaced[0]
        tried.append((" " + text, spaced))
    pieces = "; ".join(f"{t!r} -> {[tokenizer.decode([i]) for i in ids]}" for t, ids in tried)
    raise PicoError(f"--tokens: {text!r} is not a single token of this run's tokenizer ({pieces}); "
                    "ask for one of the pieces")


def nearest(table: torch.Tensor, token_id: int, k: int) -> list[tuple[int, float]]:
    """The k rows most cosine-similar to row token_id (itself excluded): [(id, cosine)], best first."""
    unit = F.normalize(table, dim=1)  # (V, C)
    sims = unit @ unit[token_id]  # (V,)
    sims[token_id] = float("-inf")
    top = sims.topk(min(k, table.size(0) - 1))
    return [(int(i), float(s)) for s, i in zip(top.values, top.indices)]


def neighbors(model, tokenizer, texts: list[str], k: int = 8) -> list[dict]:
    """For each token text: {"text", "id", "token", "neighbors": {table: [(id, token, cosine)]}}."""
    if k < 1:
        raise PicoError(f"--k must be >= 1, got {k}")
    tables = embedding_tables(model)
    out = []
    for text in texts:
        tid = resolve_token(tokenizer, text)
        out.append({"text": text, "id": tid, "token": tokenizer.decode([tid]),
                    "neighbors": {name: [(i, tokenizer.decode([i]), s) for i, s in nearest(t, tid, k)]
                                  for name, t in tables.items()}})
    return out


def format_neighbors(results: list[dict]) -> str:
    blocks = []
    for r in results:
        names = list(r["neighbors"])
        width = 24
        head = f"{'rank':>4}  " + "".join(f"{TABLE_TITLES[n]:<{width}}{'cos':>6}   " for n in names)
        lines = [f"{r['token']!r} (id {r['id']})", head.rstrip()]
        for rank in range(len(r["neighbors"][names[0]])):
            picks = [r["neighbors"][n][rank] for n in names]  # (id, text, cosine) per table
            cells = "".join(f"{repr(text)[:width - 1]:<{width}}{cos:>6.3f}   " for _, text, cos in picks)
            lines.append(f"{rank + 1:>4}  {cells}".rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding: x (N, D) -> (centroids (k, D), assignment (N,)).
    Seeded and deterministic; an emptied cluster restarts at the point farthest from every centroid."""
    N = x.size(0)
    if not 1 <= k <= N:
        raise PicoError(f"--clusters must be between 1 and the number of points ({N}), got {k}")
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(N, (1,), generator=g))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)  # (N,) squared distance to the nearest chosen centroid
    for _ in range(1, k):
        if d2.sum() > 0:  # k-means++: a point drawn with probability proportional to d2
            i = int(torch.multinomial(d2 / d2.sum(), 1, generator=g))
        else:  # every point already sits on a centroid
            i = int(torch.randint(N, (1,), generator=g))
        centroids.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    C = torch.stack(centroids)  # (k, D)
    assign = torch.cdist(x, C).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = x[assign == j]
            if len(members):
                C[j] = members.mean(0)
            else:
                C[j] = x[torch.cdist(x, C).min(1).values.argmax()]
        new = torch.cdist(x, C).argmin(1)  # (N,)
        if torch.equal(new, assign):
            break
        assign = new
    return C, assign


def clusters(x: torch.Tensor, k: int, seed: int = 0, top: int = 10) -> list[dict]:
    """Spherical k-means over the rows of x: per cluster (largest first) its size and the `top` row
    indices closest to its centroid."""
    unit = F.normalize(x.float(), dim=1)
    C, assign = kmeans(unit, k, seed)
    out = []
    for j in range(k):
        members = (assign == j).nonzero().flatten()
        if len(members) == 0:
            continue
        dist = torch.cdist(unit[members], C[j:j + 1]).flatten()
        order = members[dist.argsort()][:top]
        out.append({"size": len(members), "closest": [int(i) for i in order]})
    return sorted(out, key=lambda c: -c["size"])


@torch.no_grad()
def hidden_states(model, ids: list[int]) -> torch.Tensor:
    """(T, D) representations of each position of a text: the final residual stream (before the last norm)
    for the transformer, run in windows of block_size; the top LSTM layer's output; the k-gram MLP's
    last hidden layer."""
    cfg = model.cfg
    if cfg.model == "transformer":
        name, window = f"blocks.{cfg.n_layer - 1}.hook_resid_post", cfg.block_size
    else:  # what the head reads: the top LSTM layer's output, the k-gram MLP's last hidden layer
        name, window = "ln_final.hook_normalized", len(ids)
    device = next(model.parameters()).device
    store = []
    for s in range(0, len(ids), window):
        _, cache = run_with_cache(model, torch.tensor([ids[s:s + window]], dtype=torch.long, device=device), [name])
        store.append(cache[name][0].float().cpu())
    return torch.cat(store)  # (T, D)


def embedding_clusters(model, tokenizer, k: int, seed: int = 0, top: int = 10) -> list[dict]:
    """k-means over the input embedding table: per cluster its size and closest tokens."""
    table = embedding_tables(model)["input"]
    return [{"size": c["size"], "tokens": [tokenizer.decode([i]) for i in c["closest"]]}
            for c in clusters(table, k, seed, top)]


def text_clusters(model, tokenizer, text: str, k: int, seed: int = 0, top: int = 10) -> list[dict]:
    """k-means over the hidden states of a text's positions: per cluster its size and closest positions,
    each shown as its token with the position."""
    if text == "":
        raise PicoError("--text must not be empty")
    ids = tokenizer.encode(text)
    if len(ids) < k:
        raise PicoError(f"--text has {len(ids)} tokens, fewer than --clusters {k}")
    states = hidden_states(model, ids)
    return [{"size": c["size"], "tokens": [f"{tokenizer.decode([ids[i]])!r}@{i}" for i in c["closest"]]}
            for c in clusters(states, k, seed, top)]


def format_clusters(found: list[dict], quote: bool = True) -> str:
    lines = []
    for n, c in enumerate(found):
        shown = ", ".join(repr(t) if quote else t for t in c["tokens"])
        lines.append(f"cluster {n} ({c['size']}): {shown}")
    return "\n".join(lines)


def parse_tokens(spec: str) -> list[str]:
    """'Lily,dog,7' -> ['Lily', 'dog', '7'] (spaces kept: ' dog' is its own BPE token)."""
    return spec.split(",")


def neighbors_report(run_dir: str, tokens: Optional[str] = None, k: int = 8, n_clusters: Optional[int] = None,
                     text: Optional[str] = None, seed: int = 0, top: int = 10, device: str = "cpu") -> str:
    """`pico-llm neighbors`: the text it prints."""
    if tokens is None and n_clusters is None:
        raise PicoError("give --tokens (nearest neighbours) and/or --clusters K")
    if text is not None and n_clusters is None:
        raise PicoError("--text needs --clusters K (k-means over the text's hidden states)")
    if top < 1:
        raise PicoError(f"--top must be >= 1, got {top}")
    model, tok, (mcfg, _, _) = load_run(run_dir, device)
    parts = []
    if tokens is not None:
        if mcfg.model == "transformer" and mcfg.tie_weights:
            parts.append("(input and output embeddings are tied: one table)")
        elif mcfg.model == "kgram" and mcfg.kgram_variant == "onehot":
            parts.append("(onehot k-gram: input vectors are its first-layer rows for the current-token slot)")
        parts.append(format_neighbors(neighbors(model, tok, parse_tokens(tokens), k)))
    if n_clusters is not None:
        if text is None:
            parts.append(f"k-means, {n_clusters} clusters of the input embedding (largest first; tokens closest "
                         "to the centroid first):")
            parts.append(format_clusters(embedding_clusters(model, tok, n_clusters, seed, top)))
        else:
            where = {"transformer": "final residual stream", "lstm": "LSTM output",
                     "kgram": "last hidden layer"}[mcfg.model]
            parts.append(f"k-means, {n_clusters} clusters of the {where} over the text's positions "
                         "(token@position, closest to the centroid first):")
            parts.append(format_clusters(text_clusters(model, tok, text, n_clusters, seed, top), quote=False))
    return "\n\n".join(parts)


@torch.no_grad()
def monosemantic_annotations(model, tokenizer, prompt: str, max_new_tokens: int = 20,
                             top_n: int = 3) -> list[tuple[str, list[tuple[str, float]]]]:
    """Greedy-decode from the prompt; for each generated token, its top_n input-embedding neighbours:
    [(token text, [(neighbour text, cosine)])]."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    out = generate(model, torch.tensor([ids], device=device), SampleConfig(max_new_tokens=max_new_tokens, greedy=True))
    table = embedding_tables(model)["input"]
    return [(tokenizer.decode([t]), [(tokenizer.decode([i]), s) for i, s in nearest(table, t, top_n)])
            for t in out[0, len(ids):].tolist()]


def monosemantic_report(run_dir: str, top_n: int = 3) -> str:
    """The classic --monosemantic_enabled output for a finished run: its greedy sample from the training
    prompt, each generated token with its nearest input-embedding neighbours."""
    model, tok, (mcfg, _, tcfg) = load_run(run_dir)
    rows = monosemantic_annotations(model, tok, tcfg.prompt, tcfg.max_new_tokens, top_n)
    lines = [f"monosemantic ({mcfg.model}, {run_dir}): greedy from {tcfg.prompt!r}, each generated token "
             f"with its {top_n} nearest input-embedding neighbours (cosine)"]
    for text, near in rows:
        lines.append(f"  {text!r:>14} -> " + ", ".join(f"{t!r} {s:.2f}" for t, s in near))
    return "\n".join(lines)
