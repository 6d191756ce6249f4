"""`pico-llm bench`: speed measured side by side in one process, medians over repeats after warm-up.

Reference config T4: 4 layers, 4 heads, n_embd 256, block 256, vocab 4096, batch 8, AdamW. The baseline
of the training ratio is bench/reference_gpt.py, a plain textbook GPT-2 (fp32, eager, no fusions), on
the identical config and data. Figures are ratios taken in the same run, so a noisy machine moves
both sides of each ratio alike.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import statistics
import time
from typing import Callable, Optional

import numpy as np
import torch

from .config import DataConfig, ModelConfig, SampleConfig, TrainConfig, resolve_model_config
from .data.batches import Batcher
from .data.corpus import build_corpus
from .data.sources import generate_numbers
from .data.stories import story_texts
from .data.tokenizers import build_tokenizer
from .device import autocast_factory, device_name, dtype_name, resolve_precision
from .export import llama_config, llama_state_dict
from .metrics import evaluate_sources, lm_loss
from .models import build_model, num_params
from .models.fused import fused_unavailable
from .sampling import for_sampling, generate, generate_batch, sample_next
from .training import Stepper, train_step
from .training.compile import maybe_compile
from .training.optim import make_optimizer

T4 = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=4096)
T4_BATCH = 8
KGRAM_LOOP = dict(V=50257, k=3, C=1024, T=32, B=4)  # the starter's k-gram setting
TOKENIZE_MB = {True: 5, False: 50}  # quick / full
QUALITY_STEPS = {True: 60, False: 200}
PEAK_MATMUL_N = 4096
BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load_bench_module(name: str):
    path = os.path.join(BENCH_DIR, f"{name}.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(f"picollm_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _median_time(fn: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync_for(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None],
                         warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn, timed in rounds (one call of each per round, after `warmup` calls
    each), so a load change on a shared machine falls on every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_peak_gflops(dtype: torch.dtype, device: str) -> float:
    n, repeats = PEAK_MATMUL_N, 5
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = _median_time(lambda: a @ b, repeats, 3, _sync_for(device))
    return 2 * n ** 3 / t / 1e9


def t4_model_configs() -> dict[str, ModelConfig]:
    """The three families on T4 at comparable parameter counts (~3.2-3.7 M)."""
    base = dict(vocab_size=T4["vocab_size"], block_size=T4["block_size"])
    C = T4["n_embd"]
    return {
        "transformer": resolve_model_config(preset="pico", model="transformer", n_layer=T4["n_layer"],
                                            n_head=T4["n_head"], n_embd=T4["n_embd"], **base),
        "lstm": ModelConfig(model="lstm", n_embd=C, hidden_size=2 * C, lstm_layers=2, **base),
        "kgram": ModelConfig(model="kgram", n_embd=C, kgram_k=3, kgram_variant="embedding",
                             num_inner_mlp_layers=2, **base),
    }


def _trainer(model, device: str, precision: str, optimizer: str = "auto") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x, y) -> loss: one optimizer step at lr 1e-3 through the training loop's own train_step (autocast,
    loss scaling where fp16, clipping, no host sync), with `pico-llm train`'s default optimizer (Muon for
    our Transformer) unless one is named (the plain reference GPT: AdamW)."""
    amp = resolve_precision(precision, device)
    opt = make_optimizer(model, TrainConfig(learning_rate=1e-3, warmup_steps=0, optimizer=optimizer), device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp == torch.float16)
    stepper = Stepper(model, model, opt, scaler, autocast_factory(device, amp), device)
    return lambda x, y: train_step(stepper, x, y, 1e-3)[0]


def _train_step_fn(model, data: torch.Tensor, batch: int, device: str, precision: str, optimizer: str = "auto"):
    """A closure doing one training step on the next `batch` rows of `data` (a fixed token tensor)."""
    step_on = _trainer(model, device, precision, optimizer)
    T = T4["block_size"]
    i = [0]

    def step():
        rows = torch.arange(i[0], i[0] + batch) % data.size(0)
        i[0] += batch
        return step_on(data[rows, :T], data[rows, 1:T + 1])

    return step


