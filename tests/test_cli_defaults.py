"""What a new user trips over (issue 18): defaults that surprise, help and version, misspellings,
--device_id on the loading commands, unconditional sampling, and the modes of the files a run writes."""

import os
import stat
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import picollm.analysis.attention as attention_mod
import picollm.analysis.neighbors as neighbors_mod
import picollm.checkpoint as ckpt
import picollm.cli as cli
import picollm.evaluate as evaluate_mod
from picollm.cli import main
from picollm.config import SampleConfig
from picollm.errors import PicoError
from picollm.experiments.tensorboard import require_tensorboard
from picollm.flags import CLASSIC_DEFAULTS, complete, configs_from_args, train_parser
from picollm.fsio import write_json
from picollm.sampling import generate, generate_text

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train", "--dataset", "numbers", "--numbers_count", "120", "--tokenizer", "byte", "--models", "lstm",
        "--embed_size", "16", "--block_size", "16", "--batch_size", "4", "--max_steps_per_epoch", "3",
        "--no_progress", "--max_new_tokens", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished run trained without --prompt."""
    root = tmp_path_factory.mktemp("runs")
    assert main(TINY + ["--output_dir", str(root), "--run_name", "r"]) == 0
    return root / "r"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------- tracebacks that were not one line


def test_data_numbers_into_a_missing_directory(tmp_path, capsys):
    assert main(["data", "numbers", "--out", str(tmp_path / "nodir" / "n.txt")]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert not (tmp_path / "nodir").exists()


@pytest.mark.parametrize("output_dir, run_name", [("afile", "r"), ("afile/sub", "r"), (".", "afile")])
def test_output_dir_that_is_a_file(tmp_path, capsys, output_dir, run_name):
    f = tmp_path / "afile"
    f.write_text("keep me\n")
    assert main(TINY + ["--output_dir", str(tmp_path / output_dir), "--run_name", run_name]) == 2
    assert "not a directory" in one_error_line(capsys)
    assert f.read_text() == "keep me\n" and sorted(os.listdir(tmp_path)) == ["afile"]


# --------------------------------------------------------------------------- defaults


def _train_cfg(argv, overrides=None):
    return configs_from_args(complete(train_parser().parse_args(argv), overrides))[3]


def test_numbers_default_prompt_is_numeric(run):
    assert ckpt.load_config(run)[2].prompt == "0 1 2 3 4"
    assert _train_cfg(["--dataset", "numbers"]).prompt == "0 1 2 3 4"
    assert _train_cfg(["--dataset", "numbers"], CLASSIC_DEFAULTS).prompt == "0 1 2 3 4"
    assert _train_cfg(["--input_files", "a.txt"]).prompt == "Once upon a"
    assert _train_cfg(["--dataset", "numbers", "--prompt", "Once upon a"]).prompt == "Once upon a"
    assert _train_cfg(["--dataset", "numbers", "--prompt", "7"], CLASSIC_DEFAULTS).prompt == "7"


@pytest.mark.parametrize("extra", [["--top_p", "0.9"], ["--top_k", "5"], ["--temperature", "0.5"]])
def test_greedy_with_a_sampling_flag_is_refused(run, capsys, extra):
    assert main(["generate", str(run), "--greedy", "--max_new_tokens", "4", *extra]) == 2
    err = one_error_line(capsys)
    assert "--greedy" in err and extra[0] in err


def test_greedy_alone_still_works(run, capsys):
    assert main(["generate", str(run), "--greedy", "--max_new_tokens", "4", "--temperature", "1.0"]) == 0
    assert capsys.readouterr().out.startswith("0 1 2 3 4")


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # one line: argparse wraps long help


@pytest.mark.parametrize("argv, shown", [
    (["train"], ["--block_size BLOCK_SIZE (default: 64)", "(files | numbers; default: files)",
                 "--learning_rate LEARNING_RATE (default: 0.003)", "--eval_interval EVAL_INTERVAL also evaluate "
                 "every N steps (0: epoch ends only) (default: 0)"]),
    (["generate"], ["--max_new_tokens MAX_NEW_TOKENS (default: 50)", "--temperature TEMPERATURE (default: 1.0)",
                    "--device_id DEVICE_ID", "(default: cpu)", "(default: auto)"]),
    (["eval"], ["--batch_size BATCH_SIZE (default: 32)"]),
    (["data", "numbers"], ["--count COUNT (default: 3333)"]),
    (["bench"], ["--device_id DEVICE_ID (default: cpu)"]),
])
def test_help_shows_defaults(capsys, argv, shown):
    text = _help(argv, capsys)
    for s in shown:
        assert s in text, s
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text


def test_no_command_prints_the_usage(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pico-llm") and all(f"    {c[0]} " in err for c in cli.COMMANDS), err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"pico-llm {version('picollm')}\n"


def test_misspelt_command_suggests(capsys):
    assert main(["trian", "--dataset", "numbers"]) == 2
    assert one_error_line(capsys) == "error: unknown command 'trian'; did you mean 'train'?"
    assert main(["frobnicate"]) == 2
    assert "choose from: train, generate" in one_error_line(capsys)


def test_misspelt_flag_suggests(capsys):
    assert main(["train", "--lerning_rate", "0.1"]) == 2
    assert one_error_line(capsys).endswith("unrecognized arguments: --lerning_rate 0.1; did you mean --learning_rate?")
    assert main(["generate", "RUN", "--max_new_tokns=3"]) == 2
    assert one_error_line(capsys).endswith("did you mean --max_new_tokens?")


# --------------------------------------------------------------------------- --device_id on the loading commands


@pytest.mark.parametrize("argv, module", [
    (["generate", "{run}"], ckpt),
    (["eval", "{run}"], evaluate_mod),
    (["attention", "{run}", "--out", "{tmp}/a.png"], attention_mod),
    (["neighbors", "{run}", "--tokens", "1"], neighbors_mod),
])
def test_device_id_reaches_the_model_load(run, tmp_path, capsys, monkeypatch, argv, module):
    """The resolved --device_id is where the model is loaded (a stand-in device name, caught at the load)."""
    seen = []
    monkeypatch.setattr(cli, "resolve_device", lambda d, *a, **k: f"resolved-{d}")

    def load_run(run_dir, device="cpu"):
        seen.append(device)
        raise PicoError("stop at the load")

    monkeypatch.setattr(module, "load_run", load_run)
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    assert main(argv + ["--device_id", "cuda:1"]) == 2
    assert seen == ["resolved-cuda:1"] and "stop at the load" in capsys.readouterr().err


def test_device_id_cpu_end_to_end(run, capsys):
    assert main(["generate", str(run), "--device_id", "cpu", "--greedy", "--max_new_tokens", "4"]) == 0
    assert main(["eval", str(run), "--device_id", "cpu", "--eval_batches", "1"]) == 0
    assert "test_loss" in capsys.readouterr().out


# --------------------------------------------------------------------------- --prompt "" in generate


def test_empty_prompt_samples_from_end_of_text(run, capsys):
    argv = ["generate", str(run), "--prompt", "", "--seed", "0", "--max_new_tokens", "8"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0 and capsys.readouterr().out == first and first.strip()
    model, tok, _ = ckpt.load_run(run)
    cfg = SampleConfig(max_new_tokens=8, seed=0)
    ids = generate(model, torch.tensor([[tok.eot_id]]), cfg, eot_id=tok.eot_id, decoder="auto")
    assert first == tok.decode(ids[0, 1:].tolist()) + "\n"  # the continuation alone
    assert generate_text(model, tok, "", cfg) == [first[:-1]]


# --------------------------------------------------------------------------- papercuts


def test_run_files_are_shared_like_open_makes_them(run):
    for name in ("model.safetensors", "trainer.pt", "config.json", "metrics.jsonl", "summary.json"):
        assert mode(run / name) == 0o666 & ~0o022, name  # the suite runs under umask 022


def test_written_files_respect_the_umask(tmp_path):
    model = torch.nn.Linear(2, 2)
    old = os.umask(0o027)
    try:
        write_json(str(tmp_path / "a.json"), {"a": 1})
        ckpt.save_weights(str(tmp_path), model, 1)
        ckpt.save_checkpoint(str(tmp_path), model, {"step": 2})
    finally:
        os.umask(old)
    for name in ("a.json", "model.safetensors", "trainer.pt"):
        assert mode(tmp_path / name) == 0o640, name


def test_readme_export_directories_are_ignored():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Export", 1)[1].split("\n## ", 1)[0]
    outs = {line.split("--out ", 1)[1].split()[0].split("/")[0] for line in section.splitlines() if "--out " in line}
    ignored = set((ROOT / ".gitignore").read_text().split())
    assert outs and all({f"{d}/", f"/{d}/"} & ignored for d in outs), outs


def test_tensorboard_hint_is_quoted_for_zsh(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(PicoError, match=r"pip install -e '\.\[tensorboard\]'"):
        require_tensorboard()
