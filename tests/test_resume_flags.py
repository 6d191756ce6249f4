"""--resume: a given flag is applied or refused by name, never ignored; --epochs extends a run. And the
training step's DDP test: a wrapper around the model (torch.compile's) is not DDP."""

import hashlib
import json
import os

import pytest
import torch

from picollm import checkpoint as ckpt
from picollm.cli import main
from picollm.config import ModelConfig, TrainConfig
from picollm.device import resolve_device
from picollm.metrics import lm_loss
from picollm.models import build_model
from picollm.training import Stepper, train_step
from picollm.training.optim import lr_at, make_optimizer

TINY = ["--dataset", "numbers", "--numbers_count", "150", "--tokenizer", "byte", "--models", "transformer",
        "--embed_size", "16", "--n_heads", "2", "--n_blocks", "1", "--block_size", "16", "--batch_size", "4",
        "--max_steps_per_epoch", "3", "--epochs", "1", "--warmup_steps", "1", "--no_progress", "--prompt", "1 2"]


def snapshot(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, f))}


@pytest.fixture
def finished(tmp_path):
    assert main(["train", *TINY, "--output_dir", str(tmp_path), "--run_name", "r"]) == 0
    return str(tmp_path / "r")


def test_a_flag_that_cannot_change_is_refused_by_name_and_the_run_is_untouched(finished, capsys):
    before = snapshot(finished)
    capsys.readouterr()
    assert main(["train", "--resume", finished, "--epochs", "5", "--learning_rate", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--learning_rate cannot change" in err and "Traceback" not in err
    assert snapshot(finished) == before
    for flags in (["--block_size", "32"], ["--tokenizer", "bpe"], ["--seed", "1"], ["--output_dir", "x"]):
        assert main(["train", "--resume", finished, *flags]) == 2
        assert f"{flags[0]} cannot change" in capsys.readouterr().err
    assert snapshot(finished) == before


def test_epochs_extends_a_finished_run_and_replans_the_schedule(finished, capsys):
    assert main(["train", "--resume", finished, "--epochs", "3", "--log_interval", "1"]) == 0
    _, _, tcfg = ckpt.load_config(finished)
    assert tcfg.epochs == 3 and tcfg.log_interval == 1  # applied and stored for the next resume
    records = ckpt.read_metrics(finished)
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == list(range(1, 10))  # the first 3 steps kept, 6 more trained
    assert [r["step"] for r in records if "test_loss" in r] == [3, 6, 9]
    assert ckpt.read_summary(finished)["steps"] == 9
    # steps 4..9 follow the cosine planned over the new 9 steps (steps 1..3 keep the 3-step plan's values)
    lrs = {r["step"]: r["lr"] for r in records if "train_loss" in r}
    assert [lrs[s] for s in range(4, 10)] == pytest.approx([lr_at(s - 1, 9, tcfg) for s in range(4, 10)])
    assert [lrs[s] for s in range(1, 4)] == pytest.approx([lr_at(s - 1, 3, tcfg) for s in range(1, 4)])


def test_epochs_cannot_shorten_a_run(finished, capsys):
    assert main(["train", "--resume", finished, "--epochs", "3", "--stop_at_step", "4"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", finished, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "planned for 3 epochs" in err


def test_device_auto_is_the_default_and_says_which(tmp_path, capsys):
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else
                                      "mps" if torch.backends.mps.is_available() else "cpu")
    assert main(["train", *TINY, "--output_dir", str(tmp_path), "--run_name", "a", "--max_steps_per_epoch", "1"]) == 0
    assert f"device {resolve_device('auto')} (auto)" in capsys.readouterr().out
    assert json.load(open(tmp_path / "a" / "config.json"))["train"]["device"] == "auto"


class Wrapper(torch.nn.Module):
    """Stands for torch.compile's OptimizedModule: not the model, and no no_sync()."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, idx):
        return self.inner(idx)


def test_accumulation_through_a_wrapper_that_is_not_ddp():
    cfg = ModelConfig(model="transformer", vocab_size=50, block_size=8, n_embd=16, n_layer=1, n_head=2)
    x, y = torch.randint(50, (4, 8)), torch.randint(50, (4, 8))
    grads = {}
    for accum in (1, 2):
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = make_optimizer(model, TrainConfig(learning_rate=1e-3), "cpu")
        s = Stepper(model, Wrapper(model), opt, torch.amp.GradScaler("cpu", enabled=False),
                    lambda: torch.autocast("cpu", enabled=False), "cpu", grad_accum_steps=accum, grad_clip=0.0)
        opt.step = lambda: None  # keep the gradients of the step to compare them
        opt.zero_grad = lambda set_to_none=True: None
        loss, n_tok, _ = train_step(s, x, y, 1e-3)
        assert n_tok == y.numel()
        torch.manual_seed(0)
        assert loss.item() == pytest.approx(lm_loss(build_model(cfg)(x), y).item(), rel=1e-5)
        grads[accum] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[1], grads[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compile_with_accumulation_trains(tmp_path):
    """The review's reproduction: --compile with --grad_accum_steps died with 'no attribute no_sync'."""
    assert main(["train", "--dataset", "numbers", "--numbers_count", "300", "--models", "transformer", "--epochs", "1",
                 "--max_steps_per_epoch", "3", "--batch_size", "8", "--grad_accum_steps", "2", "--compile",
                 "--no_progress", "--output_dir", str(tmp_path), "--run_name", "c"]) == 0
    assert ckpt.read_summary(str(tmp_path / "c"))["steps"] == 3
