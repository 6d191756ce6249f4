"""Regression tests for defects found in review: each failed on the code before its fix."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from picollm import checkpoint as ckpt
from picollm.cli import main
from picollm.config import DataConfig, ModelConfig, TrainConfig
from picollm.data.batches import eval_windows
from picollm.data.corpus import build_corpus
from picollm.errors import PicoError
from picollm.evaluate import evaluate_run
from picollm.experiments import compare, report
from picollm.metrics import evaluate_sources
from picollm.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "numbers", "--numbers_count", "120", "--tokenizer", "byte", "--embed_size", "16",
        "--block_size", "16", "--batch_size", "4", "--max_steps_per_epoch", "4", "--eval_batches", "3",
        "--no_progress", "--prompt", "1 2", "--max_new_tokens", "4"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- 1. report/compare with gaps and NaN

def summary(test_loss, accuracy):
    return {"model": "transformer", "params": 1234, "steps": 20, "train_loss": 2.0, "test_loss": test_loss,
            "best_test_loss": test_loss, "best_step": 20, "bits_per_byte": test_loss * 0.5, "tokens_per_s": 900.0,
            "train_seconds": 1.5, "continuation_accuracy": accuracy}


def hand_sweep(root):
    """A sweep written by hand: numeric data (continuation accuracy), text data (none: null in one
    summary, absent from another) and a diverged point (NaN losses); metrics with a null and a NaN
    evaluation."""
    points = {"data=numbers": (summary(2.1, 0.5), [2.5, 2.1]),
              "data=text": (summary(2.0, None), [None, 2.0]),
              "data=text2": ({k: v for k, v in summary(2.05, None).items() if k != "continuation_accuracy"}, [2.3, 2.05]),
              "data=diverged": (summary(math.nan, None), [math.nan, 2.2, math.nan])}
    os.makedirs(root)
    for name, (s, tests) in points.items():
        d = os.path.join(root, name)
        os.makedirs(d)
        ckpt.save_config(d, ModelConfig(), DataConfig(dataset="numbers"), TrainConfig())
        recs = []
        for i, t in enumerate(tests, 1):
            recs += [{"step": 10 * i, "train_loss": 3.0 - 0.1 * i}, {"step": 10 * i, "test_loss": t, "bits_per_byte": 1.0}]
        ckpt.append_metrics(d, recs)
        ckpt.write_json(os.path.join(d, ckpt.SUMMARY), s)
    ckpt.write_json(os.path.join(root, "sweep.json"), {
        "name": "mixed", "description": "numeric and text data", "x": "data", "swept": ["data"], "base": {},
        "points": [{"run": n, "values": {"data": n[5:]}, "settings": {"data": n[5:]}} for n in points]})
    return root


def test_report_and_compare_take_results_with_gaps_and_nan(tmp_path):
    root = hand_sweep(str(tmp_path / "mixed"))
    page = report.render_report(root, max_new_tokens=4)
    results = page.split("<h2>Results</h2>")[1].split("</table>")[0]
    best = re.findall(r'<td class="num best">([^<]*)</td>', results)
    # row by row: numbers has the best accuracy, text the best losses; NaN and missing are never best
    assert best == ["0.500", "2.0000", "2.0000", "1.000"]
    assert ">diverged<" in results  # its NaN was written as null (strict JSON): shown as missing, never best
    r = compare.compare_runs([root], out=str(tmp_path / "cmp"), log=lambda s: None)["runs"]
    assert r["data=diverged"]["best_step"] == 20 and r["data=diverged"]["best_test_loss"] == 2.2
    assert r["data=text"]["best_step"] == 20 and r["data=text"]["evaluations"] == 1
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| data=text |" in table and "0.500" in table


# --------------------------------------------------------------------------- 2. padded runs evaluated on padded rows

def padded_reference(model, split, block_size, n_docs):
    """Mean cross-entropy per target token over the first n_docs documents, each scored alone (no
    padding at all), cut at block_size targets as padded training cuts them."""
    total, count = 0.0, 0
    for d in range(n_docs):
        row = torch.from_numpy(split.tokens[split.starts[d]: split.starts[d] + split.lengths[d] + 1].astype("int64"))
        row = row[: block_size + 1]
        with torch.no_grad():
            logits = model(row[None, :-1])
        total += F.cross_entropy(logits[0].float(), row[1:], reduction="sum").item()
        count += len(row) - 1
    return total / count


def packed_reference(model, split, block_size, batch_size, max_batches):
    losses = []
    for x, y in eval_windows(split, block_size, batch_size, max_batches):
        with torch.no_grad():
            logits = model(x)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"))
    return torch.cat(losses).mean().item()


@pytest.mark.parametrize("family", ["transformer", "lstm"])
def test_padded_batching_is_evaluated_on_padded_document_rows(family):
    corpus = build_corpus(DataConfig(dataset="numbers", numbers_count=200, tokenizer="byte", batching="padded"))
    torch.manual_seed(0)
    T, B, n = 64, 4, 3
    model = build_model(ModelConfig(model=family, vocab_size=corpus.tokenizer.vocab_size, block_size=T, n_embd=16,
                                    n_head=2, n_layer=1)).eval()
    split = corpus.sources[0].test
    lengths = split.lengths[: B * n]
    assert lengths.min() > 0 and lengths.min() < T - 1 and lengths.max() > T  # padded rows and cut ones
    padded = evaluate_sources(model, corpus.sources, T, B, n, batching="padded")
    assert padded["test_loss"] == pytest.approx(padded_reference(model, split, T, B * n), rel=1e-5)
    packed = evaluate_sources(model, corpus.sources, T, B, n)  # the default: packed, exactly as before
    assert packed == evaluate_sources(model, corpus.sources, T, B, n, batching="packed")
    assert packed["test_loss"] == pytest.approx(packed_reference(model, split, T, B, n), rel=1e-6)
    assert packed["test_loss"] != pytest.approx(padded["test_loss"], rel=1e-6)  # other rows: another figure
    with pytest.raises(PicoError, match="unknown batching"):
        evaluate_sources(model, corpus.sources, T, B, n, batching="ragged")


def test_eval_of_a_padded_run_scores_padded_rows(tmp_path):
    assert main(["train", *TINY, "--models", "transformer", "--n_heads", "2", "--n_blocks", "1", "--batching", "padded",
                 "--block_size", "64", "--output_dir", str(tmp_path), "--run_name", "padded"]) == 0
    run = str(tmp_path / "padded")
    model, tok, (mcfg, dcfg, tcfg) = ckpt.load_run(run)
    assert dcfg.batching == "padded" and mcfg.block_size == 64
    corpus = build_corpus(dcfg, tokenizer=tok)
    got = evaluate_run(run, batch_size=4, max_batches=3, precision="fp32")  # the reference runs in fp32
    assert got["test_loss"] == pytest.approx(padded_reference(model, corpus.sources[0].test, 64, 12), rel=1e-5)


# --------------------------------------------------------------------------- 3. config validation

def test_log_interval_must_be_at_least_one(tmp_path, capsys):
    with pytest.raises(PicoError, match=r"^--log_interval must be >= 1, got 0$"):
        TrainConfig(log_interval=0)
    assert main(["train", *TINY, "--models", "lstm", "--log_interval", "0", "--output_dir", str(tmp_path)]) == 2
    assert "--log_interval must be >= 1" in one_line_error(capsys)
    assert not (tmp_path / "lstm").exists()


def test_heads_are_checked_for_the_transformer_only(tmp_path, capsys):
    ModelConfig(model="lstm", n_embd=30, n_head=4)  # n_head means nothing to an LSTM ...
    ModelConfig(model="kgram", n_embd=12, n_head=4, pos_emb="rope")  # ... nor to the k-gram MLP (odd head size)
    with pytest.raises(PicoError, match=r"--embed_size \(30\) must be divisible by --n_heads \(4\)"):
        ModelConfig(model="transformer", n_embd=30, n_head=4)
    with pytest.raises(PicoError, match="rope needs an even head size"):
        ModelConfig(model="transformer", n_embd=12, n_head=4, pos_emb="rope")
    assert main(["train", *TINY, "--models", "lstm", "--embed_size", "30", "--n_heads", "4",
                 "--output_dir", str(tmp_path), "--run_name", "lstm30"]) == 0
    assert ckpt.load_config(str(tmp_path / "lstm30"))[0].n_embd == 30
    capsys.readouterr()
    assert main(["train", *TINY, "--models", "transformer", "--embed_size", "30", "--n_heads", "4",
                 "--output_dir", str(tmp_path), "--run_name", "t30"]) == 2
    assert "must be divisible by --n_heads" in one_line_error(capsys)


# --------------------------------------------------------------------------- 4. no environment change on import

def python(code: str, **env) -> str:
    e = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_importing_picollm_leaves_the_environment_alone():
    code = ("import json, os\nbefore = dict(os.environ)\nimport picollm, picollm.cli, picollm.training\n"
            "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))")
    assert json.loads(python(code)) == []


HUGE = """
import os
import torch
from picollm.cli import {fn}
assert {fn}(["--no-such-flag"]) == 2
x = torch.empty(64 << 20, dtype=torch.uint8)  # after the CLI started: is it on huge pages?
p = x.data_ptr()
hg = None
try:
    cur = False
    for line in open("/proc/self/smaps"):
        f = line.split()
        if f and "-" in f[0] and not f[0].endswith(":"):
            a, b = (int(v, 16) for v in f[0].split("-"))
            cur = a <= p < b
        elif cur and f[0] == "VmFlags:":
            hg = "hg" in f[1:]
