"""Sampling: greedy, temperature, top-k, top-p, and one generate() for every model.

Top-p has Hugging Face TopPLogitsWarper semantics: keep the smallest set of most probable tokens whose
probability sums to at least p (the token that crosses p is kept, at least one token always).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch

from .config import SampleConfig
from .device import resolve_precision
from .errors import PicoError
from .models.base import eval_mode
from .models.fused import FusedDecoder, FusedRows, cached_decoder, fused_unavailable


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits (..., V) -> logits with -inf outside the nucleus."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked strictly above
    drop_sorted = mass_before >= p  # the crossing token has mass_before < p: kept; rank 0 always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def next_token_distribution(logits: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """logits (B, V) -> probabilities (B, V) after temperature, top-k and top-p."""
    logits = logits.float()
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    return logits.softmax(dim=-1)


NUCLEUS_PROBE = 256  # top-p first looks for the nucleus among this many most probable ids


def _nucleus_prefix(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities sorted descending, their ids, their cumulative sums), enough of them to hold the
    top-p nucleus of every row: on a CPU only the top NUCLEUS_PROBE when their cumulative mass already
    reaches p (a full sort of 4096 ids cost ~5x a top-256 right after a decode step), else all of them.
    On a GPU the full sort is cheap and the check would cost a host sync per token."""
    if probs.device.type == "cpu" and probs.size(-1) > NUCLEUS_PROBE:
        vals, ids = probs.topk(NUCLEUS_PROBE, dim=-1)  # sorted descending
        cum = vals.cumsum(dim=-1)
        if bool((cum[:, -1] >= p).all()):  # the crossing token is among them in every row
            return vals, ids, cum
    vals, ids = torch.sort(probs, dim=-1, descending=True)
    return vals, ids, vals.cumsum(dim=-1)


def sample_next(logits: torch.Tensor, cfg: SampleConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). Greedy (or temperature 0) is argmax.

    Draws by inverse CDF: one uniform number per row, located in the cumulative probabilities (of the
    sorted nucleus for top-p). The same distribution as next_token_distribution + multinomial, without
    a second softmax, a scatter or multinomial's setup on every token."""
    if cfg.greedy or cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    probs = logits.softmax(dim=-1)  # (B, V)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device)  # (B, 1)
    if cfg.top_p is None or cfg.top_p >= 1.0:
        cum = probs.cumsum(dim=-1)
        j = torch.searchsorted(cum, u * cum[:, -1:], right=True)
        return j.clamp_max(probs.size(-1) - 1).squeeze(-1)
    sorted_p, order, cum = _nucleus_prefix(probs, cfg.top_p)
    n_keep = ((cum - sorted_p) < cfg.top_p).sum(dim=-1, keepdim=True)  # the crossing token included
    mass = cum.gather(-1, n_keep - 1)  # probability of the nucleus, (B, 1)
    j = torch.searchsorted(cum, u * mass, right=True).clamp_max(n_keep - 1)
    return order.gather(-1, j).squeeze(-1)


DECODERS = ("auto", "fused", "torch")
# "auto" takes the fused step wherever it can serve the model, at any batch: `python bench/decode_step.py`
# (2 cores, AVX-512 BF16): it was faster than the PyTorch step at batches 1 to 64, T4 (15.8x at 1, 1.65x at
# 64 in bf16) and a GPT-2-small-size model (1.76x at 8, 1.38x at 64 in bf16). bench/RESULTS.md has the tables.


def decoder_for(model, decoder="auto"):
    """What generate() steps: the model itself ("torch"), or its fused CPU decode step ("fused": the
    Transformer's whole step in one C call, models/fused.py; an error where it cannot serve the model).
    "auto" takes the fused step where it can serve the model. A FusedDecoder made beforehand (e.g. with
    int8 weights) is used as it is."""
    if isinstance(decoder, FusedDecoder):
        return decoder
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "torch":
        return model
    reason = fused_unavailable(model)
    if reason is None:
        return cached_decoder(model)
    if decoder == "fused":
        raise PicoError(f"--decoder fused: {reason}")
    return model


def for_sampling(model, precision: str, device: str, decoder="auto"):
    """(model, decoder) for `--precision` (alias `--weights`) and `--decoder`: auto, fp32 and bf16 cast the
    model, which PyTorch and the fused step both read as it is; int8 keeps it and builds the fused decoder
    with int8 copies of its matmul weights (refused with one line where that cannot serve it)."""
    if precision == "int8":
        if decoder == "torch":
            raise PicoError("--weights int8 is computed by the fused decoder only; drop --decoder torch")
        reason = fused_unavailable(model, "int8")
        if reason is not None:
            raise PicoError(f"--weights int8: {reason}")
        return model, FusedDecoder(model, "int8")
    dtype = resolve_precision(precision, device)
    return (model if dtype is None else model.to(dtype)), decoder


