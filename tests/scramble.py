"""A helper the model-equivalence tests share (export to HF, export to GGUF)."""

import shutil

import torch

from picollm import checkpoint as ckpt


def scrambled_copy(run, dest, seed):
    """A copy of a run with large random weights: a few training steps leave a tiny model's greedy
    output one repeated token, which would not tell a broken KV cache, position table or row order apart."""
    shutil.copytree(run, dest)
    model = ckpt.load_run(dest)[0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ckpt.save_weights(dest, model, step=0)
    return dest
