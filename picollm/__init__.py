"""pico-llm: a laboratory for tiny language models (k-gram MLP, LSTM, Transformer).

    model, tokenizer, config = picollm.load("runs/NAME")
    text = picollm.generate(model, tokenizer, "0 1 2 3 4", max_new_tokens=20, greedy=True)
"""

from __future__ import annotations

import os

# Large CPU tensors on transparent huge pages (PyTorch reads THP_MEM_ALLOC_ENABLE at its first large
# allocation). A fresh gradient of hundreds of MB otherwise page-faults 4 KB at a time: the one-hot
# k-gram's first layer (V=50257, k=3, C=1024) spent ~2/3 of its training step there. Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"


def load(path: str, device: str = "cpu"):
    """(model, tokenizer, (ModelConfig, DataConfig, TrainConfig)) from a run directory."""
    from .checkpoint import load_run

    return load_run(path, device)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 50, *, temperature: float = 1.0,
             top_k=None, top_p=None, greedy: bool = False, stop_at_eot: bool = False, seed=None,
             num_samples: int = 1, decoder: str = "auto"):
    """Prompt -> completion text (a list when num_samples > 1). decoder: auto | fused | torch, as
    `pico-llm generate --decoder`."""
    from .config import SampleConfig
    from .errors import PicoError
    from .sampling import generate_text

    if prompt == "":
        raise PicoError("the prompt must not be empty")
    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       greedy=greedy, stop_at_eot=stop_at_eot, seed=seed)
    device = next(model.parameters()).device
    texts = generate_text(model, tokenizer, prompt, cfg, num_samples=num_samples, device=device, decoder=decoder)
    return texts if num_samples > 1 else texts[0]
