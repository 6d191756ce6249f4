"""pico-llm: a laboratory for tiny language models (k-gram MLP, LSTM, Transformer).

    model, tokenizer, config = picollm.load("runs/NAME")
    text = picollm.generate(model, tokenizer, "0 1 2 3 4", max_new_tokens=20, greedy=True)
    logits, cache = picollm.run_with_cache(model, idx, ["blocks.0.attn.hook_pattern"])  # named activations
    logits = picollm.run_with_hooks(model, idx, {"blocks.0.attn.hook_z": fn})  # fn(t, hook) -> t or None
"""

from __future__ import annotations

# Transparent huge pages (THP_MEM_ALLOC_ENABLE) are switched on by the command line's entry points only
# (picollm.device.enable_transparent_huge_pages): importing a library leaves its host's environment alone.

__version__ = "0.1.0"

# The functions below import what they use when called: `import picollm.config` (or any light module)
# must not load torch, the models and the data stack through this package's __init__.


def load(path: str, device: str = "cpu"):
    """(model, tokenizer, (ModelConfig, DataConfig, TrainConfig)) from a run directory."""
    from .checkpoint import load_run

    return load_run(path, device)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 50, *, temperature: float = 1.0,
             top_k=None, top_p=None, greedy: bool = False, stop_at_eot: bool = False, seed=None,
             num_samples: int = 1, decoder: str = "auto"):
    """Prompt -> completion text (a list when num_samples > 1); an empty prompt samples from the
    end-of-text token alone. decoder: auto | fused | torch, as `pico-llm generate --decoder`."""
    from .config import SampleConfig
    from .sampling import generate_text

    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       greedy=greedy, stop_at_eot=stop_at_eot, seed=seed)
    device = next(model.parameters()).device
    texts = generate_text(model, tokenizer, prompt, cfg, num_samples=num_samples, device=device, decoder=decoder)
    return texts if num_samples > 1 else texts[0]


def run_with_cache(model, idx, names=None):
    """(logits, {hook name: activation}) of model(idx) in eval mode without gradients. names: None (every
    hook point), a list of names, or a predicate on names; see picollm.models.hooks for the names."""
    from .models.hooks import run_with_cache as run

    return run(model, idx, names)


def run_with_hooks(model, idx, fns):
    """model(idx)'s logits in eval mode with {hook name: fn(tensor, hook_point) -> replacement or None}
    applied; the hooks are removed afterwards."""
    from .models.hooks import run_with_hooks as run

    return run(model, idx, fns)
