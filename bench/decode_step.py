"""One Transformer decode step, the fused C step against the PyTorch step, by batch size and model size.

    python bench/decode_step.py                # T4 and a GPT-2-small-size model, batches 1 to 64
    python bench/decode_step.py --quick        # T4 only

Each step feeds one token per row after a 16-token prefix; the two decoders are timed in interleaved
rounds (medians), in bf16 and fp32 weights. Where the two cross is what picollm.sampling.FUSED_MAX_BATCH
(the largest batch `--decoder auto` gives to the fused step) was set from.
"""

import argparse
import copy

import torch

from picollm.bench import _interleaved_medians, t4_model_configs
from picollm.config import ModelConfig
from picollm.models import build_model
from picollm.models.fused import FusedDecoder, fused_unavailable


def steps_fn(stepper, vocab: int, batch: int, n: int):
    """n decode steps after a 16-token prefix, which is fed once, outside the timing: each call rewinds
    the state to the prefix (the cache past it is overwritten)."""
    idx = torch.randint(vocab, (batch, 17))
    state = stepper.new_state(batch, "cpu")
    stepper.step(idx[:, :16], state)

    def run():
        state.pos = 16
        for _ in range(n):
            stepper.step(idx[:, 16:], state)
    return run


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    configs = {"T4": t4_model_configs()["transformer"]}
    if not a.quick:
        configs["GPT-2 small size"] = ModelConfig(vocab_size=50257, block_size=1024, n_embd=768, n_layer=12, n_head=12)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per decode step (median)\n")
    print("| model | weights | batch | PyTorch step | fused step | PyTorch / fused |\n|---|---|---|---|---|---|")
    for name, cfg in configs.items():
        torch.manual_seed(0)
        fp32 = build_model(cfg).eval()
        reason = fused_unavailable(fp32)
        if reason:
            raise SystemExit(f"error: {reason}")
        for wname, model in (("bf16", copy.deepcopy(fp32).to(torch.bfloat16)), ("fp32", fp32)):
            for batch in (1, 4, 8, 16, 64):
                n = 32 if name == "T4" else 8
                t = _interleaved_medians({"torch": steps_fn(model, cfg.vocab_size, batch, n),
                                          "fused": steps_fn(FusedDecoder(model), cfg.vocab_size, batch, n)},
                                         repeats=5, sync=lambda: None)
                us = {k: v / n * 1e6 for k, v in t.items()}
                print(f"| {name} | {wname} | {batch} | {us['torch']:,.0f} | {us['fused']:,.0f} | "
                      f"{us['torch'] / us['fused']:.2f}x |")


if __name__ == "__main__":
    main()