except OSError:
    pass
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), p % 4096 == 0, hg)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
@pytest.mark.parametrize("fn,opt_out", [("main", False), ("classic_main", False), ("main", True)])
def test_the_command_line_turns_on_huge_pages_before_torch_reads_the_setting(fn, opt_out):
    """torch reads THP_MEM_ALLOC_ENABLE once, at its first CPU allocation of any size: the entry points
    set it before any tensor exists, so a large tensor made afterwards is huge-page aligned and advised;
    THP_MEM_ALLOC_ENABLE=0 opts out."""
    env, aligned, hg = python(HUGE.format(fn=fn), **({"THP_MEM_ALLOC_ENABLE": "0"} if opt_out else {})).split()
    if opt_out:
        assert env == "0" and hg in ("False", "None")
    else:
        assert env == "1" and aligned == "True" and hg in ("True", "None")


# --------------------------------------------------------------------------- 6. eval in the run's precision

def test_eval_scores_in_the_precision_the_run_trained_in(tmp_path):
    assert main(["train", *TINY, "--models", "transformer", "--n_heads", "2", "--n_blocks", "1", "--precision", "bf16",
                 "--output_dir", str(tmp_path), "--run_name", "bf16"]) == 0
    run = str(tmp_path / "bf16")
    s = ckpt.read_summary(run)
    same = dict(batch_size=4, max_batches=3)  # the batches training evaluated on
    got = evaluate_run(run, **same)
    assert got["test_loss"] == pytest.approx(s["test_loss"], rel=1e-6, abs=1e-6)
    assert got["bits_per_byte"] == pytest.approx(s["bits_per_byte"], rel=1e-6)
    fp32 = evaluate_run(run, precision="fp32", **same)["test_loss"]
    assert abs(fp32 - s["test_loss"]) > 1e-5  # the override works, and precision shows in the figure
    with pytest.raises(PicoError, match="fp16 needs a CUDA device"):
        evaluate_run(run, precision="fp16", **same)


