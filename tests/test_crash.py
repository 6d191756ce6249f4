"""Faults during training: SIGKILL in the middle of a checkpoint write, SIGINT, a crash between the two
renames of a checkpoint, NaN and inf losses. The training subprocesses use a tiny Transformer on the
byte-level numeric corpus and as many threads as this process, so their floats match in-process runs."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import picollm.training.loop
from picollm import checkpoint as ckpt
from picollm.cli import main

TINY = ["--dataset", "numbers", "--numbers_count", "150", "--tokenizer", "byte", "--models", "transformer",
        "--embed_size", "32", "--n_blocks", "1", "--n_heads", "2", "--block_size", "16", "--batch_size", "8",
        "--eval_batches", "2", "--no_progress", "--prompt", "1", "--max_new_tokens", "4"]
# 8 steps, checkpoints after steps 4 and 8
SHORT = TINY + ["--epochs", "1", "--max_steps_per_epoch", "8", "--eval_interval", "4", "--log_interval", "1"]


def train_argv(out, name, *extra):
    return ["train", *extra, "--output_dir", str(out), "--run_name", name]


def spawn(argv, **env):
    """`python -m picollm ARGV` in a subprocess, one thread count with this process."""
    e = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen([sys.executable, "-m", "picollm", *argv], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the training process ended early (exit {proc.returncode}): {err[-1500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.01)


def weights(run):
    return load_file(os.path.join(run, "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def saved_step(run):
    with safe_open(os.path.join(run, "model.safetensors"), framework="pt") as f:
        return int(f.metadata()["step"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 8-step run's weights after step 4 and at the end."""
    out = tmp_path_factory.mktemp("ref")
    assert main(train_argv(out, "ref", *SHORT, "--stop_at_step", "4")) == 0
    at4 = weights(out / "ref")
    assert main(["train", "--resume", str(out / "ref"), "--no_progress"]) == 0
    return at4, weights(out / "ref")


def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path, reference):
    at4, final = reference
    run, flag = tmp_path / "r", tmp_path / "paused"
    proc = spawn(train_argv(tmp_path, "r", *SHORT), PICOLLM_TEST_PAUSE_IN_CHECKPOINT=str(flag))
    wait_for(flag.exists, proc)  # paused while writing the step-8 checkpoint
    half = run / ".checkpoint-8.tmp"
    assert (half / "trainer.pt").is_file() and not (half / "model.safetensors").exists()
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    model, tok, _ = ckpt.load_run(str(run))  # the previous checkpoint loads ...
    assert saved_step(str(run)) == 4 and ckpt.load_trainer_state(str(run))["step"] == 4
    assert_same_weights({k: v for k, v in model.state_dict().items() if k in at4}, at4)  # ... and is step 4's
    assert_same_weights(weights(str(run)), at4)

    assert main(["train", "--resume", str(run), "--no_progress"]) == 0  # and resume runs to the end
    assert_same_weights(weights(str(run)), final)
    assert not [n for n in os.listdir(run) if n.startswith(".checkpoint-")]
    assert [r["step"] for r in ckpt.read_metrics(str(run)) if "train_loss" in r] == list(range(1, 9))


def test_a_crash_between_the_two_renames_leaves_the_new_checkpoint_readable(tmp_path, monkeypatch):
    """After the commit point (the complete .checkpoint-STEP directory) the new checkpoint is the current
    one, even when only one of its files has been moved to the top level."""
    run = str(tmp_path / "r")
    assert main(train_argv(tmp_path, "r", *SHORT, "--stop_at_step", "4")) == 0
    model, _, _ = ckpt.load_run(run)
    old = weights(run)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = ckpt.load_trainer_state(run)
    state["step"] = 5
    real_replace, moved = os.replace, []

    def crash_after_one(src, dst):
        if moved:
            raise KeyboardInterrupt("simulated crash")
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, model, state)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert len(moved) == 1 and os.path.isdir(os.path.join(run, ".checkpoint-5"))
    loaded, _, _ = ckpt.load_run(run)  # weights from the pending directory, trainer.pt from the top level
    assert ckpt.load_trainer_state(run)["step"] == 5
    for k, v in old.items():
        assert torch.equal(loaded.state_dict()[k], v + 1.0), k
    # the next save finishes the interrupted move first, then writes its own
    state["step"] = 6
    ckpt.save_checkpoint(run, model, state)
    assert saved_step(run) == 6 and ckpt.load_trainer_state(run)["step"] == 6
    assert not [n for n in os.listdir(run) if n.startswith(".checkpoint-")]


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    real = ckpt._save_weights_file

    def disk_full_at_step_8(model, path, step):
        if step == 8:
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(model, path, step)

    monkeypatch.setattr(ckpt, "_save_weights_file", disk_full_at_step_8)
    run = tmp_path / "r"
    assert main(train_argv(tmp_path, "r", *SHORT)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "previous checkpoint is kept" in err, err
    assert saved_step(str(run)) == 4 and ckpt.load_trainer_state(str(run))["step"] == 4
    assert not [n for n in os.listdir(run) if n.startswith(".checkpoint-")]
    ckpt.load_run(str(run))


LONGER = TINY + ["--epochs", "5", "--log_interval", "1"]  # ~200 steps: time to interrupt it


@pytest.fixture(scope="module")
def once(tmp_path_factory):
    out = tmp_path_factory.mktemp("once")
    assert main(train_argv(out, "once", *LONGER)) == 0
    return out / "once"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_prints_the_resume_command_and_resumes_bit_for_bit(tmp_path, once, sig):
    run = tmp_path / "cut"
    proc = spawn(train_argv(tmp_path, "cut", *LONGER))
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("train_loss") >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-1500:]  # 130 / 143: `train && next-step` does not go on
    stopped = ckpt.load_trainer_state(str(run))["step"]
    total = len([r for r in ckpt.read_metrics(str(once)) if "train_loss" in r])
    assert 3 <= stopped < total, (stopped, total)
    assert f"stopped (signal {sig.name}) at step {stopped}/{total}" in out
    assert f"Resume with: pico-llm train --resume {run}\n" in out
    assert main(["train", "--resume", str(run), "--no_progress"]) == 0
    assert_same_weights(weights(str(run)), weights(str(once)))


