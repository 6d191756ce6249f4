"""Sparse autoencoders on a run's activations (Anthropic's "Towards Monosemanticity", 2023; the TopK
variant of Gao et al., 2024), in the shape SAELens uses:

    f = act(W_enc (x - b_dec) + b_enc)        (N features; act: ReLU, then TopK keeps the K largest)
    x_hat = W_dec f + b_dec                   (W_dec's rows, one per feature, have unit norm)

An SAE directory holds:
    sae.safetensors   W_enc (d_in, N), b_enc (N,), W_dec (N, d_in), b_dec (d_in,), float32
    config.json       {"format": 1, "run": RUN, "site": HOOK, "d_in": d, "features": N, "kind": "topk"|"l1",
                       "k": K or null, "l1": C or null, ...training settings}
    metrics.json      l0, explained_variance, ce_loss_recovered, kl_div, dead_fraction, dense_fraction, ...

Training (sae_train.py), the feature report (sae_report.py) and steering (`generate --steer`) use
`SparseAutoencoder`, `save_sae` and `load_sae` from here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..errors import PicoError
from ..fsio import atomic_path, write_json
from ..models.hooks import HookFn, hook_points

SAE_FORMAT = 1
WEIGHTS, CONFIG, METRICS = "sae.safetensors", "config.json", "metrics.json"


@dataclass
class SAEConfig:
    run: str
    site: str
    d_in: int
    features: int
    kind: str = "topk"  # "topk" | "l1"
    k: Optional[int] = None
    l1: Optional[float] = None
    extra: dict = field(default_factory=dict)  # training settings, recorded as given

    def check(self) -> "SAEConfig":
        if self.features < 1:
            raise PicoError(f"--features must be >= 1, got {self.features}")
        if self.d_in < 1:
            raise PicoError(f"the site {self.site} has width {self.d_in}")
        if self.kind == "topk":
            if self.k is None or not 1 <= self.k <= self.features:
                raise PicoError(f"--k must be in [1, --features ({self.features})], got {self.k}")
        elif self.kind == "l1":
            if self.l1 is None or self.l1 <= 0:
                raise PicoError(f"--l1 must be > 0, got {self.l1}")
        else:
            raise PicoError(f"unknown SAE kind {self.kind!r} (topk | l1)")
        return self


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg.check()
        d, n = cfg.d_in, cfg.features
        w = torch.randn(n, d)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)                     # (N, d): unit rows
        self.W_enc = nn.Parameter(w.t().clone())         # (d, N): initialised as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., N) feature activations, non-negative; TopK: at most k non-zero."""
        h = torch.relu(self.pre_acts(x))
        if self.cfg.kind == "topk":
            top = h.topk(self.cfg.k, dim=-1)
            h = torch.zeros_like(h).scatter_(-1, top.indices, top.values)
        return h

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (after each optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


def save_sae(sae: SparseAutoencoder, out: str, metrics: Optional[dict] = None) -> None:
    """Writes out/sae.safetensors, out/config.json and (when given) out/metrics.json, each atomically."""
    os.makedirs(out, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in sae.state_dict().items()}
    with atomic_path(os.path.join(out, WEIGHTS)) as tmp:
        save_file(tensors, tmp, metadata={"format": str(SAE_FORMAT)})
    write_json(os.path.join(out, CONFIG), {"format": SAE_FORMAT, **asdict(sae.cfg)})
    if metrics is not None:
        write_json(os.path.join(out, METRICS), metrics)


def load_sae(path: str, device: str = "cpu") -> SparseAutoencoder:
    """The SAE of an SAE directory; a missing or damaged one is a PicoError (one line)."""
    cfg_path, w_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    if not os.path.isdir(path):
        raise PicoError(f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a directory")
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise PicoError(f"{path} is not an SAE directory (no {CONFIG} and {WEIGHTS})")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
        d.pop("format", None)
        cfg = SAEConfig(**d)
        sae = SparseAutoencoder(cfg)
        sae.load_state_dict(load_file(w_path))
    except PicoError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage: one line
        raise PicoError(f"{path}: corrupt SAE directory ({type(e).__name__})") from None
    return sae.to(device).eval()


def read_metrics(path: str) -> dict:
    p = os.path.join(path, METRICS)
    if not os.path.isfile(p):
        return {}
    with open(p) as f:
        return json.load(f)


def parse_steer(spec: str) -> tuple[str, int, float]:
    """"SAE_DIR:FEATURE=SCALE" -> (dir, feature, scale); a malformed spec is a PicoError."""
    path, _, rest = spec.rpartition(":")
    feat, eq, scale = rest.partition("=")
    try:
        if not path or not eq:
            raise ValueError
        return path, int(feat), float(scale)
    except ValueError:
        raise PicoError(f"--steer {spec!r}: expected SAE_DIR:FEATURE=SCALE, e.g. sae/mlp0:12=4.0") from None


def steering_hooks(specs: list[str], model: nn.Module) -> dict[str, HookFn]:
    """{site: fn} that adds SCALE * W_dec[FEATURE] at every position of each spec's SAE site (specs on one
    site add up). A missing or corrupt SAE directory, a feature out of range, or a site this model lacks
    is a PicoError."""
    points = hook_points(model)
    vectors: dict[str, torch.Tensor] = {}
    for spec in specs:
        path, feat, scale = parse_steer(spec)
        sae = load_sae(path)
        site, n = sae.cfg.site, sae.cfg.features
        if not 0 <= feat < n:
            raise PicoError(f"--steer {spec!r}: feature {feat} is out of range; the SAE has {n} (0..{n - 1})")
        if site not in points:
            raise PicoError(f"--steer {spec!r}: the SAE reads {site}, which this model does not have")
        v = scale * sae.W_dec.detach()[feat]                      # (d_in,)
        vectors[site] = vectors[site] + v if site in vectors else v
    return {site: _adder(site, v) for site, v in vectors.items()}


def _adder(site: str, v: torch.Tensor) -> HookFn:
    def add(t: torch.Tensor, hp) -> torch.Tensor:
        if t.size(-1) != v.numel():
            raise PicoError(f"--steer: {site} has width {t.size(-1)} here but the SAE was trained on {v.numel()}")
        return t + v.to(device=t.device, dtype=t.dtype)
    return add
