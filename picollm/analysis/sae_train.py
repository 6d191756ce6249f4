"""`pico-llm sae train`: a sparse autoencoder on one hook point's activations over a run's own training data.

    activations   Batcher windows of the run's training split -> run_with_cache(model, x, [site]) -> (tokens, d_in)
    training      Adam on MSE (+ l1 * sum_i f_i ||W_dec,i|| for --l1; for --k the AuxK loss of Gao et al. 2024:
                  the top k_aux dead latents reconstruct the residual x - x_hat, weight 1/32); decoder rows
                  renormalised after every step, b_dec started at the geometric median of the first batch
    evaluation    on the run's TEST windows: explained variance, L0, dead / dense features, and the test loss
                  with the site clean, replaced by the SAE's reconstruction, and zero-ablated

`train_sae` takes any iterator of (n, d_in) batches, so a test can train on planted data.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import load_run
from ..data.batches import IGNORE_INDEX, Batcher, eval_rows, eval_windows
from ..data.corpus import build_corpus
from ..device import resolve_device
from ..errors import PicoError
from ..fsio import umask
from ..metrics import evaluate_sources
from ..models.hooks import hooks_attached, run_with_cache, run_with_hooks
from .sae import SAEConfig, SparseAutoencoder, save_sae

AUX_WEIGHT = 1 / 32
DENSE_THRESHOLD = 0.1


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory")
    p.add_argument("--site", required=True, help="the hook point, e.g. blocks.0.mlp.hook_post")
    p.add_argument("--features", type=int, required=True, help="number of SAE features (dictionary size)")
    p.add_argument("--k", type=int, default=None, help="TopK SAE: features kept per token")
    p.add_argument("--l1", type=float, default=None, help="ReLU SAE with this L1 coefficient")
    p.add_argument("--tokens", type=int, default=1_000_000, help="activation vectors to train on")
    p.add_argument("--batch_tokens", type=int, default=4096, help="activation vectors per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_batches", type=int, default=20, help="test batches for the metrics")
    p.add_argument("--device_id", default="cpu")
    p.add_argument("--out", required=True, help="the SAE directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no_progress", action="store_true")


def sae_config(a: argparse.Namespace, run: str, d_in: int) -> SAEConfig:
    if (a.k is None) == (a.l1 is None):
        raise PicoError("give exactly one of --k (TopK SAE) and --l1 (ReLU SAE with an L1 penalty)")
    if a.tokens < 1 or a.batch_tokens < 1 or a.lr <= 0 or a.eval_batches < 1:
        raise PicoError("--tokens, --batch_tokens, --eval_batches and --lr must be > 0")
    extra = {"tokens": a.tokens, "batch_tokens": a.batch_tokens, "lr": a.lr, "seed": a.seed}
    return SAEConfig(run=run, site=a.site, d_in=d_in, features=a.features, kind="topk" if a.k else "l1",
                     k=a.k, l1=a.l1, extra=extra).check()


# --------------------------------------------------------------------------- activations


def site_activations(model, x: torch.Tensor, y: torch.Tensor, site: str) -> torch.Tensor:
    """(n, d_in) float32 activations at `site` of the positions of x that have a target (no padding)."""
    _, cache = run_with_cache(model, x, [site])
    act = cache[site]                                      # (B, T, d_in)
    if act.dim() != 3 or act.shape[:2] != x.shape:
        raise PicoError(f"the site {site} has shape {tuple(act.shape)}, not (B, T, d): pick a per-token activation")
    return act[y != IGNORE_INDEX].float()                  # (n, d_in)


def activation_stream(model, batcher: Batcher, site: str, device: str) -> Iterator[torch.Tensor]:
    while True:
        x, y = batcher.next_batch()
        yield site_activations(model, x.to(device), y.to(device), site)


def token_batches(stream: Iterator[torch.Tensor], batch_tokens: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Re-chunks a stream of activation batches into shuffled batches of exactly batch_tokens rows
    (drawing a few model batches at a time, so one optimizer step mixes several windows)."""
    g = torch.Generator().manual_seed(seed)
    buf, n = [], 0
    for a in stream:
        buf.append(a)
        n += len(a)
        if n >= 4 * batch_tokens:
            pool = torch.cat(buf)
            pool = pool[torch.randperm(len(pool), generator=g).to(pool.device)]
            cut = len(pool) - len(pool) % batch_tokens
            yield from pool[:cut].split(batch_tokens)
            buf, n = [pool[cut:]], len(pool) - cut


