"""The course starter's command line: `python pico-llm.py` with its flags and meanings."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_classic_command_line_runs_offline(tmp_path, numbers_file):
    cmd = [sys.executable, os.path.join(ROOT, "pico-llm.py"), "--tinystories_weight", "0.0",
           "--input_files", str(numbers_file), "--block_size", "32", "--prompt", "0 1 2 3 4",
           "--max_steps_per_epoch", "4", "--epochs", "1", "--tokenizer", "bpe", "--embed_size", "32",
           "--output_dir", str(tmp_path), "--run_name", "classic", "--no_progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cuda:0 requested but CUDA is not available; using cpu" in r.stderr  # the starter's default device
    run = tmp_path / "classic"
    import json
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["model"] == "lstm"  # the starter's default model
    assert cfg["model"]["block_size"] == 32 and cfg["model"]["n_embd"] == 32
    assert cfg["data"]["input_files"] == [str(numbers_file)] and cfg["data"]["tinystories_weight"] == 0.0
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["continuation_accuracy"] <= 1.0  # a file of numeric sequences counts as numeric data
    samples = (run / "samples.md").read_text()
    for label in ("| greedy | 0 1 2 3 4", "| top-p 0.95 | 0 1 2 3 4", "| top-p 1.0 | 0 1 2 3 4"):
        assert label in samples  # the starter's three samples


def test_classic_defaults_are_the_starters():
    from picollm.cli import CLASSIC_DEFAULTS

    assert CLASSIC_DEFAULTS["models"] == "lstm" and CLASSIC_DEFAULTS["tokenizer"] == "gpt2"
    assert CLASSIC_DEFAULTS["tinystories_weight"] == 0.5 and CLASSIC_DEFAULTS["block_size"] == 1024
    assert CLASSIC_DEFAULTS["device_id"] == "cuda:0"
