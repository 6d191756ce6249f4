"""DistributedDataParallel through torchrun (2 CPU processes, gloo) and gradient accumulation.

Every rank draws the same global batch from one seeded generator and trains on its own rows, so W
processes x K micro-batches see exactly the rows one process sees: the runs differ only in the order
floats are summed. Measured on a 2-core CPU: the 8 train losses agree to <= 1e-7 relative (2e-7 over 64
steps), the test losses to <= 5e-8; the tests allow rtol 1e-5. That is in fp32 (pinned here): under bf16
autocast a different batch split rounds differently."""

import json
import os
import subprocess
import sys

import pytest
import torch

from picollm import checkpoint as ckpt
from picollm.cli import main
from picollm.training.distributed import Dist, micro_batches, resume_command

RTOL = 1e-5
TINY = ["--dataset", "numbers", "--numbers_count", "150", "--tokenizer", "byte", "--models", "transformer",
        "--embed_size", "32", "--n_blocks", "1", "--n_heads", "2", "--block_size", "16", "--batch_size", "8",
        "--eval_batches", "2", "--no_progress", "--prompt", "1", "--max_new_tokens", "4",
        "--epochs", "1", "--max_steps_per_epoch", "8", "--eval_interval", "4", "--log_interval", "1",
        "--precision", "fp32"]


def torchrun(nproc, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "picollm", *argv]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def losses(run, key):
    return torch.tensor([r[key] for r in ckpt.read_metrics(str(run)) if key in r], dtype=torch.float64)


def assert_same_trajectory(a, b):
    for key in ("train_loss", "test_loss"):
        torch.testing.assert_close(losses(a, key), losses(b, key), rtol=RTOL, atol=0)
    assert len(losses(a, "train_loss")) == 8 and len(losses(a, "test_loss")) == 2


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert main(["train", *TINY, "--output_dir", str(out), "--run_name", "one"]) == 0
    return out / "one"


def test_two_processes_match_one_and_write_one_run(tmp_path, single):
    r = torchrun(2, ["train", *TINY, "--grad_accum_steps", "2", "--output_dir", str(tmp_path), "--run_name", "ddp"])
    run = tmp_path / "ddp"
    assert_same_trajectory(run, single)
    # one checkpoint, one log, written by rank 0 alone; nothing else anywhere
    assert sorted(os.listdir(tmp_path)) == ["ddp"]
    assert sorted(os.listdir(run)) == sorted(["config.json", "tokenizer.json", "model.safetensors", "trainer.pt",
                                              "metrics.jsonl", "summary.json", "loss.png", "samples.md"])
    steps = [rec["step"] for rec in ckpt.read_metrics(str(run)) if "train_loss" in rec]
    assert steps == list(range(1, 9))  # not one line per rank
    assert r.stdout.count("2 processes x 2 micro-batches of 2") == 1  # one voice: rank 0's
    assert json.load(open(run / "config.json"))["train"]["grad_accum_steps"] == 2
    assert len(ckpt.load_trainer_state(str(run))["rank_rng"]) == 2
    ckpt.load_run(str(run))


def test_torchrun_resumes_a_run_and_every_rank_reads_it(tmp_path, single):
    assert main(["train", *TINY, "--output_dir", str(tmp_path), "--run_name", "r", "--stop_at_step", "4"]) == 0
    torchrun(2, ["train", "--resume", str(tmp_path / "r"), "--no_progress"])
    assert_same_trajectory(tmp_path / "r", single)
    assert ckpt.load_trainer_state(str(tmp_path / "r"))["step"] == 8


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_gradient_accumulation_gives_the_same_optimisation(tmp_path, batching):
    """Padded micro-batches hold different numbers of targets: each is weighted by its share of the
    global batch's targets, so the mean is the global batch's, as in one pass."""
    for k in ("1", "4"):
        assert main(["train", *TINY, "--batching", batching, "--grad_accum_steps", k, "--output_dir", str(tmp_path),
                     "--run_name", f"k{k}"]) == 0
    assert_same_trajectory(tmp_path / "k4", tmp_path / "k1")


def test_every_row_of_the_global_batch_is_used_once():
    x = torch.arange(24).reshape(12, 2)
    seen = []
    for rank in range(3):
        parts = micro_batches(x, x, Dist(rank=rank, world_size=3), accum=2)
        assert len(parts) == 2 and all(p[0].shape == (2, 2) for p in parts)
        seen += [row for p, _ in parts for row in p[:, 0].tolist()]
    assert seen == x[:, 0].tolist()


def test_a_global_batch_the_processes_cannot_share_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # no process group is joined: the check comes first
    assert main(["train", *TINY, "--output_dir", str(tmp_path), "--run_name", "x"]) == 2
    err = capsys.readouterr().err
    assert "--batch_size (8) is the global batch" in err and "3 x 1" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_the_resume_command_names_the_launcher():
    assert resume_command("runs/a b", Dist()) == "pico-llm train --resume 'runs/a b'"
    assert resume_command("r", Dist(world_size=4, local_world_size=4)) == \
        "torchrun --nproc_per_node 4 -m picollm train --resume r"
    assert "--rdzv" in resume_command("r", Dist(world_size=8, local_world_size=4))