# --------------------------------------------------------------------------- training


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld's iteration from the mean: the point minimising the sum of distances to x's rows."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-6)       # (n,)
        m = (w[:, None] * x).sum(0) / w.sum()
    return m


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return 1 - ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12).item()


def aux_k_loss(sae: SparseAutoencoder, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Gao et al.'s AuxK: the top k_aux dead latents reconstruct the residual error (0 with none dead)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    k_aux = min(n_dead, max(1, sae.cfg.d_in // 2))
    pre = torch.relu(sae.pre_acts(x)).masked_fill(~dead, 0)  # (n, N), live latents silenced
    top = pre.topk(k_aux, dim=-1)
    e_hat = torch.zeros_like(pre).scatter_(-1, top.indices, top.values) @ sae.W_dec  # (n, d_in), no b_dec
    return F.mse_loss(e_hat, (x - x_hat).detach())


def sae_loss(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor):
    x_hat, f = sae(x)
    mse = F.mse_loss(x_hat, x)
    if sae.cfg.kind == "l1":
        extra = sae.cfg.l1 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    else:
        extra = AUX_WEIGHT * aux_k_loss(sae, x, x_hat, dead)
    return mse + extra, x_hat, f


def _drop_parallel_grad(sae: SparseAutoencoder) -> None:
    """Removes the part of W_dec's gradient along its (unit) rows, which renormalisation would undo."""
    g, w = sae.W_dec.grad, sae.W_dec.data
    if g is not None:
        g.sub_((g * w).sum(1, keepdim=True) * w)


def train_sae(sae: SparseAutoencoder, batches: Iterator[torch.Tensor], tokens: int, lr: float = 1e-3,
              dead_after: Optional[int] = None, progress: bool = True) -> dict:
    """Trains `sae` in place on up to `tokens` rows from `batches` ((n, d_in) float32 tensors).
    A feature is dead when it has not fired for the last `dead_after` rows (default min(tokens / 10, 1M)).
    Returns {"tokens_trained", "seconds", "dead_fraction_train"}."""
    dead_after = dead_after or max(1, min(tokens // 10, 1_000_000))
    first = next(batches)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(first))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since = torch.zeros(sae.cfg.features, dtype=torch.long, device=first.device)  # rows since each fired
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, disable=None if progress else True,
               dynamic_ncols=True, leave=False)
    seen, step, t0, x = 0, 0, time.perf_counter(), first
    while seen < tokens:
        x = x[:tokens - seen]
        loss, x_hat, f = sae_loss(sae, x, since >= dead_after)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _drop_parallel_grad(sae)
        opt.step()
        sae.normalize_decoder()
        fired = (f > 0).any(0)
        since += len(x)
        since[fired] = 0
        seen, step = seen + len(x), step + 1
        bar.update(len(x))
        if step % 20 == 0 and bar.disable is False:
            bar.set_postfix(mse=f"{F.mse_loss(x_hat, x).item():.4g}", l0=f"{(f > 0).sum(-1).float().mean().item():.1f}",
                            ev=f"{explained_variance(x, x_hat.detach()):.3f}",
                            dead=f"{(since >= dead_after).float().mean().item():.3f}")
        if seen < tokens:
            x = next(batches)
    bar.close()
    return {"tokens_trained": seen, "seconds": time.perf_counter() - t0,
            "dead_fraction_train": (since >= dead_after).float().mean().item()}


# --------------------------------------------------------------------------- evaluation


def _splice(sae: SparseAutoencoder) -> Callable:
    return lambda t, hp: sae(t.float())[0].to(t.dtype)


def _zero(t: torch.Tensor, hp) -> torch.Tensor:
    return torch.zeros_like(t)


def test_batches(split, block_size: int, batch_size: int, max_batches: int, batching: str):
    """The run's own test rows (as metrics.split_loss scores them)."""
    if batching == "padded":
        return eval_rows(split, block_size, batch_size, max_batches, pad_id=0)
    return eval_windows(split, block_size, batch_size, max_batches)


@torch.no_grad()
def reconstruction_stats(sae: SparseAutoencoder, model, sources, site: str, block_size: int, batch_size: int,
                         max_batches: int, batching: str, device: str) -> dict:
    """Explained variance, L0, dead/dense fractions and mean KL(clean || spliced) over the test rows."""
    n_feat, d = sae.cfg.features, sae.cfg.d_in
    sse, s1, s2 = 0.0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    fires, n_tok, l0_sum, kl_sum = torch.zeros(n_feat, dtype=torch.float64), 0, 0.0, 0.0
    for s in sources:
        for x, y in test_batches(s.test, block_size, batch_size, max_batches, batching):
            x, y = x.to(device), y.to(device)
            act = site_activations(model, x, y, site)           # (n, d)
            x_hat, f = sae(act)
            sse += ((act - x_hat) ** 2).sum().item()
            s1 += act.double().sum(0).cpu()
            s2 += (act.double() ** 2).sum(0).cpu()
            on = (f > 0).double()
            fires += on.sum(0).cpu()
            l0_sum += on.sum().item()
            n_tok += len(act)
            keep = y != IGNORE_INDEX
            clean = F.log_softmax(model(x).float()[keep], -1)    # (n, V)
            spliced = F.log_softmax(run_with_hooks(model, x, {site: _splice(sae)}).float()[keep], -1)
            kl_sum += F.kl_div(spliced, clean, log_target=True, reduction="sum").item()
    if n_tok == 0:
        raise PicoError("the run's test split has no tokens to evaluate the SAE on")
    sst = (s2 - s1 ** 2 / n_tok).sum().item()
    freq = fires / n_tok
    return {"l0": l0_sum / n_tok, "explained_variance": 1 - sse / max(sst, 1e-12), "kl_div": max(0.0, kl_sum / n_tok),
            "dead_fraction": (freq == 0).double().mean().item(),
            "dense_fraction": (freq > DENSE_THRESHOLD).double().mean().item(), "eval_tokens": n_tok}


def evaluate_sae(sae: SparseAutoencoder, model, sources, site: str, block_size: int, batch_size: int,
                 max_batches: int, batching: str = "packed", device: str = "cpu") -> dict:
    """metrics.json's figures: reconstruction_stats plus the test loss clean, spliced and zero-ablated, and
    ce_loss_recovered = (loss_zero - loss_sae) / (loss_zero - loss_clean)."""
    sae.eval()
    args = (sources, block_size, batch_size, max_batches, device)

    def loss(hooks: dict) -> float:
        with hooks_attached(model, hooks):
            return evaluate_sources(model, *args, batching=batching)["test_loss"]

    with torch.no_grad():
        clean, spliced, zero = loss({}), loss({site: _splice(sae)}), loss({site: _zero})
    m = reconstruction_stats(sae, model, sources, site, block_size, batch_size, max_batches, batching, device)
    gap = zero - clean
    m.update(loss_clean=clean, loss_sae=spliced, loss_zero=zero,
             ce_loss_recovered=(zero - spliced) / gap if abs(gap) > 1e-12 else float("nan"))
    return m


# --------------------------------------------------------------------------- the command


def write_sae_dir(out: str, sae: SparseAutoencoder, metrics: dict, overwrite: bool) -> None:
    """Builds the directory beside `out` and renames it into place when complete."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    try:
        save_sae(sae, tmp, metrics)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        if os.path.exists(out):
            if not overwrite:
                raise PicoError(f"{out} exists; pass --overwrite to replace it")
            old = tmp + ".old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _site_width(model, batcher: Batcher, site: str, device: str) -> int:
    x, y = batcher.next_batch()
    return site_activations(model, x[:1].to(device), y[:1].to(device), site).shape[-1]


def run(a: argparse.Namespace) -> int:
    if os.path.exists(a.out) and not a.overwrite:
        raise PicoError(f"{a.out} exists; pass --overwrite to replace it")
    if a.features < 1:
        raise PicoError(f"--features must be >= 1, got {a.features}")
    device = resolve_device(a.device_id)
    torch.manual_seed(a.seed)
    model, tok, (mcfg, dcfg, tcfg) = load_run(a.run, device)
    model.requires_grad_(False)
    corpus = build_corpus(dcfg, tokenizer=tok, progress=not a.no_progress)
    T = mcfg.block_size
    batcher = Batcher(corpus.sources, T, max(1, a.batch_tokens // T), dcfg.batching, seed=a.seed, pad_id=tok.eot_id)
    cfg = sae_config(a, os.path.abspath(a.run), _site_width(model, batcher, a.site, device))
    sae = SparseAutoencoder(cfg).to(device)
    stream = token_batches(activation_stream(model, batcher, a.site, device), a.batch_tokens, a.seed)
    stats = train_sae(sae, stream, a.tokens, lr=a.lr, progress=not a.no_progress)
    metrics = evaluate_sae(sae, model, corpus.sources, a.site, T, tcfg.batch_size, a.eval_batches,
                           dcfg.batching, device)
    metrics.update(tokens_trained=stats["tokens_trained"], seconds=stats["seconds"])
    write_sae_dir(a.out, sae, metrics, a.overwrite)
    for key, v in metrics.items():
        print(f"{key:20s} {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{key:20s} {v}")
    print(f"wrote {a.out}")
    return 0