def bench_train(device: str, quick: bool, precision: str = "auto", compile: bool = False) -> dict:
    torch.manual_seed(0)
    V, T = T4["vocab_size"], T4["block_size"]
    data = torch.randint(V, (64, T + 1), device=device)
    repeats, warmup = (5, 2) if quick else (15, 3)
    sync = _sync_for(device)
    amp = resolve_precision(precision, device)
    peak = matmul_peak_gflops(amp or torch.float32, device)
    models, fns = {}, {}
    for name, cfg in t4_model_configs().items():
        models[name] = model = build_model(cfg).to(device)
        net = maybe_compile(model) if compile and name == "transformer" else model
        fns[name] = _train_step_fn(net, data, T4_BATCH, device, precision)
    ref_mod = _load_bench_module("reference_gpt")
    if ref_mod is not None:
        models["reference_gpt"] = ref = ref_mod.ReferenceGPT(V, T, T4["n_layer"], T4["n_head"], T4["n_embd"]).to(device)
        fns["reference_gpt"] = _train_step_fn(ref, data, T4_BATCH, device, "fp32", "adamw")
    t = _interleaved_medians(fns, repeats, sync, warmup)
    out = {}
    for name, model in models.items():
        tps = T4_BATCH * T / t[name]
        out[name] = {"tokens_per_s": tps, "params": num_params(model), "precision": "fp32"}
        if name != "reference_gpt":
            out[name].update(mfu=model.flops_per_token() * tps / (peak * 1e9), precision=dtype_name(amp))
    if ref_mod is None:
        out["reference_gpt"] = {"tokens_per_s": None}
    else:
        out["transformer"]["speedup_vs_reference"] = out["transformer"]["tokens_per_s"] / out["reference_gpt"]["tokens_per_s"]
    return out


VARIANTS = {  # the Transformer variants bench_variants times against the dense T4 model (pico preset)
    "dense": {},
    "gqa": dict(n_kv_heads=2),  # 2 kv heads for 4 query heads
    "mqa": dict(n_kv_heads=1),
    "moe": dict(n_experts=4, experts_per_token=1),  # equal active parameters: each expert as wide as the MLP
    "moe_top2": dict(n_experts=4, experts_per_token=2),
}


def bench_variants(device: str, quick: bool, precision: str = "auto") -> dict:
    """Training tokens/s (train_step, T4, batch 8) and decode tokens/s (128 new tokens after a 16-token
    prompt, top-p 0.95, batch 1, through `generate`'s default decode step) of GQA, MQA and MoE next to
    the dense T4 Transformer, each in interleaved rounds; the ratios are to dense."""
    torch.manual_seed(0)
    V, T = T4["vocab_size"], T4["block_size"]
    data = torch.randint(V, (64, T + 1), device=device)
    base = t4_model_configs()["transformer"]
    models = {name: build_model(dataclasses.replace(base, **fields)).to(device) for name, fields in VARIANTS.items()}
    train_fns = {name: _train_step_fn(m, data, T4_BATCH, device, precision) for name, m in models.items()}
    t_train = _interleaved_medians(train_fns, 3 if quick else 8, _sync_for(device), warmup=2)
    dtype = resolve_precision(precision, device)
    prompt = torch.randint(V, (1, 16), device=device)
    scfg = SampleConfig(max_new_tokens=128, top_p=0.95, seed=0)
    decoders = {}
    gen_fns = {}
    for name, m in models.items():
        m.eval()
        low = m if dtype is None else copy.deepcopy(m).to(dtype)
        decoders[name] = "torch" if fused_unavailable(low) else "fused"
        gen_fns[name] = lambda low=low: generate(low, prompt, scfg)
    t_gen = _interleaved_medians(gen_fns, 3 if quick else 5, _sync_for(device))
    out = {}
    for name, m in models.items():
        out[name] = {"params": num_params(m), "train_tokens_per_s": T4_BATCH * T / t_train[name],
                     "decode_tokens_per_s": scfg.max_new_tokens / t_gen[name], "decoder": decoders[name],
                     "flops_per_token": m.flops_per_token()}
    for r in out.values():
        r["train_vs_dense"] = r["train_tokens_per_s"] / out["dense"]["train_tokens_per_s"]
        r["decode_vs_dense"] = r["decode_tokens_per_s"] / out["dense"]["decode_tokens_per_s"]
    return out


