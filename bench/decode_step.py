"""The CPU decode step and loop: by weights, batch and model size; against llama.cpp on the same weights.

    python bench/decode_step.py                    # steps: T4 and a GPT-2-small-size model, batches 1 to 64
    python bench/decode_step.py --quick            # steps: T4 only
    python bench/decode_step.py --run RUN [--size gpt2-small] [--json FILE]

Steps: each feeds one token per row after a 16-token prefix; the PyTorch step (bf16 and fp32 weights) and the
fused C step (bf16, fp32 and int8 weights) are timed in interleaved rounds (medians). Where PyTorch and the
fused step cross is what picollm.sampling.FUSED_MAX_BATCH (the largest batch `--decoder auto` gives to the
fused step) was set from.

--run RUN (a Llama-style run: pico-llm's GGUF export writes it for llama.cpp): batch-1 generation, `generate`
(the decode loop in C) with fp32, bf16 and int8 weights against llama-cpp-python's Llama.generate on the f32,
f16 and q8_0 GGUF files written from the same run (16-token prompt, 200 new tokens, top-p 0.95, torch's thread
count for both; picollm.bench.generation_vs_llama_cpp); then concurrent streams through the server's engine
(picollm.serve.engine: the requests' rows share one batched C step a round), 1 against 8, each request 128
tokens at top-p 0.95. --size gpt2-small swaps the run's model for a fresh one of 12 layers, n_embd 768, 12
heads, block 1024 (the run's tokenizer, vocabulary and architecture otherwise), written to a temporary run.
"""

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the command line does (picollm/device.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from picollm import checkpoint as ckpt  # noqa: E402
from picollm.bench import _interleaved_medians, generation_vs_llama_cpp, t4_model_configs  # noqa: E402
from picollm.config import ModelConfig, SampleConfig  # noqa: E402
from picollm.models import build_model  # noqa: E402
from picollm.models.fused import FusedDecoder, fused_unavailable  # noqa: E402
from picollm.sampling import for_sampling  # noqa: E402
from picollm.serve.engine import Engine, Job, ServedModel  # noqa: E402

PROMPTS = ["Once upon a time", "The function", "import os", "class A:", "def f(x):", "The module", "In Python",
           "Note that"]


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
def step_table(quick: bool) -> list[str]:
    configs = {"T4": t4_model_configs()["transformer"]}
    if not quick:
        configs["GPT-2 small size"] = ModelConfig(vocab_size=50257, block_size=1024, n_embd=768, n_layer=12, n_head=12)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per decode step (median)\n",
             "| model | weights | batch | PyTorch step | fused step | PyTorch / fused |", "|---|---|---|---|---|---|"]
    for name, cfg in configs.items():
        torch.manual_seed(0)
        fp32 = build_model(cfg).eval()
        reason = fused_unavailable(fp32)
        if reason:
            raise SystemExit(f"error: {reason}")
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        for wname, model in (("bf16", bf16), ("fp32", fp32), ("int8", fp32)):
            for batch in (1, 4, 8, 16, 64):
                n = 32 if name == "T4" else 8
                fns = {"fused": steps_fn(FusedDecoder(model, "int8" if wname == "int8" else "model"), cfg.vocab_size,
                                         batch, n)}
                if wname != "int8":  # PyTorch has no int8 step
                    fns["torch"] = steps_fn(model, cfg.vocab_size, batch, n)
                t = _interleaved_medians(fns, repeats=5, sync=lambda: None)
                us = {k: v / n * 1e6 for k, v in t.items()}
                torch_us = f"{us['torch']:,.0f}" if "torch" in us else "—"
                ratio = f"{us['torch'] / us['fused']:.2f}x" if "torch" in us else "—"
                lines.append(f"| {name} | {wname} | {batch} | {torch_us} | {us['fused']:,.0f} | {ratio} |")
    return lines


def gpt2_small_run(run: str, out: str) -> str:
    """A fresh 12-layer, n_embd-768 model of the run's architecture and tokenizer, saved as a run in out."""
    mcfg, dcfg, tcfg = ckpt.load_config(run)
    big = dataclasses.replace(mcfg, n_layer=12, n_embd=768, n_head=12, n_kv_heads=12 // (mcfg.n_head // mcfg.n_kv_heads),
                              block_size=1024)
    path = os.path.join(out, "gpt2-small-size")
    os.makedirs(path)
    ckpt.save_config(path, big, dcfg, tcfg)
    torch.manual_seed(0)
    ckpt.save_weights(path, build_model(big), 0)
    _, tok, _ = ckpt.load_run(run)
    tok.save(path)
    return path


