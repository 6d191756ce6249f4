"""`pico-llm course`: the whole course on shrunken sizes, its report rendered in headless Chromium with every
image loaded, one section per question with its command lines; readings that follow the numbers; a rerun
that skips what is done. The course exactly as `--quick` runs it is the slow test at the end."""

import json
import re
import shutil

import pytest
from test_experiments import render_in_chromium

from picollm.cli import main
from picollm.experiments import course as C

TINY = ["--set", "max_steps_per_epoch=5", "--set", "numbers_count=400", "--set", "eval_interval=5", "--set", "epochs=2"]
QUESTIONS = 13


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("course")
    assert main(["course", "--quick", "--output_dir", str(out), *TINY]) == 0
    return out


def test_report_has_a_section_per_question_with_its_commands(ran):
    page = (ran / "course.html").read_text()
    sections = re.findall(r"<section id='(\w+)' class='part'>(.*?)</section>", page, re.S)
    assert [k for k, _ in sections] == [p.key for p in C.parts()] and len(sections) == QUESTIONS
    for key, body in sections:
        if key == "custom":  # no --data FILE: skipped, and the report says why
            assert "Skipped: no custom corpus" in body
            continue
        assert "<pre class='cmd'>pico-llm " in body, key
        assert "<p class='reading'>" in body and "did not finish" not in body, key
    meta = json.loads((ran / "course.json").read_text())
    assert all(not p.get("failures") for p in meta["parts"]), [p.get("failures") for p in meta["parts"]]
    # the command lines shown are the ones that ran: the sweep specs they name exist, the runs they made too
    assert (ran / "specs" / "pos_emb.toml").is_file() and (ran / "posemb" / "pos_emb" / "results.md").is_file()
    assert (ran / "transformer" / "rmsnorm" / "summary.json").is_file()
    assert "--max_steps_per_epoch 5" in page  # --set reached every command


def test_report_renders_in_chromium_with_every_image(ran, tmp_path):
    loaded, total, rows = render_in_chromium(str(ran / "course.html"), tmp_path)
    assert total >= 15 and loaded == total  # loss curves, sweep plots, attention maps: all embedded
    assert rows >= 20
    html = (ran / "course.html").read_text()
    assert "<script" not in html and not re.search(r"(src|href)=['\"](?!data:image/png;base64,|#)", html)


