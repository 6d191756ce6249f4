import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from picollm import checkpoint as ckpt
from picollm.cli import main
from picollm.config import DataConfig, ModelConfig, TrainConfig
from picollm.data.corpus import build_corpus
from picollm.training import train
from picollm.training.optim import lr_at

TINY = dict(block_size=24, n_embd=32, n_layer=1, n_head=2)


def tiny_run(tmp_path, name, model="transformer", steps=20, **kw):
    data = DataConfig(dataset="numbers", numbers_count=200, tokenizer="byte", seed=1)
    tcfg = TrainConfig(epochs=2, max_steps_per_epoch=steps // 2, batch_size=8, learning_rate=3e-3, warmup_steps=3,
                       eval_interval=4, eval_batches=2, log_interval=3, prompt="0 1 2", max_new_tokens=4)
    return data, tcfg, ModelConfig(model=model, **TINY), str(tmp_path / name)


def test_run_directory_is_complete_and_loadable(tmp_path):
    data, tcfg, mcfg, run = tiny_run(tmp_path, "r")
    summary = train(mcfg, data, tcfg, run, progress=False, log=lambda s: None)
    for f in ("config.json", "tokenizer.json", "model.safetensors", "trainer.pt", "metrics.jsonl",
              "summary.json", "loss.png", "samples.md"):
        assert os.path.getsize(os.path.join(run, f)) > 0, f
    assert json.load(open(os.path.join(run, "summary.json"))) == summary
    for key in ("params", "train_loss", "test_loss", "bits_per_byte", "tokens_per_s", "continuation_accuracy"):
        assert summary[key] is not None, key
    records = ckpt.read_metrics(run)
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 21))  # a train loss per step
    assert [r["step"] for r in records if "test_loss" in r] == [4, 8, 10, 12, 16, 20]  # interval + epoch ends
    model, tok, _ = ckpt.load_run(run)
    assert tok.decode(tok.encode("0 1 2")) == "0 1 2"
    assert "greedy" in open(os.path.join(run, "samples.md")).read()