MULTI = [a for a in LONGER if a not in ("--models", "transformer")] + ["--models", "lstm,kgram,transformer"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_every_model_of_a_multi_model_run_and_one_resume_finishes_them(tmp_path, sig):
    root = tmp_path / "multi"
    proc = spawn(train_argv(tmp_path, "multi", *MULTI))
    metrics = root / "lstm" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("train_loss") >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-1500:]
    steps = {m: ckpt.load_trainer_state(str(root / m))["step"] for m in ("lstm", "kgram", "transformer")}
    assert steps["lstm"] >= 3 and steps["kgram"] == 0 and steps["transformer"] == 0, steps  # none trained on
    assert not (root / "comparison.md").exists()
    assert f"stopped by {sig.name}: lstm at step {steps['lstm']}/" in out
    assert "kgram at step 0/" in out and "transformer at step 0/" in out
    assert f"continue them all with: pico-llm train --resume {root}\n" in out
    assert main(["train", "--resume", str(root), "--no_progress"]) == 0
    table = (root / "comparison.md").read_text()
    assert all(m in table for m in ("lstm", "kgram", "transformer"))
    for m in ("lstm", "kgram", "transformer"):
        assert ckpt.read_summary(str(root / m))["test_loss"] > 0
    assert main(["train", "--resume", str(root), "--no_progress"]) == 0  # all finished: nothing to do


def test_a_signal_stops_a_sweep_lists_the_points_left_and_exits_143(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\ndataset = "numbers"\nnumbers_count = 150\ntokenizer = "byte"\nmodels = "transformer"\n'
                    'embed_size = 32\nn_blocks = 1\nn_heads = 2\nblock_size = 16\nbatch_size = 8\neval_batches = 2\n'
                    'epochs = 5\nlog_interval = 1\nmax_new_tokens = 4\n[grid]\nseed = [1, 2, 3]\n')
    proc = spawn(["sweep", str(spec), "--output_dir", str(tmp_path), "--no_progress"])
    metrics = tmp_path / "s" / "seed=1" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("train_loss") >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-1500:]
    assert "sweep stopped by SIGTERM during seed=1; 3 of 3 points left (seed=1, seed=2, seed=3)" in out
    assert not (tmp_path / "s" / "seed=2").exists()


def test_a_failed_new_run_leaves_no_directory(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("just one document, nothing to test on\n")
    argv = train_argv(tmp_path, "r", *TINY, "--input_files", str(one), "--input_mode", "documents")
    assert main([a for a in argv if a not in ("--dataset", "numbers", "--numbers_count", "150")]) == 2
    assert "only 1 distinct document" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_nan_loss_stops_before_the_checkpoint_and_names_the_last_good_one(tmp_path, monkeypatch, capsys):
    real, calls = picollm.training.loop.lm_loss, []

    def nan_from_step_7(logits, targets):
        calls.append(1)
        loss = real(logits, targets)
        return loss * float("nan") if len(calls) >= 7 else loss

    monkeypatch.setattr(picollm.training.loop, "lm_loss", nan_from_step_7)
    run = tmp_path / "r"
    # log every 10 steps: the NaN of step 7 must still be caught before the step-8 checkpoint
    argv = train_argv(tmp_path, "r", *TINY, "--epochs", "1", "--max_steps_per_epoch", "8", "--eval_interval", "4")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: loss is nan at step 7; stopping. Last good checkpoint: {run} (step 4)"
    assert saved_step(str(run)) == 4 and ckpt.load_trainer_state(str(run))["step"] == 4
    assert max(r["step"] for r in ckpt.read_metrics(str(run))) == 4  # nothing of the bad steps was logged


def test_a_huge_learning_rate_diverges_into_a_one_line_error(tmp_path, capsys):
    argv = train_argv(tmp_path, "r", *TINY, "--epochs", "1", "--max_steps_per_epoch", "8", "--learning_rate", "1e30")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: loss is ") and "stopping. Last good checkpoint: none yet" in err
