"""Sparse autoencoders: training recovers a planted dictionary; `sae train` on a tiny run writes an SAE
directory whose metrics agree with an independent computation; `generate --steer` moves generation."""

import os

import pytest
import torch

from picollm.analysis.sae import SAEConfig, SparseAutoencoder, load_sae, read_metrics
from picollm.analysis.sae_train import explained_variance, site_activations, train_sae
from picollm.checkpoint import load_run, read_summary
from picollm.cli import main
from picollm.data.batches import eval_windows
from picollm.data.corpus import build_corpus

TRAIN = ["train", "--dataset", "numbers", "--numbers_count", "200", "--tokenizer", "byte", "--n_heads", "2",
         "--embed_size", "32", "--n_blocks", "1", "--block_size", "32", "--batch_size", "8",
         "--max_steps_per_epoch", "30", "--no_progress", "--max_new_tokens", "4"]
SITE = "blocks.0.mlp.hook_post"


# --------------------------------------------------------------------------- planted dictionary


def planted_batches(D: torch.Tensor, active: int, batch: int, g: torch.Generator):
    """Rows x = sum of `active` non-negative coefficients times random rows of D, forever."""
    n_atoms = D.size(0)
    while True:
        idx = torch.rand(batch, n_atoms, generator=g).argsort(-1)[:, :active]  # (batch, active) distinct atoms
        coef = torch.rand(batch, active, generator=g) + 0.5
        yield torch.einsum("ba,bad->bd", coef, D[idx])


def test_topk_sae_recovers_a_planted_dictionary():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    D = torch.randn(256, 64, generator=g)
    D = D / D.norm(dim=1, keepdim=True)                    # (atoms, d_in), unit rows
    sae = SparseAutoencoder(SAEConfig(run="planted", site="x", d_in=64, features=512, kind="topk", k=4))
    stats = train_sae(sae, planted_batches(D, 4, 1024, g), tokens=150_000, lr=3e-3, progress=False)
    cos = D @ sae.W_dec.detach().t()                       # (atoms, features): both unit rows
    assert stats["tokens_trained"] == 150_000
    assert cos.max(1).values.mean().item() >= 0.9
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(512), atol=1e-5)


# --------------------------------------------------------------------------- the command on a tiny run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae")
    assert main(TRAIN + ["--models", "transformer", "--output_dir", str(root), "--run_name", "r"]) == 0
    run = str(root / "r")
    out = str(root / "sae")
    assert main(["sae", "train", run, "--site", SITE, "--features", "128", "--k", "8", "--tokens", "60000",
                 "--batch_tokens", "1024", "--lr", "3e-3", "--out", out, "--no_progress"]) == 0
    return root, run, out


def test_sae_train_writes_a_complete_directory(tiny, capsys):
    root, run, out = tiny
    assert sorted(os.listdir(out)) == ["config.json", "metrics.json", "sae.safetensors"]
    assert not [n for n in os.listdir(root) if n.startswith(".")]  # no temporary left beside it
    m = read_metrics(out)
    for key in ("l0", "explained_variance", "ce_loss_recovered", "kl_div", "dead_fraction", "dense_fraction",
                "loss_clean", "loss_sae", "loss_zero", "tokens_trained", "seconds"):
        assert key in m, key
    assert 0 < m["l0"] <= 8
    assert 0.5 < m["explained_variance"] <= 1
    assert 0 <= m["dead_fraction"] <= 1 and 0 <= m["dense_fraction"] <= 1 and m["kl_div"] >= 0
    assert m["tokens_trained"] == 60000
    recovered = (m["loss_zero"] - m["loss_sae"]) / (m["loss_zero"] - m["loss_clean"])
    assert m["ce_loss_recovered"] == pytest.approx(recovered, rel=1e-9)
    assert m["ce_loss_recovered"] == m["ce_loss_recovered"]  # not NaN
    assert m["loss_clean"] == pytest.approx(read_summary(run)["test_loss"], abs=0.01)  # the run's own test loss
    assert m["loss_sae"] >= m["loss_clean"] - 0.01 and m["loss_zero"] > m["loss_clean"]