def bench_quality(device: str, steps: int) -> tuple[dict, torch.nn.Module, tuple]:
    """Test loss after the same number of steps, ours (default settings) vs the fp32 reference, both at
    T4 (vocab 4096) on the numeric corpus with a BPE of at most 4096 ids: speed must not cost quality.
    Returns (results, our trained model, (its DataConfig, its tokenizer)), which the generation benches use."""
    V = T4["vocab_size"]
    dcfg = DataConfig(dataset="numbers", tokenizer="bpe", vocab_size=V, seed=0)
    corpus = build_corpus(dcfg)
    results, trained = {}, None
    ref_mod = _load_bench_module("reference_gpt")
    for name in ("transformer", "reference_gpt"):
        torch.manual_seed(0)
        if name == "transformer":
            model = trained = build_model(t4_model_configs()["transformer"]).to(device)
            precision = "auto"
        elif ref_mod is not None:
            model = ref_mod.ReferenceGPT(V, T4["block_size"], T4["n_layer"], T4["n_head"], T4["n_embd"]).to(device)
            precision = "fp32"
        else:
            continue
        train_step = _trainer(model, device, precision, "auto" if name == "transformer" else "adamw")
        batcher = Batcher(corpus.sources, T4["block_size"], T4_BATCH, seed=0)
        model.train()
        for _ in range(steps):
            train_step(*(t.to(device) for t in batcher.next_batch()))
        model.eval()
        r = evaluate_sources(model, corpus.sources, T4["block_size"], T4_BATCH, 8, device)
        results[name] = {"test_loss": r["test_loss"], "precision": precision}
    results["steps"] = steps
    results["tokenizer_vocab"] = corpus.tokenizer.vocab_size
    return results, trained, (dcfg, corpus.tokenizer)