def test_rerun_skips_what_is_done(ran, tmp_path, capsys):
    ran = shutil.copytree(ran, tmp_path / "again", copy_function=shutil.copy2)  # mtimes kept; the fixture intact
    weights = sorted((ran / "kgram").rglob("model.safetensors")) + sorted((ran / "fit").rglob("model.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in weights}
    assert len(before) == 4
    assert main(["course", "--quick", "--output_dir", str(ran), *TINY, "--only", "lstm,kgram,fit"]) == 0
    err = capsys.readouterr().err
    assert err.count("done already: pico-llm train") == 3  # lstm, overfit, underfit
    assert {p: p.stat().st_mtime_ns for p in weights} == before  # the sweep skipped its finished points too
    page = (ran / "course.html").read_text()
    assert [k for k in re.findall(r"<section id='(\w+)'", page)] == ["lstm", "kgram", "fit"]


def test_bad_arguments_one_line(tmp_path, capsys):
    for argv, words in ((["--data", str(tmp_path / "nope.txt")], "does not exist"),
                        (["--data", "tinystories"], "needs --tinystories_path"),
                        (["--only", "lstm,nope"], "unknown part 'nope'"),
                        (["--set", "novalue"], "KEY=VALUE")):
        assert main(["course", "--output_dir", str(tmp_path / "c"), *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------- readings follow the numbers


def run_numbers(test_loss, first=6.0, acc=0.5):
    return {"first_step": 20, "first_test": first, "last_step": 120, "test_loss": test_loss, "train_loss": 1.0,
            "bits_per_byte": test_loss / 2, "accuracy": acc, "params": 1000}


@pytest.mark.parametrize("reading, numbers, change, before, after", [
    (C.lstm_reading, {"numbers": run_numbers(2.5)}, lambda m: m["numbers"].update(test_loss=1.75),
     "to 2.500 at step 120", "to 1.750 at step 120"),
    (C.lstm_reading, {"numbers": run_numbers(2.5)}, lambda m: m["numbers"].update(test_loss=7.0),
     "it learns", "it did not fall"),
    (C.kgram_reading, {"onehot": {"test_loss": 2.0, "params": 9000}, "embedding": {"test_loss": 2.5, "params": 3000}},
     lambda m: m["embedding"].update(test_loss=1.5), "The one-hot variant is lower by 0.500",
     "The embedding variant is lower by 0.500"),
    (C.transformer_reading, {**run_numbers(1.2), "kv": {"tokens": 32, "same": 32, "cache_tok_s": 900.0,
                                                         "recompute_tok_s": 300.0}},
     lambda m: m["kv"].update(same=30), "gave the same tokens", "gave 30 of 32 equal tokens"),
    (C.transformer_reading, {**run_numbers(1.2), "kv": {"tokens": 32, "same": 32, "cache_tok_s": 900.0,
                                                         "recompute_tok_s": 300.0}},
     lambda m: m["kv"].update(recompute_tok_s=450.0), "(3.0x)", "(2.0x)"),
    (C.topp_reading, {"settings": {"greedy": {"samples": 1, "words": 10, "distinct": 0.2},
                                   "top-p 1": {"samples": 3, "words": 30, "distinct": 0.9}}},
     lambda m: m["settings"]["greedy"].update(distinct=0.95), "The least varied is greedy", "The least varied is top-p 1"),
    (C.topp_reading, {"settings": {"greedy": {"samples": 1, "words": 10, "distinct": 0.2},
                                   "top-p 1": {"samples": 3, "words": 30, "distinct": 0.9}}},
     lambda m: m["settings"]["greedy"].update(distinct=0.95), "rises with p at every step", "does not rise steadily"),
    (C.fit_reading, {"overfit": {"best_step": 40, "best_test_loss": 1.5, "test_loss": 1.9, "train_loss": 0.5, "gap": 1.4,
                                 "overfitting": {"from_step": 40, "to_step": 100, "rises": 3, "test_rise": 0.4,
                                                 "train_fall": 0.6}}},
     lambda m: m["overfit"]["overfitting"].update(from_step=60), "(steps 40 to 100, up 0.400)",
     "(steps 60 to 100, up 0.400)"),
    (C.fit_reading, {"overfit": {"best_step": 40, "best_test_loss": 1.5, "test_loss": 1.9, "train_loss": 0.5, "gap": 1.4,
                                 "overfitting": {"from_step": 40, "to_step": 100, "rises": 3, "test_rise": 0.4,
                                                 "train_fall": 0.6}}},
     lambda m: m["overfit"].update(best_step=60), "1.500 at step 40", "1.500 at step 60"),
    (C.fit_reading, {"overfit": {"best_step": 40, "best_test_loss": 1.5, "test_loss": 1.9, "train_loss": 0.5, "gap": 1.4,
                                 "overfitting": {"from_step": 40, "to_step": 100, "rises": 3, "test_rise": 0.4,
                                                 "train_fall": 0.6}}},
     lambda m: m["overfit"].update(overfitting=None), "overfitting.", "no overfitting detected"),
    (C.hyper_reading, {"embed_size": {"key": "embed_size", "points": 3, "best": 64, "best_loss": 1.2, "worst": 16,
                                      "worst_loss": 2.0}},
     lambda m: m["embed_size"].update(best=32), "lowest at embed_size = 64 (1.200)", "lowest at embed_size = 32 (1.200)"),
    (C.heads_reading, {"heads": 8, "prev_layer": 1, "prev_head": 2, "prev": 0.81, "ind_layer": 1, "ind_head": 0,
                       "induction": 0.4},
     lambda m: m.update(prev=0.33, prev_head=3), "layer 1 head 2 puts the most weight on the previous token: 0.81",
     "layer 1 head 3 puts the most weight on the previous token: 0.33"),
    (C.sae_reading, {"explained_variance": 0.9, "ce_loss_recovered": 0.95, "l0": 8.0, "dead_fraction": 0.1},
     lambda m: m.update(explained_variance=0.5), "explains 90.0% of its variance", "explains 50.0% of its variance"),
])
def test_readings_change_with_the_numbers(reading, numbers, change, before, after):
    text = reading(numbers)
    assert before in text and after not in text, text
    change(numbers)
    text = reading(numbers)
    assert after in text and before not in text, text


def test_readings_quote_the_measured_numbers(ran):
    """Every number a reading states is one the part measured (course.json keeps them)."""
    meta = {p["key"]: p for p in json.loads((ran / "course.json").read_text())["parts"]}
    lstm = meta["lstm"]["numbers"]["numbers"]
    assert f"{lstm['test_loss']:.3f} at step {lstm['last_step']}" in meta["lstm"]["reading"]
    t = meta["transformer"]["numbers"]
    assert f"test loss {t['test_loss']:.3f}" in meta["transformer"]["reading"]
    assert f"{t['kv']['cache_tok_s'] / t['kv']['recompute_tok_s']:.1f}x" in meta["transformer"]["reading"]
    pos = meta["posemb"]["numbers"]
    assert f"pos_emb = {pos['best']} ({pos['best_loss']:.3f})" in meta["posemb"]["reading"]


@pytest.mark.slow
def test_course_quick_as_documented(tmp_path):
    """`pico-llm course --quick` exactly (no --set): every part finishes; the wall time is in course.json."""
    assert main(["course", "--quick", "--output_dir", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "course.json").read_text())
    assert all(not p.get("failures") for p in meta["parts"])
    loaded, total, _ = render_in_chromium(str(tmp_path / "course.html"), tmp_path)
    assert loaded == total >= 15
