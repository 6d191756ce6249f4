"""Folders of runs (a multi-model run, a folder of folders): commands that need one run name the runs
inside; eval, compare and report cover every run at any depth and say what they left out."""

import hashlib
import json
import os
import re
import shutil

import pytest

import picollm
from picollm.cli import main
from picollm.errors import PicoError
from picollm.evaluate import evaluate_run

TRAIN = ["train", "--dataset", "numbers", "--numbers_count", "120", "--tokenizer", "byte", "--models", "lstm,transformer",
         "--embed_size", "16", "--block_size", "16", "--batch_size", "4", "--max_steps_per_epoch", "3", "--n_heads", "2",
         "--n_blocks", "1", "--no_progress", "--prompt", "1 2", "--max_new_tokens", "4"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """ROOT/multi/{lstm,transformer} (trained), ROOT/nested/deep/copy (a finished run), .../partial (weights,
    no summary.json: unfinished) and ROOT/nested/fresh (a config.json alone: no checkpoint, no metrics)."""
    root = tmp_path_factory.mktemp("multirun")
    assert main(TRAIN + ["--output_dir", str(root), "--run_name", "multi"]) == 0
    deep = root / "nested" / "deep"
    shutil.copytree(root / "multi" / "lstm", deep / "copy")
    shutil.copytree(root / "multi" / "transformer", deep / "partial")
    (deep / "partial" / "summary.json").unlink()
    (root / "nested" / "fresh").mkdir()
    shutil.copy(root / "multi" / "lstm" / "config.json", root / "nested" / "fresh")
    return root


def snapshot(d):
    return {os.path.join(r, f): hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
            for r, _, files in os.walk(d) for f in files}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("cmd", [["generate"], ["attention", "--out", "{tmp}/a.png"], ["neighbors", "--tokens", "1"],
                                 ["export", "--out", "{tmp}/hf"]])
def test_a_command_that_needs_one_run_names_the_runs_in_the_folder(tree, tmp_path, capsys, cmd):
    multi, before = tree / "multi", snapshot(tree)
    assert main([cmd[0], str(multi), *(a.format(tmp=tmp_path) for a in cmd[1:])]) == 2
    err = one_error_line(capsys)
    assert f"{multi} holds 2 runs, not one" in err and len(err) < 300, err
    assert f"{multi}/lstm" in err and f"{multi}/transformer" in err, err
    assert snapshot(tree) == before and not os.listdir(tmp_path)


def test_load_names_the_runs_in_the_folder(tree):
    with pytest.raises(PicoError) as e:
        picollm.load(str(tree / "multi"))
    msg = str(e.value)
    assert "\n" not in msg and f"{tree}/multi/lstm" in msg and f"{tree}/multi/transformer" in msg, msg


@pytest.mark.parametrize("cmd", [["generate"], ["eval"], ["attention"], ["report"], ["compare"]])
def test_a_missing_path_does_not_exist(tree, capsys, cmd):
    nope = tree / "nope"
    assert main([cmd[0], str(nope)]) == 2
    err = one_error_line(capsys)
    assert err == f"error: {nope} does not exist", err
    assert not nope.exists()


def test_eval_of_a_folder_evaluates_every_run_in_it(tree, tmp_path, capsys):
    multi, out = tree / "multi", tmp_path / "eval.json"
    assert main(["eval", str(multi), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    runs = [str(multi / "lstm"), str(multi / "transformer")]
    assert sorted(got) == runs
    blocks = re.split(r"^(\S+):$", printed, flags=re.M)[1:]  # [path, block, path, block]
    assert blocks[0::2] == runs
    for run, block in zip(runs, blocks[1::2]):
        want = evaluate_run(run)
        assert got[run] == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in want.items()}
        assert f"test_loss: {want['test_loss']:.4f}" in block and f"model: {want['model']}" in block


def test_eval_of_a_nested_folder_leaves_out_a_run_with_no_checkpoint(tree, capsys):
    nested = tree / "nested"
    assert main(["eval", str(nested)]) == 0
    out, err = capsys.readouterr()
    assert f"{nested}/deep/copy:" in out and f"{nested}/deep/partial:" in out and "fresh" not in out
    assert f"left out {nested}/fresh: no checkpoint yet" in err


def test_compare_finds_runs_at_any_depth_and_says_what_it_left_out(tree, tmp_path, capsys):
    assert main(["compare", str(tree), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "compare.md").read_text()
    labels = [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| ")][1:]
    assert labels == ["lstm", "transformer", "copy", "partial"]
    assert f"left out {tree}/nested/fresh: no metrics yet" in printed
    assert re.search(rf"1 of 4 runs unfinished .*{tree}/nested/deep/partial", printed), printed
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2  # a folder with no runs at all
    assert "holds no runs" in one_error_line(capsys)


def test_report_of_a_folder_of_folders_covers_every_run(tree, tmp_path, capsys):
    page = tmp_path / "r.html"
    assert main(["report", str(tree), "--out", str(page), "--max_new_tokens", "4"]) == 0
    html = page.read_text()
    for label in ("lstm", "transformer", "copy", "partial"):
        assert f"<summary>{label}</summary>" in html, label
    assert html.count("<details>") == 4 and "Runs in " in html
    assert f"left out {tree}/nested/fresh: no metrics yet" in html
    assert f"left out {tree}/nested/fresh" in capsys.readouterr().err


def test_report_of_a_folder_with_runs_not_started_is_an_error(tree, tmp_path, capsys):
    (tmp_path / "only").mkdir()
    shutil.copytree(tree / "nested" / "fresh", tmp_path / "only" / "fresh")
    assert main(["report", str(tmp_path / "only")]) == 2
    assert "holds no runs with metrics yet (1 not started)" in one_error_line(capsys)
    assert os.listdir(tmp_path / "only") == ["fresh"]
