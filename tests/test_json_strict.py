"""No NaN reaches a JSON file: every JSON a run writes parses with a strict parser (Python's json module
accepts a bare NaN by default; browsers, jq and most other readers do not)."""

import json
import os

import pytest

from picollm.cli import main
from picollm.fsio import write_json


def strict(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def strict_files(root):
    """Every .json and .jsonl file under root, parsed strictly: {path: parsed}."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if f.endswith(".json"):
                out[p] = strict(open(p).read())
            elif f.endswith(".jsonl"):
                out[p] = [strict(line) for line in open(p) if line.strip()]
    return out


def test_write_json_writes_null_for_nan_and_infinity(tmp_path):
    p = tmp_path / "x.json"
    write_json(p, {"loss": float("nan"), "rows": [1.5, float("inf"), {"b": -float("inf")}], "n": 3})
    assert strict(p.read_text()) == {"loss": None, "rows": [1.5, None, {"b": None}], "n": 3}


@pytest.mark.parametrize("models", ["lstm", "lstm,transformer"])
def test_every_json_a_run_writes_is_strict_json(tmp_path, models):
    argv = ["train", "--dataset", "numbers", "--numbers_count", "120", "--tokenizer", "byte", "--models", models,
            "--embed_size", "16", "--n_heads", "2", "--n_blocks", "1", "--block_size", "16", "--batch_size", "4",
            "--max_steps_per_epoch", "3", "--output_dir", str(tmp_path), "--run_name", "r", "--no_progress",
            "--max_new_tokens", "4"]
    assert main(argv) == 0
    run = tmp_path / "r" if "," not in models else tmp_path / "r" / "transformer"
    short = tmp_path / "short.txt"
    short.write_text("1\n")  # too short for a continuation: its accuracy is not defined (nan)
    assert main(["eval", str(run), "--input_files", str(short), "--json", str(tmp_path / "eval.json")]) == 0
    if "transformer" in models:
        assert main(["attention", str(run), "--prompt", "1 2 3", "--out", str(tmp_path / "a.png"),
                     "--json", str(tmp_path / "attention.json")]) == 0
    parsed = strict_files(tmp_path)
    assert any(p.endswith("summary.json") for p in parsed) and any(p.endswith("metrics.jsonl") for p in parsed)
    assert strict((tmp_path / "eval.json").read_text())["continuation_accuracy"] is None