def engine_streams(run: str, weights: str, n_new: int, rounds: int, streams: int = 8) -> dict:
    """Aggregate tokens/s of `streams` concurrent requests through the server's engine against one, in
    interleaved rounds."""
    model, tok, configs = ckpt.load_run(run)
    model, dec = for_sampling(model.eval(), weights, "cpu")
    served = ServedModel(id="m", run_dir=run, model=model, tokenizer=tok, configs=configs, summary={}, created=0,
                         decoder=dec)
    engine = Engine(max_active=streams, max_new_tokens=n_new)

    def run_k(k: int) -> float:
        done = threading.Semaphore(0)
        jobs = [Job(served, [tok.encode(PROMPTS[i % len(PROMPTS)])], SampleConfig(max_new_tokens=n_new, top_p=0.95,
                    seed=i), 1, [], None, emit=lambda kind, _p: done.release() if kind in ("done", "error") else None)
                for i in range(k)]
        t = time.perf_counter()
        for j in jobs:
            engine.submit(j)
        for _ in jobs:
            done.acquire()
        return sum(c.tokens for j in jobs for c in j.choices) / (time.perf_counter() - t)

    run_k(1)  # warm-up: the pool's KV caches are made at the first request
    rates: dict[int, list[float]] = {1: [], streams: []}
    for _ in range(rounds):
        for k in rates:
            rates[k].append(run_k(k))
    engine.close()
    one, many = statistics.median(rates[1]), statistics.median(rates[streams])
    return {"weights": weights, "one_tokens_per_s": one, "streams": streams, "streams_tokens_per_s": many,
            "ratio": many / one}


def run_report(run: str, size: str, rounds: int) -> tuple[list[str], dict]:
    with tempfile.TemporaryDirectory(prefix="pico-decode-") as tmp:
        if size == "gpt2-small":
            run = gpt2_small_run(run, tmp)
        n_new = 200 if size == "run" else 64
        vs = generation_vs_llama_cpp(run, n_new=n_new, rounds=rounds)
        streams = [engine_streams(run, w, 128, rounds) for w in ("bf16", "int8")]
    lines = []
    if vs.get("llama_cpp") is None:
        lines.append(f"vs llama.cpp: null ({vs['note']})")
    else:
        lines += [f"{vs['model']} ({vs['params']:,} parameters), {vs['n_new']} new tokens after {vs['prompt_len']}, top-p "
                  f"{vs['top_p']}, {vs['threads']} threads, {vs['rounds']} interleaved rounds; llama-cpp-python "
                  f"{vs['llama_cpp']}; greedy 32 tokens identical (fp32 / f32): {vs['greedy_32_identical']}\n",
                  "| pico-llm weights | tok/s | llama.cpp GGUF | tok/s | pico-llm / llama.cpp |", "|---|---|---|---|---|"]
        for pair, ratio in vs["ratios"].items():
            ours, theirs = pair.split(" vs ")
            t = vs["tokens_per_s"]
            lines.append(f"| {ours} | {t['pico_' + ours]:,.0f} | {theirs} | {t['llama_' + theirs]:,.0f} | {ratio:.2f}x |")
    lines += ["", "| weights | 1 request tok/s | 8 concurrent requests tok/s | ratio |", "|---|---|---|---|"]
    for s in streams:
        lines.append(f"| {s['weights']} | {s['one_tokens_per_s']:,.0f} | {s['streams_tokens_per_s']:,.0f} | {s['ratio']:.2f}x |")
    return lines, {"vs_llama_cpp": vs, "streams": streams}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--run", default=None, help="a Llama-style run: generation against llama.cpp, and streams")
    ap.add_argument("--size", choices=["run", "gpt2-small"], default="run")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.run is None:
        print("\n".join(step_table(a.quick)))
        return
    if not ckpt.is_run(a.run):
        print(f"error: {a.run} is not a run directory", file=sys.stderr)
        raise SystemExit(2)
    lines, res = run_report(a.run, a.size, a.rounds)
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