# --------------------------------------------------------------------------- found in the review of issue 12

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "picollm")


def test_the_end_of_text_token_is_spelt_once():
    """EOT was defined in three modules; now config.EOT is the one definition the others import."""
    defined = re.compile(r'^\s*\w+\s*=\s*"<\|endoftext\|>"', re.M)
    spelt = [os.path.relpath(os.path.join(d, f), PACKAGE) for d, _, fs in os.walk(PACKAGE) for f in fs
             if f.endswith(".py") and defined.search(open(os.path.join(d, f), encoding="utf-8").read())]
    assert spelt == ["config.py"]
    from picollm.config import EOT
    from picollm.data import sources, tokenizers

    assert sources.EOT is EOT and tokenizers.EOT is EOT


def test_the_bpe_vocabulary_minimum_is_one_number(capsys, tmp_path):
    """The config said 260, the tokenizer 257: 256 bytes + EOT is the real minimum, in both places."""
    from picollm.config import MIN_BPE_VOCAB
    from picollm.data.tokenizers import build_tokenizer

    assert MIN_BPE_VOCAB == 257
    assert DataConfig(dataset="numbers", vocab_size=257).vocab_size == 257  # refused before (>= 260)
    tok = build_tokenizer("bpe", ["0 1 2 3 4 5 6 7 8 9"] * 20, vocab_size=257)
    assert tok.vocab_size <= 257 and tok.decode(tok.encode("0 1 2")) == "0 1 2"
    with pytest.raises(PicoError, match="must be >= 257"):
        DataConfig(dataset="numbers", vocab_size=256)
    with pytest.raises(PicoError, match="must be >= 257"):
        build_tokenizer("bpe", ["a b"], vocab_size=256)
    assert main(["train", "--dataset", "numbers", "--vocab_size", "256", "--output_dir", str(tmp_path)]) == 2
    assert "must be >= 257" in one_line_error(capsys)


def test_bench_times_the_training_loops_own_step(monkeypatch):
    """bench timed a step of its own (no GradScaler, no accumulation); now it calls training.train_step."""
    from picollm import bench
    from picollm.training import train_step

    calls = []
    monkeypatch.setattr(bench, "T4", dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    monkeypatch.setattr(bench, "PEAK_MATMUL_N", 64)
    monkeypatch.setattr(bench, "train_step", lambda *a, **k: calls.append(a[0]) or train_step(*a, **k))
    out = bench.bench_train("cpu", quick=True, precision="fp32")
    assert out["transformer"]["tokens_per_s"] > 0 and len(calls) >= 4 * 7  # 4 contenders x (2 warm-up + 5 rounds)
    assert {type(s.model).__name__ for s in calls} >= {"Transformer", "LSTMLM", "KGramMLP"}


def test_an_lstm_trains_under_cpu_bf16_autocast():
    """oneDNN has no bf16 LSTM without AVX-512 ('could not create a primitive descriptor'): the LSTM
    runs in fp32 there, the rest of the model in bf16."""
    cfg = ModelConfig(model="lstm", vocab_size=40, n_embd=16, block_size=8)
    model = build_model(cfg)
    x = torch.randint(40, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    logits.float().sum().backward()
    assert logits.shape == (2, 8, 40) and model.lstm.weight_ih_l0.grad is not None
    torch.testing.assert_close(logits.float(), model(x), atol=0.05, rtol=0.05)