@torch.no_grad()
def bench_generate(device: str, quick: bool, precision: str = "auto", model: Optional[torch.nn.Module] = None) -> dict:
    """256 new tokens after a 16-token prompt, top-p 0.95, batch 1, T4 Transformer: `model` (trained by
    bench_quality, so its next-token distributions look like a real model's) or a fresh one. Ours runs
    as `pico-llm generate` runs it (--precision auto: bf16 weights where the hardware runs bf16 fast;
    --decoder auto: the fused C decode step on a CPU), and also in fp32 and through the PyTorch step;
    HF generate runs a LlamaForCausalLM holding the same weights (our export's mapping), in fp32 (its
    default) and in our precision. Contenders are timed in interleaved rounds."""
    torch.manual_seed(0)
    cfg = t4_model_configs()["transformer"]
    if model is None:
        model = build_model(cfg).to(device)
    model.eval()
    dtype = resolve_precision(precision, device)
    ours = model if dtype is None else copy.deepcopy(model).to(dtype)
    prompt = torch.randint(cfg.vocab_size, (1, 16), device=device)
    n_new = 256
    scfg = SampleConfig(max_new_tokens=n_new, top_p=0.95, seed=0)

    def recompute():
        g = torch.Generator(device=device).manual_seed(0)
        idx = prompt
        for _ in range(n_new):
            logits = ours(idx[:, -cfg.block_size:])[:, -1, :]
            idx = torch.cat([idx, sample_next(logits, scfg, g)[:, None]], dim=1)
        return idx

    decoder = "torch" if fused_unavailable(ours) else "fused"
    fns: dict[str, Callable[[], object]] = {"kv_cache": lambda: generate(ours, prompt, scfg), "recompute": recompute}
    if decoder == "fused":  # the same KV-cache loop through the PyTorch step
        fns["kv_cache_torch"] = lambda: generate(ours, prompt, scfg, decoder="torch")
    if dtype is not None:
        fns["kv_cache_fp32"] = lambda: generate(model, prompt, scfg)
    note = None
    try:
        import transformers  # optional extra
    except ImportError:
        note = "transformers not installed (pip install -e .[hf])"
    else:
        hf_cfg = transformers.LlamaConfig(**{**llama_config(cfg, eot_id=0), "max_position_embeddings": 2 * cfg.block_size})
        hf = transformers.LlamaForCausalLM(hf_cfg).to(device).eval()
        missing, unexpected = hf.load_state_dict(llama_state_dict(model.state_dict(), cfg), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied head

        def hf_generate(m):
            torch.manual_seed(0)
            return m.generate(prompt, do_sample=True, top_p=0.95, top_k=0, max_new_tokens=n_new,
                              min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)

        fns["hf"] = lambda: hf_generate(hf)
        if dtype is not None:
            hf_low = copy.deepcopy(hf).to(dtype)
            fns["hf_same_precision"] = lambda: hf_generate(hf_low)
    t = _interleaved_medians(fns, 3 if quick else 5, _sync_for(device))
    rate = {name: n_new / sec for name, sec in t.items()}
    out = {"precision": dtype_name(dtype), "decoder": decoder, "kv_cache_tokens_per_s": rate["kv_cache"],
           "recompute_tokens_per_s": rate["recompute"], "hf_tokens_per_s": rate.get("hf"),
           "kv_cache_torch_tokens_per_s": rate.get("kv_cache_torch", rate["kv_cache"]),
           "kv_cache_fp32_tokens_per_s": rate.get("kv_cache_fp32", rate["kv_cache"]),
           "hf_same_precision_tokens_per_s": rate.get("hf_same_precision", rate.get("hf"))}
    out["kv_cache_vs_recompute"] = out["kv_cache_tokens_per_s"] / out["recompute_tokens_per_s"]
    out["kv_cache_torch_vs_recompute"] = out["kv_cache_torch_tokens_per_s"] / out["recompute_tokens_per_s"]
    if note:
        out["hf_note"] = note
        return out
    out["kv_cache_vs_hf"] = out["kv_cache_tokens_per_s"] / out["hf_tokens_per_s"]  # each tool's default
    out["kv_cache_vs_hf_same_precision"] = out["kv_cache_tokens_per_s"] / out["hf_same_precision_tokens_per_s"]
    out["fp32_vs_hf_fp32"] = out["kv_cache_fp32_tokens_per_s"] / out["hf_tokens_per_s"]
    return out


def bench_kgram_vs_loop(quick: bool, precision: str = "auto") -> dict:
    """Forward + backward at vocab 50257, k 3, embed 1024, seq 32, batch 4: ours vs the starter's loop.
    The loop's cost is linear in positions, so quick mode times 8 of 32 positions and scales by 4."""
    mod = _load_bench_module("starter_kgram")
    V, k, C, T, B = (KGRAM_LOOP[x] for x in ("V", "k", "C", "T", "B"))
    torch.manual_seed(0)
    tokens = torch.randint(V, (B, T))
    ours = build_model(ModelConfig(model="kgram", vocab_size=V, kgram_k=k, n_embd=C, block_size=T,
                                   kgram_variant="onehot", num_inner_mlp_layers=1))
    targets = torch.randint(V, (B, T))
    autocast = autocast_factory("cpu", resolve_precision(precision, "cpu"))

    def ours_step():  # as in training: default precision, gradients released after each step
        with autocast():
            logits = ours(tokens)
        lm_loss(logits, targets).backward()
        ours.zero_grad(set_to_none=True)

    t_ours = _median_time(ours_step, 3 if quick else 5, 1, lambda: None)
    out = {"ours_s": t_ours, "loop_s": None, "ratio": None,
           "precision": dtype_name(resolve_precision(precision, "cpu"))}
    if mod is None:
        return out
    starter = mod.StarterKGramMLP(V, k, C, 1)
    positions = max(1, T // 4) if quick else T

    def loop_step():
        logits = starter(tokens.t(), positions=positions)  # (T', B, V)
        lm_loss(logits.transpose(0, 1), targets[:, :positions]).backward()

    t0 = time.perf_counter()
    loop_step()
    t_loop = (time.perf_counter() - t0) * T / positions
    out.update(loop_s=t_loop, ratio=t_loop / t_ours, loop_positions_timed=positions)
    return out


def _texts_of(make: Callable[[int], list[str]], mb: float) -> list[str]:
    """Documents from make(seed), seed 0, 1, ..., until they hold mb megabytes of UTF-8."""
    texts, size, seed = [], 0, 0
    while size < mb * 1e6:
        batch = make(seed)
        texts.extend(batch)
        size += sum(len(t.encode("utf-8")) for t in batch)
        seed += 1
    return texts


def _bench_tokenizer_on(make: Callable[[int], list[str]], quick: bool) -> dict:
    texts = _texts_of(make, TOKENIZE_MB[quick])
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok = build_tokenizer("bpe", train_texts=_texts_of(make, min(2.0, TOKENIZE_MB[quick])), vocab_size=4096)
    ours, ref = tok.encode_documents(texts), tok.encode_documents_hf(texts)
    identical = all(np.array_equal(a, b) for a, b in zip(ours, ref))
    t = _interleaved_medians({"ours": lambda: tok.encode_documents(texts),
                              "hf": lambda: tok.encode_batch(texts)}, repeats=3, sync=lambda: None)
    return {"mb": mb, "tokenize_mb_per_s": mb / t["ours"], "hf_encode_batch_mb_per_s": mb / t["hf"],
            "vs_hf": t["hf"] / t["ours"], "encoder": tok.encoder, "ids_identical": identical,
            "tokens_per_byte": float(ours[1].sum()) / (mb * 1e6)}


def bench_tokenizer(quick: bool) -> dict:
    """bpe tokenization MB/s through pico-llm's `encode_documents` (what data preparation runs) and HF
    tokenizers' own `encode_batch` (the same tokenizer, both cores), in interleaved rounds, on English-like
    stories and on the numeric corpus; the ids compared in full."""
    return {"english": _bench_tokenizer_on(lambda seed: story_texts(2000, seed), quick),
            "numeric": _bench_tokenizer_on(lambda seed: generate_numbers(20000, seed), quick)}


# pico-llm's weights (generate --weights) and the GGUF type llama.cpp reads for each
LLAMA_PAIRS = (("fp32", "f32"), ("bf16", "f16"), ("int8", "q8_0"))


def _llama_generate(llm, prompt: list[int], n_new: int, top_p: float, greedy: bool = False) -> list[int]:
    """llama_cpp.Llama.generate for n_new tokens (top-p alone: top_k, min_p and the penalties off; greedy: top_k
    1), its KV cache emptied first so no round reuses the last one's prompt."""
    llm.reset()
    out = []
    kw = dict(top_k=1) if greedy else dict(top_k=0, top_p=top_p, min_p=0.0, temp=1.0)
    for tok in llm.generate(prompt, repeat_penalty=1.0, **kw):
        out.append(tok)
        if len(out) == n_new:
            break
    return out


@torch.no_grad()
def generation_vs_llama_cpp(run_dir: str, n_new: int = 200, prompt_len: int = 16, rounds: int = 5,
                            top_p: float = 0.95, pairs=LLAMA_PAIRS) -> dict:
    """Batch-1 generation of a Llama-style run: `generate` (the decode loop in C) with each of our weights
    against llama-cpp-python's Llama.generate on the GGUF file pico-llm's export writes of the same run
    (f32, f16, q8_0), the same prompt of prompt_len random ids, n_new tokens at top-p, torch's thread count
    for both, timed in interleaved rounds. Also: whether greedy decoding gives the same 32 tokens in fp32.
    Without llama-cpp-python: {"llama_cpp": None, "note": ...}."""
    try:
        import llama_cpp
    except ImportError:
        return {"llama_cpp": None, "note": "llama-cpp-python is not installed (make test-all installs it)"}
    import tempfile

    from .checkpoint import load_run
    from .export.gguf import export_gguf

    model, _, _ = load_run(run_dir)
    cfg = model.cfg
    prompt = torch.randint(cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    scfg = SampleConfig(max_new_tokens=n_new, top_p=top_p, seed=0)
    threads = torch.get_num_threads()
    fns: dict[str, Callable[[], object]] = {}
    llms, greedy = [], {}
    with tempfile.TemporaryDirectory(prefix="pico-gguf-") as tmp:
        for ours, theirs in pairs:
            m, dec = for_sampling(copy.deepcopy(model), ours, "cpu")
            fns[f"pico_{ours}"] = lambda m=m, dec=dec: generate(m, prompt, scfg, decoder=dec)
            path = os.path.join(tmp, f"{theirs}.gguf")
            export_gguf(run_dir, path, dtype=theirs, log=lambda _msg: None)
            llm = llama_cpp.Llama(path, n_ctx=max(cfg.block_size, prompt_len + n_new + 1), n_threads=threads,
                                  n_threads_batch=threads, verbose=False)
            llms.append(llm)
            fns[f"llama_{theirs}"] = lambda llm=llm: _llama_generate(llm, prompt[0].tolist(), n_new, top_p)
            if ours == "fp32":
                g = SampleConfig(max_new_tokens=32, greedy=True)
                greedy = {"pico": generate(m, prompt, g, decoder=dec)[0, prompt_len:].tolist(),
                          "llama_cpp": _llama_generate(llm, prompt[0].tolist(), 32, top_p, greedy=True)}
        t = _interleaved_medians(fns, rounds, sync=lambda: None)
        for llm in llms:
            llm.close()
    rate = {name: n_new / sec for name, sec in t.items()}
    out = {"llama_cpp": llama_cpp.__version__, "model": f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, vocab "
           f"{cfg.vocab_size}", "params": num_params(model), "n_new": n_new, "prompt_len": prompt_len,
           "top_p": top_p, "threads": threads, "rounds": rounds, "tokens_per_s": rate,
           "greedy_32_identical": greedy["pico"] == greedy["llama_cpp"] if greedy else None}
    out["ratios"] = {f"{ours} vs {theirs}": rate[f"pico_{ours}"] / rate[f"llama_{theirs}"] for ours, theirs in pairs}
    return out


@torch.no_grad()
def bench_streams(model: torch.nn.Module, n_new: int = 128, streams: int = 8, rounds: int = 5,
                  weights: tuple = ("fp32", "bf16", "int8")) -> dict:
    """Aggregate tokens/s of `streams` prompts of different lengths decoded together (generate_batch: one
    batched C step per position, as the server's RowPool steps concurrent requests) against one prompt
    alone, top-p 0.95, for each weight type; interleaved rounds."""
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(V, (4 + 3 * i,), generator=g).tolist() for i in range(streams)]
    scfg = SampleConfig(max_new_tokens=n_new, top_p=0.95, seed=0)
    fns = {}
    for w in weights:
        m, dec = for_sampling(copy.deepcopy(model), w, "cpu")
        fns[f"{w} x1"] = lambda m=m, dec=dec: generate_batch(m, prompts[:1], scfg, decoder=dec)
        fns[f"{w} x{streams}"] = lambda m=m, dec=dec: generate_batch(m, prompts, scfg, decoder=dec)
    t = _interleaved_medians(fns, rounds, sync=lambda: None)
    out = {}
    for w in weights:
        one, many = n_new / t[f"{w} x1"], streams * n_new / t[f"{w} x{streams}"]
        out[w] = {"one_tokens_per_s": one, "streams_tokens_per_s": many, "ratio": many / one}
    return {"streams": streams, "n_new": n_new, "weights": out}


def bench_decode(model: torch.nn.Module, dcfg: DataConfig, tokenizer, quick: bool) -> dict:
    """The CPU decode loop (fused_decode.c) on bench_quality's trained T4 model: batch-1 generation with
    fp32, bf16 and int8 weights against llama.cpp on the same weights (the model saved as a run, its GGUF
    written by pico-llm's export; null without llama-cpp-python), and 8 concurrent streams against one."""
    import tempfile

    from .checkpoint import save_config, save_weights

    model = copy.deepcopy(model).float().cpu().eval()
    V = tokenizer.vocab_size
    if V < model.cfg.vocab_size:  # the numeric corpus's BPE has fewer ids than T4's 4096: a run (and its GGUF)
        # holds as many as its tokenizer, so the model keeps its first V rows (the only ids it was trained on)
        small = build_model(dataclasses.replace(model.cfg, vocab_size=V)).eval()
        small.load_state_dict({k: v[:V] if k in ("wte.weight", "head.weight") else v for k, v in model.state_dict().items()})
        model = small
    n_new = 64 if quick else 200
    with tempfile.TemporaryDirectory(prefix="pico-bench-run-") as run:
        save_config(run, model.cfg, dcfg, TrainConfig())
        save_weights(run, model, 0)
        tokenizer.save(run)
        vs = generation_vs_llama_cpp(run, n_new=n_new, rounds=3 if quick else 7)
    return {"vs_llama_cpp": vs, "streams": bench_streams(model, n_new=32 if quick else 128, rounds=2 if quick else 5)}


def run_bench(quick: bool = False, device: str = "cpu", precision: str = "auto", compile: bool = False,
              log: Callable[[str], None] = print) -> dict:
    amp = resolve_precision(precision, device)
    res: dict = {"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "quick": quick}
    log("peak matmul ...")
    res["peak_gflops"] = {"fp32": matmul_peak_gflops(torch.float32, device), "bf16": matmul_peak_gflops(torch.bfloat16, device)}
    log("training tokens/s on T4 ...")
    res["train"] = bench_train(device, quick, precision, compile)
    log("test loss after the same steps ...")
    res["quality"], trained, data = bench_quality(device, QUALITY_STEPS[quick])
    log("generation ...")
    res["generate"] = bench_generate(device, quick, precision, trained)
    if device == "cpu":
        log("the decode loop in C: weights, llama.cpp, concurrent streams ...")
        res["decode"] = bench_decode(trained, *data, quick)
    log("Transformer variants (GQA, MQA, MoE) ...")
    res["variants"] = bench_variants(device, quick, precision)
    log("k-gram vs the starter's loop ...")
    res["kgram_vs_loop"] = bench_kgram_vs_loop(quick, precision)
    log("tokenizer throughput ...")
    res["data"] = bench_tokenizer(quick)
    res["precision"] = dtype_name(amp)
    return res


def _decode_report(d: dict) -> list[str]:
    vs, st = d["vs_llama_cpp"], d["streams"]
    lines = [""]
    if vs.get("llama_cpp") is None:
        lines.append(f"vs llama.cpp: null ({vs['note']})")
    else:
        lines += [f"batch 1 vs llama.cpp {vs['llama_cpp']} on the same weights ({vs['model']}, {vs['n_new']} tokens, "
                  f"top-p {vs['top_p']}, {vs['threads']} threads; greedy 32 tokens identical: {vs['greedy_32_identical']}):",
                  "| weights | pico-llm tok/s | llama.cpp | llama.cpp tok/s | ratio |", "|---|---|---|---|---|"]
        for ours, theirs in LLAMA_PAIRS:
            t = vs["tokens_per_s"]
            lines.append(f"| {ours} | {t['pico_' + ours]:,.0f} | {theirs} | {t['llama_' + theirs]:,.0f} | "
                         f"{vs['ratios'][f'{ours} vs {theirs}']:.2f}x |")
    lines += ["", f"| weights | 1 stream tok/s | {st['streams']} streams tok/s | ratio |", "|---|---|---|---|"]
    for w, r in st["weights"].items():
        lines.append(f"| {w} | {r['one_tokens_per_s']:,.0f} | {r['streams_tokens_per_s']:,.0f} | {r['ratio']:.2f}x |")
    return lines


def format_report(res: dict) -> str:
    tr, g, q = res["train"], res["generate"], res["quality"]
    lines = [f"device: {res['device']}, torch {res['torch']}, {res['threads']} threads, precision {res['precision']}",
             f"peak matmul: fp32 {res['peak_gflops']['fp32']:.0f} GFLOP/s, bf16 {res['peak_gflops']['bf16']:.0f} GFLOP/s",
             "", "| train (T4) | params | tokens/s | MFU |", "|---|---|---|---|"]
    for name in ("transformer", "lstm", "kgram", "reference_gpt"):
        r = tr[name]
        if r.get("tokens_per_s") is None:
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        lines.append(f"| {name} ({r['precision']}) | {r.get('params', 0):,} | {r['tokens_per_s']:,.0f} | {mfu} |")
    if "speedup_vs_reference" in tr["transformer"]:
        lines.append(f"\ntransformer vs reference: {tr['transformer']['speedup_vs_reference']:.2f}x tokens/s")
    if "reference_gpt" in q:
        lines.append(f"test loss after {q['steps']} steps: transformer {q['transformer']['test_loss']:.4f}, "
                     f"reference {q['reference_gpt']['test_loss']:.4f}")
    lines.append(f"generate 256 tokens ({g['precision']}, {g['decoder']} decode step): KV cache "
                 f"{g['kv_cache_tokens_per_s']:,.0f} tok/s, recompute {g['recompute_tokens_per_s']:,.0f} "
                 f"({g['kv_cache_vs_recompute']:.1f}x)")
    if g["decoder"] != "torch":
        lines.append(f"  KV cache through the PyTorch step: {g['kv_cache_torch_tokens_per_s']:,.0f} tok/s "
                     f"({g['kv_cache_torch_vs_recompute']:.1f}x recompute)")
    if g.get("hf_tokens_per_s"):
        lines.append(f"  vs HF generate: fp32 {g['hf_tokens_per_s']:,.0f} tok/s ({g['kv_cache_vs_hf']:.1f}x), "
                     f"{g['precision']} {g['hf_same_precision_tokens_per_s']:,.0f} ({g['kv_cache_vs_hf_same_precision']:.1f}x); "
                     f"ours in fp32 {g['kv_cache_fp32_tokens_per_s']:,.0f} ({g['fp32_vs_hf_fp32']:.1f}x HF fp32)")
    if "decode" in res:
        lines += _decode_report(res["decode"])
    lines += ["", "| variant (T4) | params | train tokens/s | vs dense | decode tokens/s | vs dense | decode step |",
              "|---|---|---|---|---|---|---|"]
    for name, r in res["variants"].items():
        lines.append(f"| {name} | {r['params']:,} | {r['train_tokens_per_s']:,.0f} | {r['train_vs_dense']:.2f}x | "
                     f"{r['decode_tokens_per_s']:,.0f} | {r['decode_vs_dense']:.2f}x | {r['decoder']} |")
    lines.append("")
    kg = res["kgram_vs_loop"]
    if kg.get("ratio"):
        lines.append(f"k-gram fwd+bwd: {kg['ours_s'] * 1e3:.1f} ms vs starter loop {kg['loop_s']:.1f} s ({kg['ratio']:,.0f}x)")
    for kind, d in res["data"].items():
        lines.append(f"bpe tokenizer, {kind} text ({d['mb']:.0f} MB): {d['tokenize_mb_per_s']:.1f} MB/s ({d['encoder']}), "
                     f"HF encode_batch {d['hf_encode_batch_mb_per_s']:.1f} MB/s ({d['vs_hf']:.1f}x), "
                     f"ids {'identical' if d['ids_identical'] else 'DIFFERENT'}")
    return "\n".join(lines)