def decode_steps(model, idx: torch.Tensor, cfg: SampleConfig, eot_id: Optional[int] = None,
                 decoder="auto", chunk: int = 1, logits: bool = True) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The decode loop, one new position at a time: yields (tokens (B,), logits (B, V)) for each, the
    logits those tokens were drawn from (before temperature, top-k or top-p; None when logits=False).
    generate() consumes it, and so does the server for a model without the fused step; the server's batched
    path (serve/engine.py's RowPool) runs the same C loop with the same random numbers, so a seed gives
    the same tokens through either.

    The model carries state (KV cache, LSTM (h, c), k-gram history), so the prefix is fed once. When a
    model has a bounded context (max_context) and the state is full, the window slides: the state is
    rebuilt from the last max_context // 2 tokens, so generation may run past block_size.
    With cfg.stop_at_eot it stops once every row has produced eot (a finished row's later tokens are eot).
    decoder: see decoder_for (by default a Transformer on a CPU decodes through the fused C step). Through
    the fused step the whole loop, sampling included, runs in C, `chunk` positions per call: the same
    tokens as the Python loop for the same seed (its uniform numbers come from the same generator).
    Closing the iterator early (a consumer that stops) frees the state; the model's train/eval mode is
    restored when it ends either way.
    """
    stepper = decoder_for(model, decoder)
    with eval_mode(model), torch.no_grad():
        if isinstance(stepper, FusedDecoder):
            yield from _decode_fused(stepper, idx, cfg, eot_id, chunk, logits)
        else:
            yield from _decode(stepper, idx, cfg, eot_id)


def _generator(cfg: SampleConfig, device) -> Optional[torch.Generator]:
    return None if cfg.seed is None else torch.Generator(device=device).manual_seed(cfg.seed)


def _decode_fused(dec: FusedDecoder, idx: torch.Tensor, cfg: SampleConfig, eot_id: Optional[int], chunk: int,
                  keep_logits: bool):
    """_decode's loop in C (FusedRows.run), chunk positions per call; the uniform numbers are drawn as
    sample_next draws them, a (B, 1) per position from the same generator, so the tokens are the same."""
    gen = _generator(cfg, idx.device)
    B = idx.size(0)
    rows = FusedRows(dec, B, cfg.max_new_tokens)
    try:
        rows.start(list(range(B)), idx, cfg, eot_id if cfg.stop_at_eot else None)
        greedy = cfg.greedy or cfg.temperature == 0
        left = cfg.max_new_tokens
        while left > 0:
            n = min(max(1, chunk), left)
            u = None if greedy else torch.rand(n, B, generator=gen)
            toks, lg = rows.run(n, u, keep_logits)
            for s in range(toks.size(0)):
                yield toks[s], None if lg is None else lg[s]
            if toks.size(0) < n:  # every row stopped
                return
            left -= n
    finally:
        rows.close()


def _decode(stepper, idx: torch.Tensor, cfg: SampleConfig, eot_id: Optional[int]):
    device = idx.device
    gen = _generator(cfg, device)
    max_ctx = getattr(stepper, "max_context", None)
    prefix = idx if max_ctx is None else idx[:, -max_ctx:]
    history = None  # prefix and new tokens, which a sliding window is rebuilt from
    if max_ctx is not None:
        history = torch.empty(idx.size(0), prefix.size(1) + cfg.max_new_tokens, dtype=torch.long, device=device)
        history[:, : prefix.size(1)] = prefix
    n = prefix.size(1)
    state = stepper.new_state(idx.size(0), device)
    logits, state = stepper.step(prefix, state)
    held = n  # tokens in the state
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=device)
    for i in range(cfg.max_new_tokens):
        last = logits[:, -1, :]
        nxt = sample_next(last, cfg, gen)
        if cfg.stop_at_eot and eot_id is not None:
            nxt = nxt.masked_fill(done, eot_id)
            done |= nxt == eot_id
        yield nxt, last
        if i == cfg.max_new_tokens - 1 or (cfg.stop_at_eot and bool(done.all())):
            return
        if history is not None:
            history[:, n] = nxt
        n += 1
        if max_ctx is not None and held + 1 > max_ctx:
            keep = max(1, max_ctx // 2)
            state = stepper.new_state(idx.size(0), device)
            logits, state = stepper.step(history[:, n - keep: n], state)
            held = keep
        else:
            logits, state = stepper.step(nxt[:, None], state)
            held += 1


@torch.no_grad()
def generate(model, idx: torch.Tensor, cfg: SampleConfig, eot_id: Optional[int] = None,
             decoder="auto") -> torch.Tensor:
    """idx (B, T) prompt ids -> (B, T + n) with n <= cfg.max_new_tokens new tokens: decode_steps, collected."""
    tokens = torch.empty(idx.size(0), idx.size(1) + cfg.max_new_tokens, dtype=torch.long, device=idx.device)
    tokens[:, : idx.size(1)] = idx
    n = idx.size(1)
    for nxt, _ in decode_steps(model, idx, cfg, eot_id, decoder, chunk=cfg.max_new_tokens, logits=False):
        tokens[:, n] = nxt
        n += 1
    return tokens[:, :n]


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], cfg: SampleConfig, eot_id: Optional[int] = None,
                   decoder="auto") -> list[list[int]]:
    """Prompts of different lengths -> each prompt followed by its new tokens (up to cfg.max_new_tokens;
    with cfg.stop_at_eot a row ends at its first eot, which is kept). Ragged, not padded: through the
    fused decoder each prompt has its own KV-cache slot and position and every position is one C call for
    all rows (the server's RowPool batches its requests the same way); other models step each row in turn.
    Either way each position draws a (B, 1) of uniform numbers from the seed's generator and samples every
    row with sample_next's rule, so both paths give the same tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PicoError("generate_batch needs at least one prompt, each of at least one token")
    stepper = decoder_for(model, decoder)
    B = len(prompts)
    stop = eot_id if cfg.stop_at_eot else None
    with eval_mode(model):
        gen = _generator(cfg, "cpu" if isinstance(stepper, FusedDecoder) else next(model.parameters()).device)
        greedy = cfg.greedy or cfg.temperature == 0
        if isinstance(stepper, FusedDecoder):
            rows = FusedRows(stepper, B, cfg.max_new_tokens)
            try:
                for r, p in enumerate(prompts):
                    rows.start([r], torch.tensor([p]), cfg, stop)
                toks, _ = rows.run(cfg.max_new_tokens, None if greedy else torch.rand(cfg.max_new_tokens, B, generator=gen))
            finally:
                rows.close()
        else:
            toks = _ragged_torch(stepper, prompts, cfg, stop, gen)
    out = []
    for r, p in enumerate(prompts):
        new = toks[:, r].tolist()
        if stop is not None and stop in new:
            new = new[: new.index(stop) + 1]
        out.append(list(p) + new)
    return out


def _ragged_torch(model, prompts: list[list[int]], cfg: SampleConfig, stop: Optional[int], gen) -> torch.Tensor:
    """generate_batch's loop for a model without the fused step: a state per row, fed one row at a time;
    the rows' logits are sampled together. Tokens (n, B); a finished row repeats its stop id."""
    device = next(model.parameters()).device
    B, steps = len(prompts), []
    max_ctx = getattr(model, "max_context", None)
    hist = [list(p) for p in prompts]
    states, last = [], []
    for p in prompts:
        st = model.new_state(1, device)
        lg, st = model.step(torch.tensor([p if max_ctx is None else p[-max_ctx:]], device=device), st)
        states.append(st)
        last.append(lg[0, -1])
    held = [min(len(p), max_ctx or len(p)) for p in prompts]
    done = torch.zeros(B, dtype=torch.bool)
    for i in range(cfg.max_new_tokens):
        nxt = sample_next(torch.stack(last), cfg, gen).cpu()
        if stop is not None:
            nxt = nxt.masked_fill(done, stop)
            done |= nxt == stop
        steps.append(nxt)
        if i == cfg.max_new_tokens - 1 or bool(done.all()):
            break
        for r in range(B):
            if bool(done[r]):
                continue
            hist[r].append(int(nxt[r]))
            if max_ctx is not None and held[r] + 1 > max_ctx:
                keep = max(1, max_ctx // 2)
                states[r] = model.new_state(1, device)
                lg, states[r] = model.step(torch.tensor([hist[r][-keep:]], device=device), states[r])
                held[r] = keep
            else:
                lg, states[r] = model.step(nxt[r:r + 1, None].to(device), states[r])
                held[r] += 1
            last[r] = lg[0, -1]
    return torch.stack(steps)


def generate_text(model, tokenizer, prompt: str, cfg: SampleConfig, num_samples: int = 1, device="cpu",
                  decoder="auto") -> list[str]:
    """Prompt text -> num_samples completions (prompt included), decoded. An empty prompt samples
    unconditionally: from the end-of-text token alone, which the text leaves out."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    start = 0 if prompt else 1  # where the returned text begins
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, cfg, eot_id=tokenizer.eot_id, decoder=decoder)
    texts = []
    for row in out.tolist():
        if cfg.stop_at_eot and tokenizer.eot_id in row[len(ids):]:
            row = row[: len(ids) + row[len(ids):].index(tokenizer.eot_id)]
        texts.append(tokenizer.decode(row[start:]))
    return texts


def parse_p_list(spec: str) -> list[Optional[float]]:
    """'greedy,0.2,0.95,1.0' -> [None, 0.2, 0.95, 1.0] (None: greedy)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item == "greedy":
            out.append(None)
            continue
        try:
            p = float(item)
        except ValueError:
            raise PicoError(f"--compare_p: {item!r} is neither 'greedy' nor a number") from None
        if not 0.0 < p <= 1.0:
            raise PicoError(f"--compare_p: top_p must be in (0, 1], got {p}")
        out.append(p)
    return out


def sample_settings(spec: str, base: SampleConfig) -> list[tuple[str, SampleConfig]]:
    """The (label, SampleConfig) rows of a --compare_p table."""
    rows = []
    for p in parse_p_list(spec):
        if p is None:
            rows.append(("greedy", dataclasses.replace(base, greedy=True, top_p=None)))
        else:
            rows.append((f"top-p {p:g}", dataclasses.replace(base, greedy=False, top_p=p)))
    return rows
