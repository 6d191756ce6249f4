"""Sweeps, comparisons, the HTML report and --tensorboard."""

import csv
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from picollm import checkpoint as ckpt
from picollm.cli import main
from picollm.config import DataConfig, ModelConfig, TrainConfig
from picollm.experiments import compare, sweep

TINY_BASE = """
[base]
dataset = "numbers"
numbers_count = 150
tokenizer = "byte"
models = "transformer"
embed_size = 16
block_size = 16
n_blocks = 1
n_heads = 2
batch_size = 4
epochs = 2
max_steps_per_epoch = 5
eval_interval = 2
eval_batches = 2
log_interval = 2
prompt = "0 1 2"
max_new_tokens = 4
"""
SPEC = 'name = "tiny"\ndescription = "a tiny sweep"\n' + TINY_BASE + '\n[grid]\npos_emb = ["none", "rope"]\n'
POINTS = ("pos_emb=none", "pos_emb=rope")


def snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[p] = (os.path.getmtime(p), hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One real sweep of two points, shared by the tests below."""
    d = tmp_path_factory.mktemp("sweep")
    spec = d / "tiny.toml"
    spec.write_text(SPEC)
    assert main(["sweep", str(spec), "--output_dir", str(d / "out"), "--no_progress"]) == 0
    return spec, d / "out", d / "out" / "tiny"


def test_sweep_trains_every_point_and_tabulates_it(swept):
    _, _, root = swept
    meta = json.loads((root / "sweep.json").read_text())
    assert [p["run"] for p in meta["points"]] == list(POINTS) and meta["x"] == "pos_emb"
    summaries = {}
    for p in POINTS:
        summaries[p] = ckpt.read_summary(str(root / p))
        cfg = ckpt.load_config(str(root / p))
        assert cfg[0].pos_emb == p.split("=")[1] and cfg[0].n_embd == 16 and cfg[1].numbers_count == 150
        assert summaries[p]["steps"] == 10
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["pos_emb"] for r in rows] == ["none", "rope"]
    for r in rows:
        s = summaries[r["run"]]
        for key in ("test_loss", "train_loss", "best_test_loss", "bits_per_byte", "tokens_per_s",
                    "continuation_accuracy"):
            assert float(r[key]) == pytest.approx(s[key]), key
        assert int(r["best_step"]) == s["best_step"] and int(r["params"]) == s["params"]
    md = (root / "results.md").read_text()
    assert "| pos_emb | model | params |" in md and "best step" in md and "continuation accuracy" in md
    assert md.count("| transformer |") == 2
    for png in ("losses.png", "metrics_vs_pos_emb.png"):
        assert is_png(root / png), png


def test_a_second_run_skips_finished_points_and_trains_nothing(swept, monkeypatch, capsys):
    spec, out, root = swept
    before = {k: v for k, v in snapshot(root).items() if os.sep + "pos_emb=" in k}

    def refuse(*a, **k):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr("picollm.experiments.sweep.train", refuse)
    monkeypatch.setattr("picollm.experiments.sweep.train_models", refuse)
    assert main(["sweep", str(spec), "--output_dir", str(out), "--no_progress"]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2
    assert {k: v for k, v in snapshot(root).items() if os.sep + "pos_emb=" in k} == before


def test_an_interrupted_point_resumes_to_the_same_weights(swept, tmp_path, capsys):
    spec, _, root = swept
    out = tmp_path / "out"
    flags = ["--" + line.replace(" = ", "=").replace('"', "") for line in TINY_BASE.split("\n") if " = " in line]
    assert main(["train", *flags, "--pos_emb=rope", "--output_dir", str(out / "tiny"), "--run_name", "pos_emb=rope",
                 "--stop_at_step", "3", "--no_progress"]) == 0
    assert sweep.point_state(str(out / "tiny" / "pos_emb=rope")) == "unfinished"
    capsys.readouterr()
    assert main(["sweep", str(spec), "--output_dir", str(out), "--no_progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    a = load_file(str(root / "pos_emb=rope" / "model.safetensors"))
    b = load_file(str(out / "tiny" / "pos_emb=rope" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tiny" / "results.csv").read_text().count("\n") == 3


def test_a_point_trained_with_other_settings_is_refused(swept, capsys):
    spec, out, root = swept
    before = snapshot(root)
    assert main(["sweep", str(spec), "--output_dir", str(out), "--set", "epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "epochs: 2 -> 3" in err and "--overwrite" in err
    assert snapshot(root) == before


def test_a_failing_point_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    import picollm.experiments.sweep as tr
    from picollm.errors import PicoError

    real = tr.train_models

    def diverging(names, models, data, tcfg, root, name, **kw):
        if name == "pos_emb=none":
            raise PicoError("loss is nan at step 3; stopping. Last good checkpoint: none yet")
        return real(names, models, data, tcfg, root, name, **kw)

    monkeypatch.setattr(tr, "train_models", diverging)
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    assert main(["sweep", str(spec), "--output_dir", str(tmp_path / "out"), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 2 sweep points failed: pos_emb=none (loss is nan" in err
    with open(tmp_path / "out" / "tiny" / "results.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["pos_emb=rope"]


def test_point_states_and_a_foreign_directory_is_left_alone(tmp_path, capsys):
    d = tmp_path / "out" / "tiny" / "pos_emb=none"
    assert sweep.point_state(str(d)) == "new"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / ".checkpoint-3.tmp").mkdir()
    assert sweep.point_state(str(d)) == "stale"  # a first attempt that died before its first checkpoint
    (d / "notes.txt").write_text("mine")
    assert sweep.point_state(str(d)) == "foreign"
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    before = snapshot(tmp_path / "out")
    assert main(["sweep", str(spec), "--output_dir", str(tmp_path / "out")]) == 2
    assert "is not a run of this sweep" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == before


def test_dry_run_lists_points_and_overrides(swept, capsys):
    spec, out, _ = swept
    assert main(["sweep", str(spec), "--output_dir", str(out), "--dry_run"]) == 0
    assert capsys.readouterr().out.count("finished") == 2
    s = sweep.load_spec(str(spec), "o", overrides=("max_steps_per_epoch=7", "prompt=1 2 3"))
    assert [p.train.max_steps_per_epoch for p in s.points] == [7, 7] and s.points[0].train.prompt == "1 2 3"
    assert sweep.parse_override("learning_rate=1e-3") == ("learning_rate", 0.001)


def test_grid_times_points_and_names():
    assert sweep.point_name({"n_blocks": 2, "n_heads": 4}) == "n_blocks=2,n_heads=4"
    assert sweep.point_name({"learning_rate": 0.001, "input_files": ["a/x.txt", "y.txt"]}) == \
        "learning_rate=0.001,input_files=x.txt+y.txt"


def test_points_and_grid_combine(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(TINY_BASE + '[grid]\npos_emb = ["none", "rope"]\n[[points]]\nn_blocks = 1\n'
                    '[[points]]\nn_blocks = 2\nn_heads = 4\n')
    s = sweep.load_spec(str(spec), str(tmp_path))
    assert [p.name for p in s.points] == ["n_blocks=1,pos_emb=none", "n_blocks=1,pos_emb=rope",
                                          "n_blocks=2,n_heads=4,pos_emb=none", "n_blocks=2,n_heads=4,pos_emb=rope"]
    assert [p.model.n_layer for p in s.points] == [1, 1, 2, 2] and s.points[3].model.n_head == 4
    assert s.swept == ["n_blocks", "n_heads", "pos_emb"] and s.x == "n_blocks"
    assert os.listdir(tmp_path) == ["s.toml"]  # validation writes nothing


BAD_SPECS = [
    ("name = \n", "not valid TOML"),
    (TINY_BASE + "embed_sise = 8\n[grid]\npos_emb = ['none']\n", "unknown train flag 'embed_sise' (did you mean 'embed_size'?)"),
    (TINY_BASE + "[grid]\nposemb = ['none']\n", "unknown train flag 'posemb'"),
    ("grdi = 1\n" + TINY_BASE + "[grid]\npos_emb = ['none']\n", "unknown top-level key 'grdi'"),
    (TINY_BASE + "[grid]\n", "empty grid"),
    (TINY_BASE + "[grid]\npos_emb = []\n", "empty grid"),
    (TINY_BASE, "nothing to sweep"),
    (TINY_BASE + "[grid]\npos_emb = 'rope'\n", "must be a list"),
    (TINY_BASE + "output_dir = 'x'\n[grid]\npos_emb = ['none']\n", "set by the sweep itself"),
    (TINY_BASE + "[grid]\nembed_size = [16, 'big']\n", "invalid int value: 'big'"),
    (TINY_BASE + "[grid]\npos_emb = ['none', 'bogus']\n", "unknown pos_emb 'bogus'"),
    (TINY_BASE.replace('"transformer"', '"lstm,transformer"') + "[grid]\nseed = [1]\n", "a sweep point trains one"),
    (TINY_BASE + "[grid]\npos_emb = ['none', 'none']\n", "listed twice"),
    (TINY_BASE + "[grid]\nuse_post_norm = ['yes']\n", "is a switch"),
]


@pytest.mark.parametrize("text,message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_specs_exit_2_with_one_line_and_touch_nothing(tmp_path, capsys, text, message):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--set", "pos_emb=rope"], "is swept"),
    (["--set", "epochz=3"], "unknown train flag 'epochz'"),
    (["--set", "epochs"], "expected KEY=VALUE"),
])
def test_bad_overrides_exit_2(tmp_path, capsys, args, message):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    assert main(["sweep", str(spec), "--output_dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_missing_spec_exits_2(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- compare

def fake_run(root, name, test_losses, train_start=3.0, train_end=1.0, every=10):
    """A run directory written by hand: config, and metrics with a linear train-loss trend and the given
    test loss at every `every` steps."""
    d = str(root / name)
    os.makedirs(d)
    ckpt.save_config(d, ModelConfig(), DataConfig(dataset="numbers"), TrainConfig())
    n = every * len(test_losses)
    recs = []
    for s in range(1, n + 1):
        recs.append({"step": s, "train_loss": train_start + (train_end - train_start) * s / n, "lr": 1e-3})
        if s % every == 0:
            recs.append({"step": s, "epoch": s / n, "test_loss": test_losses[s // every - 1], "bits_per_byte": 1.0})
    ckpt.append_metrics(d, recs)
    return d


def test_compare_flags_overfitting_and_finds_the_early_stopping_point(tmp_path, capsys):
    over = fake_run(tmp_path, "over", [3.0, 2.5, 2.2, 2.1, 2.15, 2.3, 2.4, 2.6])
    healthy = fake_run(tmp_path, "healthy", [3.0, 2.6, 2.4, 2.3, 2.25, 2.2, 2.18, 2.17])
    wobbly = fake_run(tmp_path, "wobbly", [3.0, 2.5, 2.2, 2.1, 2.12, 2.15, 2.05, 2.0])  # two rises: noise
    both_up = fake_run(tmp_path, "both_up", [2.0, 2.1, 2.2, 2.3, 2.4], train_start=1.0, train_end=2.0)
    out = tmp_path / "cmp"
    assert main(["compare", over, healthy, wobbly, both_up, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = compare.compare_runs([over, healthy, wobbly, both_up], out=str(out), log=lambda s: None)["runs"]
    assert r["over"]["overfitting"] == {"from_step": 40, "to_step": 80, "rises": 4,
                                        "test_rise": pytest.approx(0.5), "train_fall": pytest.approx(1.0)}
    assert r["over"]["best_step"] == 40 and r["over"]["best_test_loss"] == 2.1
    assert r["healthy"]["overfitting"] is None and r["healthy"]["best_step"] == 80
    assert r["wobbly"]["overfitting"] is None
    assert r["both_up"]["overfitting"] is None  # test loss rises but so does the train loss
    assert r["over"]["gap"] > r["over"]["first_gap"]
    lines = {ln.split("|")[1].strip(): ln for ln in printed.splitlines() if ln.startswith("| ")}
    assert "yes" in lines["over"] and lines["healthy"].rstrip().endswith("| no |")
    assert "stop early at step 40" in printed
    assert is_png(out / "compare.png") and "| over |" in (out / "compare.md").read_text()
    assert compare.compare_runs([over], patience=5, log=lambda s: None)["runs"]["over"]["overfitting"] is None


def test_compare_expands_a_sweep_directory(swept, tmp_path, capsys):
    _, _, root = swept
    assert main(["compare", str(root), "--out", str(tmp_path)]) == 0
    assert "| pos_emb=none |" in capsys.readouterr().out and is_png(tmp_path / "compare.png")


@pytest.mark.parametrize("make", ["missing", "file", "empty_dir"])
def test_compare_bad_path_exits_2(tmp_path, capsys, make):
    p = tmp_path / "x"
    if make == "file":
        p.write_text("hi")
    elif make == "empty_dir":
        p.mkdir()
    assert main(["compare", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(p) in err


# --------------------------------------------------------------------------- report

CHROMIUM = "/usr/bin/chromium"
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-images', imgs.filter(i => i.complete && i.naturalWidth > 0).length + '/' + imgs.length);
  document.body.setAttribute('data-tables', String(document.querySelectorAll('table tbody tr').length));
});</script></body>"""


def render_in_chromium(page, tmp_path):
    """(images loaded, images, table rows) of a page as headless Chromium sees it after load."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium not installable: {CHROMIUM} is absent (make test installs it with apt-get)")
    probe = tmp_path / ("probe-" + os.path.basename(page))
    probe.write_text(open(page).read().replace("</body>", PROBE))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
           "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-images="(\d+)/(\d+)"', dom)
    t = re.search(r'data-tables="(\d+)"', dom)
    assert m and t, dom[:500]
    return int(m.group(1)), int(m.group(2)), int(t.group(1))


def assert_self_contained(html):
    assert "<script" not in html and "<link" not in html
    assert not re.search(r'(src|href)="(?!data:image/png;base64,)', html)  # every resource is inline


def test_sweep_report_renders_in_chromium_with_every_image(swept, tmp_path, capsys):
    _, _, root = swept
    out = tmp_path / "sweep.html"
    assert main(["report", str(root), "--out", str(out), "--max_new_tokens", "6"]) == 0
    html = out.read_text()
    assert_self_contained(html)
    assert "Sweep tiny" in html and "a tiny sweep" in html and "top-p 0.95" in html and "greedy" in html
    assert html.count("data:image/png;base64,") == 4  # losses, metrics, one loss plot per point
    loaded, total, rows = render_in_chromium(str(out), tmp_path)
    assert total == 4 and loaded == total
    assert rows >= 2


def test_run_report_renders_in_chromium(swept, tmp_path, capsys):
    _, _, root = swept
    run = root / "pos_emb=rope"
    assert main(["report", str(run), "--out", str(tmp_path)]) == 0
    page = tmp_path / "report.html"
    html = page.read_text()
    assert_self_contained(html)
    for text in ("Run pos_emb=rope", "summary.json", "top-p 0.5", "top-p 1", "pos_emb", "continuation"):
        assert text in html, text
    loaded, total, rows = render_in_chromium(str(page), tmp_path)
    assert total == 1 and loaded == 1 and rows > 10


def test_report_bad_path_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --------------------------------------------------------------------------- --tensorboard

TRAIN = ["train", "--dataset", "numbers", "--numbers_count", "120", "--tokenizer", "byte", "--models", "lstm",
         "--embed_size", "16", "--block_size", "16", "--batch_size", "4", "--max_steps_per_epoch", "6",
         "--eval_interval", "3", "--log_interval", "2", "--no_progress", "--prompt", "1 2", "--max_new_tokens", "3"]


def test_tensorboard_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(TRAIN + ["--output_dir", str(tmp_path), "--run_name", "tb", "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[tensorboard]'" in err
    assert not (tmp_path / "tb").exists()


def test_tensorboard_event_files_beside_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(TRAIN + ["--output_dir", str(tmp_path), "--run_name", "tb", "--tensorboard"]) == 0
    run = tmp_path / "tb"
    assert [f for f in os.listdir(run) if f.startswith("events.out.tfevents.")]
    ea = EventAccumulator(str(run))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"loss/train", "loss/test", "lr", "tokens_per_s", "bits_per_byte/test"} <= tags
    metrics = ckpt.read_metrics(str(run))
    assert [e.step for e in ea.Scalars("loss/train")] == [r["step"] for r in metrics if "train_loss" in r]
    assert [round(e.value, 4) for e in ea.Scalars("loss/test")] == \
        [round(r["test_loss"], 4) for r in metrics if "test_loss" in r]