def test_sae_metrics_agree_with_an_independent_computation(tiny):
    _, run, out = tiny
    sae = load_sae(out)
    assert sae.cfg.site == SITE and sae.cfg.features == 128 and sae.cfg.k == 8
    model, tok, (mcfg, dcfg, tcfg) = load_run(run)
    corpus = build_corpus(dcfg, tokenizer=tok, progress=False)
    x, y = next(eval_windows(corpus.sources[0].test, mcfg.block_size, 64, 1))
    act = site_activations(model, x, y, SITE)               # (n, d_in)
    assert act.shape[1] == sae.cfg.d_in
    with torch.no_grad():
        f = torch.relu((act - sae.b_dec) @ sae.W_enc + sae.b_enc)
        keep = f.topk(8, -1)
        f = torch.zeros_like(f).scatter_(-1, keep.indices, keep.values)
        x_hat = f @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(sae(act)[0], x_hat)
    ev = 1 - ((act - x_hat) ** 2).sum() / ((act - act.mean(0)) ** 2).sum()
    assert explained_variance(act, x_hat) == pytest.approx(ev.item(), rel=1e-5)
    assert ev.item() == pytest.approx(read_metrics(out)["explained_variance"], abs=0.05)


# --------------------------------------------------------------------------- steering


def greedy(capsys, run, *extra):
    assert main(["generate", run, "--greedy", "--max_new_tokens", "20", "--prompt", "1 2 3", *extra]) == 0
    return capsys.readouterr().out


def test_steering_changes_generation(tiny, capsys):
    _, run, out = tiny
    plain = greedy(capsys, run, "--decoder", "torch")
    assert greedy(capsys, run, "--steer", f"{out}:3=0") == plain
    steered = [greedy(capsys, run, "--steer", f"{out}:{f}=1000") for f in range(3)]
    assert any(s != plain for s in steered)
    assert greedy(capsys, run, "--steer", f"{out}:0=1000", "--steer", f"{out}:0=-1000") == plain  # they add up


# --------------------------------------------------------------------------- bad input


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line(tiny, capsys, tmp_path):
    root, run, out = tiny
    base = ["sae", "train", run, "--tokens", "2048", "--batch_tokens", "1024", "--no_progress"]
    new = str(tmp_path / "s")
    assert "unknown hook point" in one_line_error(capsys, base + ["--site", "blocks.0.nope", "--features", "8",
                                                                  "--k", "2", "--out", new])
    assert "--features" in one_line_error(capsys, base + ["--site", SITE, "--features", "0", "--k", "1",
                                                          "--out", new])
    assert "exactly one" in one_line_error(capsys, base + ["--site", SITE, "--features", "8", "--k", "2",
                                                           "--l1", "1", "--out", new])
    assert "exactly one" in one_line_error(capsys, base + ["--site", SITE, "--features", "8", "--out", new])
    assert "exists" in one_line_error(capsys, base + ["--site", SITE, "--features", "8", "--k", "2", "--out", out])
    assert not os.path.exists(new)
    assert "fused" in one_line_error(capsys, ["generate", run, "--steer", f"{out}:0=1", "--decoder", "fused"])
    assert "out of range" in one_line_error(capsys, ["generate", run, "--steer", f"{out}:128=1"])
    assert "SAE_DIR:FEATURE=SCALE" in one_line_error(capsys, ["generate", run, "--steer", f"{out}:x"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "sae.safetensors").write_bytes(b"junk")
    assert "corrupt" in one_line_error(capsys, ["generate", run, "--steer", f"{bad}:0=1"])
    assert "does not exist" in one_line_error(capsys, ["generate", run, "--steer", f"{tmp_path}/none:0=1"])


def test_site_the_model_lacks(tiny, capsys, tmp_path):
    root, _, out = tiny
    assert main(TRAIN + ["--models", "lstm", "--output_dir", str(root), "--run_name", "l"]) == 0
    lstm = str(root / "l")
    err = one_line_error(capsys, ["sae", "train", lstm, "--site", SITE, "--features", "8", "--k", "2",
                                  "--tokens", "1024", "--out", str(tmp_path / "s"), "--no_progress"])
    assert "unknown hook point" in err
    assert "does not have" in one_line_error(capsys, ["generate", lstm, "--steer", f"{out}:0=1"])
