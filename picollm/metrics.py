"""Loss, perplexity, bits per byte and continuation accuracy. Loss is in nats per token."""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import BATCHINGS, SampleConfig
from .data.batches import IGNORE_INDEX, TokenSplit, bits_per_byte, eval_rows, eval_windows
from .errors import PicoError
from .sampling import generate


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE_INDEX (padding never counts), in float32.
    Low-precision logits (bf16/fp16 under autocast) go through a row-chunked float32 cross-entropy that
    never materialises float32 copies of the whole (N, V) logits or their gradient."""
    logits2d, targets1d = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if logits.dtype == torch.float32 or not logits.requires_grad:
        return F.cross_entropy(logits2d.float(), targets1d, ignore_index=IGNORE_INDEX)
    return _ChunkedCrossEntropy.apply(logits2d, targets1d)


def moe_aux_loss(router_logits: list[torch.Tensor], k: int) -> torch.Tensor:
    """The mixture of experts' load-balancing loss (Switch Transformer; Mixtral's with top-k), averaged
    over the MoE layers: E * sum_e f_e * P_e, with f_e the share of the (token, slot) routings that went to
    expert e and P_e the mean router probability of e. It is 1 when routing is uniform and grows as it
    concentrates; only P_e carries a gradient. router_logits: one (..., E) tensor per layer."""
    losses = []
    for logits in router_logits:
        logits = logits.reshape(-1, logits.size(-1)).float()  # (N, E)
        E = logits.size(-1)
        probs = F.softmax(logits, dim=-1)
        chosen = logits.topk(k, dim=-1).indices  # (N, K)
        share = torch.zeros(E, device=logits.device).index_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=logits.device)) / chosen.numel()
        losses.append(E * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, ignore_index) for (N, V) low-precision logits, computed
    CHUNK rows at a time in float32 (cache-sized); the gradient is written straight in the logits' dtype."""

    CHUNK = 256

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        safe = targets.clamp_min(0)
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.size(0), _ChunkedCrossEntropy.CHUNK):
            lse[s:s + _ChunkedCrossEntropy.CHUNK] = torch.logsumexp(logits[s:s + _ChunkedCrossEntropy.CHUNK].float(), -1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        n = valid.sum().clamp_min(1)
        ctx.save_for_backward(logits, safe, valid, lse, n)
        return ((lse - picked) * valid).sum() / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, safe, valid, lse, n = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = (grad_out / n) * valid  # (N,): 0 on ignored rows
        C = _ChunkedCrossEntropy.CHUNK
        for s in range(0, logits.size(0), C):
            p = torch.exp(logits[s:s + C].float() - lse[s:s + C, None])  # softmax rows, float32
            rows = torch.arange(p.size(0), device=p.device)
            p[rows, safe[s:s + C]] -= 1.0
            grad[s:s + C] = p * scale[s:s + C, None]
        return grad, None


def _eval_batches(split: TokenSplit, block_size: int, batch_size: int, max_batches: int, batching: str):
    if batching not in BATCHINGS:
        raise PicoError(f"unknown batching {batching!r}; choose one of: {', '.join(BATCHINGS)}")
    if batching == "padded":
        # pad_id: a causal model never lets a later (padding) position change an earlier position's logits
        return eval_rows(split, block_size, batch_size, max_batches, pad_id=0)
    return eval_windows(split, block_size, batch_size, max_batches)


@torch.no_grad()
def split_loss(model, split: TokenSplit, block_size: int, batch_size: int, max_batches: int, device="cpu",
               autocast=nullcontext, rank: int = 0, world_size: int = 1, *,
               batching: str = "packed") -> tuple[float, int]:
    """(mean loss in nats per target token, targets scored) over the deterministic evaluation batches of a
    split: packed windows, or for batching="padded" one padded row per document (as padded training sees
    them; padding never counts). Under DDP (world_size > 1, every rank calling) each rank scores every
    world_size-th batch and the sums are all-reduced: the same figure as one process, up to float
    summation order."""
    batches = _eval_batches(split, block_size, batch_size, max_batches, batching)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if i % world_size != rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x)
        total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((y != IGNORE_INDEX).sum().item())
    if world_size > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t[0].item(), int(t[1].item())
    if was_training:
        model.train()
    return (total / count if count else float("nan")), count


def evaluate_sources(model, sources, block_size: int, batch_size: int, max_batches: int, device="cpu",
                     autocast=nullcontext, rank: int = 0, world_size: int = 1, *, batching: str = "packed") -> dict:
    """Test loss of every source, combined with the mixing weights (so the figure measures the same
    mixture the model is trained on), perplexity and bits per byte. `batching` is the run's
    DataConfig.batching: a run is scored on the kind of rows it trains on (see split_loss)."""
    loss = bpb = 0.0
    per_source = {}
    for s in sources:
        l_s, _ = split_loss(model, s.test, block_size, batch_size, max_batches, device, autocast, rank, world_size,
                            batching=batching)
        per_source[s.name] = l_s
        loss += s.weight * l_s
        bpb += s.weight * bits_per_byte(l_s, s.test)
    return {"test_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": bpb, "per_source": per_source}


@torch.no_grad()
def continuation_accuracy(model, tokenizer, sequences: list[str], n_prompt: int = 5, n_next: int = 10,
                          max_sequences: int = 200, device="cpu") -> float:
    """On held-out numeric sequences: given the first n_prompt numbers, greedy-generate and score the share
    of the next n_next numbers that are exactly right (a missing number counts as wrong). Prompts of the
    same token length are decoded together in one batch."""
    candidates = [s.split() for s in sequences if len(s.split()) >= n_prompt + n_next][:max_sequences]
    if not candidates:
        return float("nan")
    groups = defaultdict(list)
    for nums in candidates:
        groups[tuple(tokenizer.encode(" ".join(nums[:n_prompt])))].append(nums)
    by_len = defaultdict(list)
    for ids, rows in groups.items():
        by_len[len(ids)].extend((ids, nums) for nums in rows)
    right = total = 0
    for length, items in by_len.items():
        idx = torch.tensor([ids for ids, _ in items], device=device)
        # room for n_next numbers at twice the prompt's tokens per number
        budget = 2 * n_next * math.ceil(length / n_prompt) + 8
        cfg = SampleConfig(max_new_tokens=budget, greedy=True, stop_at_eot=True)
        out = generate(model, idx, cfg, eot_id=tokenizer.eot_id)[:, length:].tolist()
        for row, (_, nums) in zip(out, items):
            if tokenizer.eot_id in row:
                row = row[: row.index(tokenizer.eot_id)]
            predicted = tokenizer.decode(row).split()[:n_next]
            truth = nums[n_prompt: n_prompt + n_next]
            right += sum(p == t for p, t in zip(predicted, truth))
            total += len(truth)
    return right / total