@pytest.mark.parametrize("family, optimizer, extra", [
    ("lstm", "adamw", {}), ("transformer", "adamw", {}),
    ("transformer", "muon", {}),  # Muon's momentum buffers must come back from trainer.pt
    ("transformer", "muon", dict(n_experts=3, experts_per_token=2, n_kv_heads=1)),  # experts: AdamW's 3-D weights
])
def test_resume_gives_the_same_weights_as_one_go(tmp_path, family, optimizer, extra):
    data, tcfg, mcfg, _ = tiny_run(tmp_path, "x", model=family)
    tcfg = dataclasses.replace(tcfg, optimizer=optimizer)
    mcfg = ModelConfig(model=family, dropout=0.1, **TINY, **extra)  # dropout: the torch RNG must be restored too
    once, split = str(tmp_path / "once"), str(tmp_path / "split")
    train(mcfg, data, tcfg, once, progress=False, log=lambda s: None)
    stopped = train(mcfg, data, tcfg, split, stop_at_step=10, progress=False, log=lambda s: None)
    assert stopped["stopped_at"] == 10
    train(mcfg, data, tcfg, split, resume=True, progress=False, log=lambda s: None)
    a, b = load_file(os.path.join(once, "model.safetensors")), load_file(os.path.join(split, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key in ("train_loss", "test_loss"):  # the same trajectory, step for step, bit for bit
        series = [[(r["step"], r[key]) for r in ckpt.read_metrics(run) if key in r] for run in (once, split)]
        assert series[0] == series[1] and len(series[0]) > 0, key


def test_resume_through_the_cli(tmp_path, capsys):
    common = ["train", "--dataset", "numbers", "--numbers_count", "200", "--tokenizer", "byte", "--models", "lstm",
              "--embed_size", "32", "--block_size", "24", "--batch_size", "8", "--max_steps_per_epoch", "12",
              "--output_dir", str(tmp_path), "--no_progress", "--prompt", "1 2"]
    assert main(common + ["--run_name", "a"]) == 0
    assert main(common + ["--run_name", "b", "--stop_at_step", "5"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "b"), "--no_progress"]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert lr_at(50, 100, TrainConfig(learning_rate=0.5, lr_schedule="constant")) == 0.5


def test_several_models_share_data_and_write_a_comparison(tmp_path):
    assert main(["train", "--dataset", "numbers", "--numbers_count", "150", "--tokenizer", "byte",
                 "--models", "lstm,kgram,transformer", "--embed_size", "32", "--block_size", "16", "--n_blocks", "1",
                 "--batch_size", "4", "--max_steps_per_epoch", "6", "--output_dir", str(tmp_path), "--run_name", "cmp",
                 "--no_progress", "--prompt", "1"]) == 0
    root = tmp_path / "cmp"
    assert (root / "comparison.png").stat().st_size > 0
    table = (root / "comparison.md").read_text()
    for m in ("lstm", "kgram", "transformer"):
        assert f"| {m} |" in table and (root / m / "summary.json").exists()
    losses = [ckpt.read_metrics(str(root / m))[0]["train_loss"] for m in ("lstm", "kgram", "transformer")]
    assert len(set(losses)) == 3  # different models ...
    cfgs = [json.load(open(root / m / "config.json"))["data"] for m in ("lstm", "kgram", "transformer")]
    assert cfgs[0] == cfgs[1] == cfgs[2]  # ... on identical data


def test_held_out_continuation_accuracy_beats_a_trivial_baseline(tmp_path):
    """A small Transformer on the numeric corpus: greedy continuation of held-out sequences, scored against
    the 'repeat the last number' baseline on the same sequences."""
    data = DataConfig(dataset="numbers", numbers_count=4000, tokenizer="bpe", vocab_size=512, seed=0)
    tcfg = TrainConfig(epochs=6, batch_size=32, learning_rate=3e-3, eval_batches=4,
                       prompt="0 1 2 3 4", max_new_tokens=12)
    mcfg = ModelConfig(model="transformer", block_size=48, n_embd=64, n_layer=2, n_head=4)
    summary = train(mcfg, data, tcfg, str(tmp_path / "acc"), progress=False, log=lambda s: None)
    docs = build_corpus(data).numeric_test_docs()
    seqs = [d.split() for d in docs if len(d.split()) >= 15]
    baseline = sum(t == s[4] for s in seqs for t in s[5:15]) / (10 * len(seqs))
    acc = summary["continuation_accuracy"]
    print(f"continuation accuracy {acc:.3f}, repeat-last baseline {baseline:.3f}")
    assert acc >= 0.5 and acc >= baseline + 0.3
    # sampling in bf16 weights (generate's --precision auto on bf16 hardware) keeps the results
    from picollm.metrics import continuation_accuracy

    model, tok, _ = ckpt.load_run(str(tmp_path / "acc"))
    acc32 = continuation_accuracy(model, tok, docs)
    acc16 = continuation_accuracy(model.to(torch.bfloat16), tok, docs)
    print(f"loaded model: continuation accuracy fp32 {acc32:.3f}, bf16 weights {acc16:.3f}")
    assert abs(acc16 - acc32) <= 0.02


def test_generate_precision_bf16_gives_the_fp32_greedy_text(tmp_path, capsys, monkeypatch):
    import picollm.cli
    import picollm.sampling

    data, tcfg, mcfg, run = tiny_run(tmp_path, "g", steps=40)
    train(mcfg, data, tcfg, run, progress=False, log=lambda s: None)
    real, dtypes, out = picollm.sampling.generate_text, [], {}

    def spy(model, *args, **kw):
        dtypes.append(next(model.parameters()).dtype)
        return real(model, *args, **kw)

    monkeypatch.setattr(picollm.cli, "generate_text", spy)  # the name cmd_generate calls
    for p in ("fp32", "bf16"):
        assert main(["generate", run, "--greedy", "--max_new_tokens", "12", "--precision", p]) == 0
        out[p] = capsys.readouterr().out
    assert dtypes == [torch.float32, torch.bfloat16]
    assert out["fp32"].startswith("0 1 2") and len(out["fp32"]) > len("0 1 2\n")
    assert out["bf16"] == out["fp32"]
    # the fused C decode step and the PyTorch step print the same greedy text
    for decoder in ("fused", "torch"):
        assert main(["generate", run, "--greedy", "--max_new_tokens", "12", "--precision", "fp32",
                     "--decoder", decoder]) == 0
        assert capsys.readouterr().out == out["fp32"], decoder


def test_muon_orthogonalises_the_blocks_matrices_and_adamw_takes_the_rest():
    from picollm.models import build_model
    from picollm.training.optim import make_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(model="transformer", vocab_size=50, n_kv_heads=2, **TINY))
    opt = make_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.0, learning_rate=0.01), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc.weight",
                    "blocks.0.mlp.proj.weight"}
    assert muon | adamw == set(names.values()) and not muon & adamw
    assert {"wte.weight", "blocks.0.ln_1.weight", "ln_f.weight"} <= adamw  # tied head: wte's tensor
    spreads = {}
    for kind in ("muon", "adamw"):
        torch.manual_seed(0)
        m = build_model(ModelConfig(model="transformer", vocab_size=50, **TINY))
        o = make_optimizer(m, TrainConfig(optimizer=kind, weight_decay=0.0, learning_rate=0.01), "cpu")
        w = m.blocks[0].mlp.proj.weight
        before = w.detach().clone()
        m(torch.randint(0, 50, (4, 24))).logsumexp(-1).mean().backward()
        o.step()
        s = torch.linalg.svdvals(w.detach() - before)
        spreads[kind] = (s.median() / s.max()).item()
    # Muon's update is near-orthogonal: a flat spectrum (measured: median/max 0.73 against AdamW's 0.09)
    assert spreads["muon"] > 0.5 > 0.25 > spreads["adamw"], spreads


def test_muon_is_refused_for_other_families(tmp_path, capsys):
    assert main(["train", "--dataset", "numbers", "--models", "lstm,transformer", "--optimizer", "muon",
                 "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--optimizer muon is for the Transformer" in err and "lstm" in err and err.count("\n") == 1


def test_runs_from_before_the_optimizer_flag_keep_adamw():
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "optimizer"}  # a config.json of before
    assert TrainConfig.from_dict(old).optimizer == "adamw"
    assert TrainConfig().optimizer == "auto" and TrainConfig.from_dict(TrainConfig().to_dict()).optimizer == "auto"
