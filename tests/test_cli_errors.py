"""Bad input: one line on stderr, exit status 2, no traceback, and an existing run left untouched."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from picollm.cli import main


def snapshot(d):
    out = {}
    for root, dirs, files in os.walk(d):
        out.update({os.path.join(root, x): None for x in dirs})
        for f in files:
            p = os.path.join(root, f)
            out[p] = (os.path.getmtime(p), hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "--dataset", "numbers", "--numbers_count", "120", "--tokenizer", "byte", "--models", "lstm",
                 "--embed_size", "16", "--block_size", "16", "--batch_size", "4", "--max_steps_per_epoch", "3",
                 "--output_dir", str(root), "--run_name", "good", "--no_progress", "--prompt", "1 2"]) == 0
    return root / "good"


def _edit_json(path, **changes):
    d = json.load(open(path))
    d["model"].update(changes)
    json.dump(d, open(path, "w"))


BROKEN = {  # damaged copies of the good run, beside it (so the snapshot covers them too)
    "shape": lambda r: _edit_json(r / "config.json", n_embd=24, hidden_size=24),
    "vocab": lambda r: _edit_json(r / "config.json", vocab_size=300),
    "truncated": lambda r: (r / "model.safetensors").write_bytes((r / "model.safetensors").read_bytes()[:3000]),
    "garbage": lambda r: (r / "model.safetensors").write_bytes(os.urandom(4096)),
    "config": lambda r: (r / "config.json").write_text('{"model": {"model": "lstm", '),
    "tokenizer": lambda r: (r / "tokenizer.json").write_text("{]"),
    "trainer": lambda r: (r / "trainer.pt").write_bytes(b"PK\x03\x04 not a zip"),
    "pair": lambda r: torch.save(dict(torch.load(r / "trainer.pt", weights_only=True), step=2), r / "trainer.pt"),
    "notrainer": lambda r: (r / "trainer.pt").unlink(),
}


@pytest.fixture(scope="module")
def broken(run):
    for name, damage in BROKEN.items():
        shutil.copytree(run, run.parent / name)
        damage(run.parent / name)
    return run.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n\n  \n")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (d / "ok.txt").write_text("hello world\nanother line\n")
    base = '[base]\ndataset = "numbers"\nnumbers_count = 120\ntokenizer = "byte"\n'
    for name, text in SPECS.items():
        (d / f"{name}.toml").write_text(text.format(base=base))
    return d


SPECS = {  # sweep specs, each wrong in one way
    "not_toml": "[base\nx = 1\n",
    "unknown_flag": "{base}frobnicate = 1\n[grid]\nseed = [1, 2]\n",
    "reserved": '{base}output_dir = "elsewhere"\n[grid]\nseed = [1, 2]\n',
    "empty_grid": "{base}[grid]\n",
    "bad_point": "{base}[grid]\nblock_size = [1, 16]\n",
    "accum": "{base}batch_size = 4\ngrad_accum_steps = 3\n[grid]\nseed = [1, 2]\n",
}


def T(*args):  # a train command into the existing run's directory, so damage would show
    return ["train", "--no_progress", "--run_name", "good", *args]


CASES = {
    "missing input file": T("--input_files", "{files}/nope.txt"),
    "empty input file": T("--input_files", "{files}/empty.txt"),
    "blank input file": T("--input_files", "{files}/blank.txt"),
    "non-UTF-8 input file": T("--input_files", "{files}/latin1.txt"),
    "missing input dir": T("--input_dir", "{files}/nodir"),
    "unknown model": T("--dataset", "numbers", "--models", "gru"),
    "unknown tokenizer": T("--dataset", "numbers", "--tokenizer", "wordpiece"),
    "block_size < 2": T("--dataset", "numbers", "--block_size", "1"),
    "tinystories_weight > 1": T("--dataset", "numbers", "--tinystories_weight", "1.5"),
    "tinystories_weight < 0": T("--dataset", "numbers", "--tinystories_weight", "-0.1"),
    "test_fraction = 1": T("--dataset", "numbers", "--test_fraction", "1.0"),
    "test_fraction < 0": T("--dataset", "numbers", "--test_fraction", "-0.2"),
    "test_fraction = 0 (no test split)": T("--dataset", "numbers", "--test_fraction", "0"),
    "one document: a split would be empty": T("--input_files", "{files}/ok.txt", "--input_mode", "documents"),
    "batch_size < 1": T("--dataset", "numbers", "--batch_size", "0"),
    "empty prompt (train)": T("--dataset", "numbers", "--prompt", ""),
    "no data at all": T("--tinystories_weight", "0"),
    "run exists": T("--dataset", "numbers"),
    "heads do not divide embed": T("--dataset", "numbers", "--embed_size", "30", "--n_heads", "4"),
    "non-numeric flag": T("--dataset", "numbers", "--batch_size", "many"),
    "unknown flag": T("--dataset", "numbers", "--frobnicate"),
    "top_p > 1": ["generate", "{run}", "--top_p", "1.5"],
    "top_p = 0": ["generate", "{run}", "--top_p", "0"],
    "temperature < 0": ["generate", "{run}", "--temperature", "-1"],
    "bad compare_p": ["generate", "{run}", "--compare_p", "greedy,abc"],
    "--decoder fused for an LSTM": ["generate", "{run}", "--decoder", "fused"],
    "--weights int8 for an LSTM": ["generate", "{run}", "--weights", "int8"],
    "--weights int8 with --decoder torch": ["generate", "{run}", "--weights", "int8", "--decoder", "torch"],
    "eval --weights int8 for an LSTM": ["eval", "{run}", "--weights", "int8"],
    "serve --weights int8 for an LSTM": ["serve", "{run}", "--weights", "int8", "--port", "0"],
    "not a run (generate)": ["generate", "{files}"],
    "missing run (generate)": ["generate", "{files}/nope"],
    "not a run (eval)": ["eval", "{files}"],
    "not a run (resume)": ["train", "--resume", "{files}"],
    "grad_accum_steps < 1": T("--dataset", "numbers", "--grad_accum_steps", "0"),
    "grad_accum_steps does not divide batch": T("--dataset", "numbers", "--batch_size", "4", "--grad_accum_steps", "3"),
    "grad_accum_steps on resume does not divide": ["train", "--resume", "{run}", "--grad_accum_steps", "3"],
    "corrupt tokenizer.json (generate)": ["generate", "{runs}/tokenizer"],
    "corrupt trainer.pt (resume)": ["train", "--resume", "{runs}/trainer"],
    "weights and trainer.pt of different steps (resume)": ["train", "--resume", "{runs}/pair"],
    "no trainer.pt (resume)": ["train", "--resume", "{runs}/notrainer"],
    "sweep spec missing": ["sweep", "{files}/nope.toml", "--output_dir", "{runs}"],
    "sweep spec not TOML": ["sweep", "{files}/not_toml.toml", "--output_dir", "{runs}"],
    "sweep spec: unknown train flag": ["sweep", "{files}/unknown_flag.toml", "--output_dir", "{runs}"],
    "sweep spec: a flag the sweep owns": ["sweep", "{files}/reserved.toml", "--output_dir", "{runs}"],
    "sweep spec: empty grid": ["sweep", "{files}/empty_grid.toml", "--output_dir", "{runs}"],
    "sweep spec: a point with a bad value": ["sweep", "{files}/bad_point.toml", "--output_dir", "{runs}"],
    "sweep spec: grad_accum_steps does not divide": ["sweep", "{files}/accum.toml", "--output_dir", "{runs}"],
    "sweep --set without =": ["sweep", "{files}/accum.toml", "--output_dir", "{runs}", "--set", "epochs"],
    "compare: no runs there": ["compare", "{files}"],
    "data numbers --out in a missing directory": ["data", "numbers", "--out", "{files}/nodir/n.txt"],
    "run directory is a file": T("--dataset", "numbers", "--run_name", "good/config.json"),
    "run directory below a file": T("--dataset", "numbers", "--run_name", "good/config.json/sub"),
    "--greedy with --top_p": ["generate", "{run}", "--greedy", "--top_p", "0.9"],
    "--greedy with --top_k": ["generate", "{run}", "--greedy", "--top_k", "5"],
    "--greedy with --temperature": ["generate", "{run}", "--greedy", "--temperature", "0.5"],
    "misspelt command": ["trian", "--dataset", "numbers"],
}
# Every damaged checkpoint, through each command that loads one.
for _cmd in ("generate", "eval", "resume"):
    for _what, _dir in (("shape mismatch", "shape"), ("tokenizer vocab mismatch", "vocab"),
                        ("truncated model.safetensors", "truncated"), ("corrupt model.safetensors", "garbage"),
                        ("corrupt config.json", "config")):
        CASES[f"{_what} ({_cmd})"] = (["train", "--resume"] if _cmd == "resume" else [_cmd]) + [f"{{runs}}/{_dir}"]
CASES.update({  # folders that are not one run; paths that do not exist ({runs} holds ten runs: the list is cut short)
    "a folder of runs, not one (generate)": ["generate", "{runs}"],
    "a folder of runs, not one (attention)": ["attention", "{runs}"],
    "a folder of runs, not one (neighbors)": ["neighbors", "{runs}", "--tokens", "1"],
    "a folder of runs, not one (export)": ["export", "{runs}", "--out", "{files}/hf"],
    "a folder of runs, one with a corrupt config (eval)": ["eval", "{runs}"],
    "not a run (attention)": ["attention", "{files}"],
    "report: no runs there": ["report", "{files}"],
    "missing run (eval)": ["eval", "{files}/nope"],
    "missing run (attention)": ["attention", "{files}/nope"],
    "missing run (report)": ["report", "{files}/nope"],
    "missing run (compare)": ["compare", "{files}/nope"],
})


def test_the_matrix_is_large():
    assert len(CASES) >= 25 + 15 + 5


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(name, run, broken, files, capsys):
    before = snapshot(broken)  # the good run and its damaged copies
    argv = [a.format(run=run, files=files, runs=broken) for a in CASES[name]]
    if argv[0] == "train" and "--resume" not in argv:
        argv += ["--output_dir", str(run.parent)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert len(err) < 300, err
    assert snapshot(broken) == before


def test_gpt2_offline_names_the_alternative(run, monkeypatch, capsys):
    import tiktoken

    monkeypatch.delenv("PICOLLM_GPT2_DIR", raising=False)

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    argv = T("--dataset", "numbers", "--tokenizer", "gpt2", "--run_name", "g", "--output_dir", str(run.parent))
    try:
        code = main(argv)
    except ConnectionError:
        pytest.fail("the network error escaped as a traceback")
    err = capsys.readouterr().err
    assert code == 2 and "--tokenizer bpe" in err and "TIKTOKEN_CACHE_DIR" in err and err.count("\n") == 1
    assert not (run.parent / "g").exists()


def test_tinystories_offline_names_the_local_file_option(run, monkeypatch, capsys):
    import picollm.data.sources as sources

    monkeypatch.setattr(sources, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    code = main(T("--tinystories_weight", "0.5", "--input_files", str(run.parent.parent / "nothing.txt")))
    assert code == 2
    code = main(["train", "--no_progress", "--tinystories_weight", "1.0", "--output_dir", str(run.parent),
                 "--run_name", "ts"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--tinystories_path" in err[-1]


def test_console_script_prints_no_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "pico-llm")
    r = subprocess.run([exe, "generate", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "picollm", "train", "--models", "gru"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model" in r.stderr and r.stderr.count("\n") == 1
