"""Muon against AdamW on real English text, at equal steps and at equal wall-clock.

    python bench/muon_vs_adamw.py --text_dir /usr/share/doc/python3.11/html/_sources --steps 600 [--json FILE]

The text: the reStructuredText sources of Python 3.11's documentation as Debian's `python3.11-doc` package
ships them (497 files, 12 MB of English prose and code written by the Python documentation team; each file
a document, 10% of them held out by pico-llm's hash split). The model: `--preset llama` (RoPE, RMSNorm,
SwiGLU, untied head), 4 layers, n_embd 128, 4 heads, block 128, BPE 4096, batch 16, lr 3e-3 with warmup
and cosine decay, bf16 autocast where the CPU has it; Muon's lr adjusted to match AdamW's update RMS.

Three runs: Muon for --steps steps; AdamW for the same steps; AdamW for as many steps as fit in Muon's
training time (from the two runs' measured seconds per step), each with its own full schedule, over two
epochs of --steps / 2 steps (an epoch of this text at batch 16 x 128 is about 1,400 steps). Reported:
test loss and bits per byte (all of the held-out documents' windows), training seconds, seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from picollm.cli import main as pico  # noqa: E402
from picollm.evaluate import evaluate_run  # noqa: E402

MODEL = ["--preset", "llama", "--n_blocks", "4", "--embed_size", "128", "--n_heads", "4", "--block_size", "128",
         "--vocab_size", "4096", "--batch_size", "16", "--learning_rate", "3e-3", "--warmup_steps", "30"]


def train(out: str, name: str, text_dir: str, optimizer: str, steps: int) -> dict:
    argv = ["train", "--input_dir", text_dir, "--input_mode", "documents", "--models", "transformer", *MODEL,
            "--optimizer", optimizer, "--epochs", "2", "--max_steps_per_epoch", str(steps // 2), "--eval_batches", "10",
            "--output_dir", out, "--run_name", name, "--no_progress", "--prompt", "The", "--max_new_tokens", "8"]
    if pico(argv) != 0:
        raise SystemExit(f"training {name} failed")
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        elapsed = max(r.get("elapsed", 0.0) for r in map(json.loads, f))  # training seconds, evaluation excluded
    full = evaluate_run(os.path.join(out, name), max_batches=1000)  # every held-out window (not a sample)
    steps = 2 * (steps // 2)
    return {"optimizer": optimizer, "steps": steps, "train_s": elapsed, "s_per_step": elapsed / steps,
            "test_loss": full["test_loss"], "bits_per_byte": full["bits_per_byte"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text_dir", default="/usr/share/doc/python3.11/html/_sources")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--output_dir", default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not os.path.isdir(a.text_dir):
        print(f"{a.text_dir} is missing: apt-get install python3.11-doc (or give --text_dir)", file=sys.stderr)
        return 2
    out = a.output_dir or tempfile.mkdtemp(prefix="muon-vs-adamw-")
    rows = [train(out, "muon", a.text_dir, "muon", a.steps), train(out, "adamw", a.text_dir, "adamw", a.steps)]
    equal_time = 2 * round(a.steps * rows[0]["s_per_step"] / rows[1]["s_per_step"] / 2)  # two epochs of equal steps
    rows.append(train(out, "adamw-equal-time", a.text_dir, "adamw", equal_time))
    print("| optimizer | steps | training s | s/step | test loss | bits/byte |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['steps']} | {r['train_s']:.1f} | {r['s_per_step']:.3f} | {r['test_loss']:.4f} | "
              f"{r['bits_per_byte']:.4f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
