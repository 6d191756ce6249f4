"""The staged data pipeline (picollm/data/prepare.py): hash split, official validation split, the cache,
a prepare killed midway. Tiny files in the real formats under tmp_path; no network."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picollm.cli import main
from picollm.config import DataConfig
from picollm.data import prepare
from picollm.data import tokenizers as tk
from picollm.data.batches import Batcher
from picollm.data.corpus import build_corpus
from picollm.data.prepare import prepared_root, split_documents
from picollm.data.tokenizers import tokenizer_from_json
from picollm.errors import PicoError
from picollm.flags import complete, configs_from_args, train_parser
from picollm.training import distributed


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test its own cache: what one prepares, another does not find."""
    d = tmp_path / "cache"
    monkeypatch.setenv("PICOLLM_CACHE_DIR", str(d))
    monkeypatch.delenv(prepare.PAUSE_ENV, raising=False)
    return d


def story(i: int) -> str:
    return (f"Once upon a time there was a dog named Rex number {i}. Rex liked to run in the park "
            f"with his friend {i % 7}.\nThe end of story {i}.")


def write_txt(path, stories):
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


def tiny(**kw) -> DataConfig:
    return DataConfig(**{"tinystories_weight": 1.0, "tinystories_subset": "all", "tokenizer": "byte", **kw})


def texts(corpus, split):
    (src,) = corpus.sources
    s = getattr(src, split)
    return [corpus.tokenizer.decode(s.doc(i)) for i in range(s.n_docs)]


class Spy:
    """Counts the tokenizer trainings, the reads of its training sample and the chunks tokenized."""

    def __init__(self, monkeypatch):
        self.encoded, self.trained, self.sampled = 0, 0, 0
        encode, train, sample = prepare.encode_chunks, tk._train_bpe, prepare.training_sample

        def counting_encode(tok, jobs):
            for out in encode(tok, jobs):
                self.encoded += 1
                yield out

        def counting_train(*a, **k):
            self.trained += 1
            return train(*a, **k)

        def counting_sample(*a, **k):
            self.sampled += 1
            return sample(*a, **k)

        monkeypatch.setattr(prepare, "encode_chunks", counting_encode)
        monkeypatch.setattr(prepare, "training_sample", counting_sample)
        monkeypatch.setattr(tk, "_train_bpe", counting_train)


# --------------------------------------------------------------------------- the split


def test_a_document_lands_in_the_same_split_whatever_else_is_in_the_corpus(tmp_path):
    a = write_txt(tmp_path / "a.txt", [story(i) for i in range(0, 600)])
    b = write_txt(tmp_path / "b.txt", [story(i) for i in range(300, 1200)] + ["something else entirely"])
    ca, cb = build_corpus(tiny(tinystories_path=str(a))), build_corpus(tiny(tinystories_path=str(b)))
    test_a, test_b = set(texts(ca, "test")), set(texts(cb, "test"))
    train_a, train_b = set(texts(ca, "train")), set(texts(cb, "train"))
    common = {story(i) for i in range(300, 600)}
    assert common & test_a and common & train_a  # both splits hold some of the shared stories ...
    assert common & test_a == common & test_b and common & train_a == common & train_b  # ... the same ones
    assert 0.05 < len(test_b) / (len(test_b) + len(train_b)) < 0.15  # test_fraction 0.1
    # the same rule as a list: split_documents, and independent of --seed
    assert set(split_documents([story(i) for i in range(600)], 0.1)[1]) == test_a
    assert set(texts(build_corpus(tiny(tinystories_path=str(a), seed=7)), "test")) == test_a


def test_no_test_document_is_trained_on_and_duplicates_are_dropped(tmp_path):
    stories = [story(i) for i in range(400)]
    dup = stories + stories[:50] + [stories[3]] * 5  # exact duplicates, straddling whatever the split
    corpus = build_corpus(tiny(tinystories_path=str(write_txt(tmp_path / "t.txt", dup)), test_fraction=0.2))
    train, test = texts(corpus, "train"), texts(corpus, "test")
    assert set(train).isdisjoint(test) and len(test) > 40
    assert sorted(train + test) == sorted(stories)  # every story once
    assert corpus.prepared[0]["train"].manifest["duplicates_dropped"] == 55
    # every training batch is cut from the training array, which holds no test story
    stream = corpus.tokenizer.decode(corpus.sources[0].train.tokens)
    assert not any(t in stream for t in test)


def test_tiny_corpora_still_split(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single document\nof two lines\n")
    with pytest.raises(PicoError, match="only 1 distinct document.*--input_mode lines"):  # no NaN test loss
        build_corpus(DataConfig(input_files=[str(one)], input_mode="documents", tokenizer="byte"))
    c = build_corpus(DataConfig(input_files=[str(one)], tokenizer="byte"))  # as lines: two documents
    assert c.sources[0].test.n_docs == 1 and c.sources[0].train.n_docs == 1
    few = tmp_path / "few.txt"
    few.write_text("".join(f"line {i}\n" for i in range(4)))
    c = build_corpus(DataConfig(input_files=[str(few)], tokenizer="byte"))
    assert c.sources[0].test.n_docs >= 1 and c.sources[0].train.n_docs >= 1


# --------------------------------------------------------------------------- the official validation split


def test_the_official_validation_file_is_the_test_split(tmp_path):
    train_stories = [story(i) for i in range(200)]
    valid_stories = [f"A validation story {i}." for i in range(30)] + [story(5), story(17)]  # two also in train
    tpath = write_txt(tmp_path / "TinyStories-train.txt", train_stories)
    for vpath in (tmp_path / "TinyStories-valid.txt", tmp_path / "valid.jsonl", tmp_path / "valid.parquet"):
        if vpath.suffix == ".txt":
            write_txt(vpath, valid_stories)
        elif vpath.suffix == ".jsonl":
            vpath.write_text("".join(json.dumps({"text": s}) + "\n" for s in valid_stories))
        else:
            pq.write_table(pa.table({"text": valid_stories}), vpath)
        corpus = build_corpus(tiny(tinystories_path=str(tpath), tinystories_valid_path=str(vpath)))
        assert texts(corpus, "test") == valid_stories, vpath  # all of it, in its order
        assert texts(corpus, "train") == [s for s in train_stories if s not in valid_stories]  # no hash split
        m = corpus.prepared[0]["train"].manifest
        assert m["rule"]["kind"] == "official" and m["excluded_as_test"] == 2
    with pytest.raises(PicoError, match="TinyStories file not found"):
        build_corpus(tiny(tinystories_path=str(tpath), tinystories_valid_path=str(tmp_path / "nope.txt")))
    with pytest.raises(PicoError, match="tinystories_weight"):
        DataConfig(dataset="numbers", tinystories_valid_path=str(vpath))


def test_the_hub_validation_split_is_the_test_split(monkeypatch):
    import datasets

    from picollm.data import sources

    hub = {"train": [{"text": f"  hub train story {i}\n"} for i in range(60)],
           "validation": [{"text": f"hub validation story {i}"} for i in range(9)]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub[split])
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: True)
    corpus = build_corpus(tiny(tinystories_subset=40))
    assert texts(corpus, "test") == [r["text"] for r in hub["validation"]]
    assert texts(corpus, "train") == [f"hub train story {i}" for i in range(40)]


def test_tinystories_subset_all(tmp_path):
    path = str(write_txt(tmp_path / "t.txt", [story(i) for i in range(50)]))
    args = complete(train_parser().parse_args(["--tinystories_path", path, "--tinystories_weight", "1",
                                               "--tinystories_subset", "all", "--tokenizer", "byte"]))
    data = configs_from_args(args)[2]
    assert data.tinystories_subset == "all" and DataConfig.from_dict(json.loads(json.dumps(data.to_dict()))) == data
    corpus = build_corpus(data)
    assert sum(s.n_docs for s in (corpus.sources[0].train, corpus.sources[0].test)) == 50
    ten = build_corpus(tiny(tinystories_path=path, tinystories_subset=10))
    assert sum(s.n_docs for s in (ten.sources[0].train, ten.sources[0].test)) == 10
    for bad in ("0", "most"):
        with pytest.raises(PicoError, match="tinystories_subset"):
            configs_from_args(complete(train_parser().parse_args(["--dataset", "numbers", "--tinystories_subset", bad])))
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "--tinystories_subset all" in readme and "--tinystories_valid_path" in readme


# --------------------------------------------------------------------------- the cache


def test_a_second_prepare_reuses_the_cache(tmp_path, monkeypatch):
    path = str(write_txt(tmp_path / "t.txt", [story(i) for i in range(300)]))
    cfg = tiny(tinystories_path=path, tokenizer="bpe", vocab_size=300)
    spy = Spy(monkeypatch)
    first = build_corpus(cfg)
    assert (spy.sampled, spy.trained) == (1, 1) and spy.encoded > 0
    assert all(not p.reused for p in first.prepared[0].values())
    assert isinstance(first.sources[0].train.tokens, np.memmap) and first.sources[0].train.tokens.dtype == np.uint16
    spy.encoded = spy.trained = spy.sampled = 0
    again = build_corpus(cfg)
    assert (spy.sampled, spy.trained, spy.encoded) == (0, 0, 0)  # no text read for the tokenizer, none tokenized
    assert all(p.reused for p in again.prepared[0].values())
    assert again.tokenizer.identity == first.tokenizer.identity
    for a, b in zip(first.sources, again.sources):
        assert np.array_equal(a.train.tokens, b.train.tokens) and np.array_equal(a.test.starts, b.test.starts)
    # a run's own tokenizer (resume, eval; a DDP rank's copy) finds the same arrays
    run_tok = tokenizer_from_json(first.tokenizer.to_json())
    assert all(p.reused for p in build_corpus(cfg, tokenizer=run_tok).prepared[0].values())
    assert spy.encoded == 0
    # another tokenizer or split is other data
    other = build_corpus(tiny(tinystories_path=path, tokenizer="bpe", vocab_size=280))
    assert spy.encoded > 0 and not any(p.reused for p in other.prepared[0].values())
    assert other.sources[0].train.n_docs == first.sources[0].train.n_docs
    assert not np.array_equal(other.sources[0].train.tokens, first.sources[0].train.tokens)
    spy.encoded = 0
    build_corpus(tiny(tinystories_path=path, tokenizer="bpe", vocab_size=300, test_fraction=0.2))
    assert spy.encoded > 0


def test_a_ddp_rank_opens_rank_0s_prepared_data(tmp_path, monkeypatch):
    cfg = DataConfig(dataset="numbers", numbers_count=300, tokenizer="bpe", vocab_size=300)
    spy = Spy(monkeypatch)
    tok_json = build_corpus(cfg).tokenizer.to_json()  # rank 0 has prepared the data
    shutil.rmtree(prepared_root() / "tokenizers")  # so a rank that built its own tokenizer would train one
    sent = [None, tok_json]  # what rank 0 broadcasts: on_main's "no error", then its tokenizer
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, d: sent.pop(0))
    spy.encoded = spy.trained = spy.sampled = 0
    corpus = distributed.shared_corpus(cfg, distributed.Dist(rank=1, world_size=2))
    assert (spy.sampled, spy.trained, spy.encoded) == (0, 0, 0)  # it reads no text and tokenizes none
    assert corpus.tokenizer.to_json() == tok_json and not sent


def test_a_damaged_prepared_directory_is_rebuilt_not_trusted(tmp_path):
    cfg = tiny(tinystories_path=str(write_txt(tmp_path / "t.txt", [story(i) for i in range(100)])))
    first = build_corpus(cfg)
    tokens = np.array(first.sources[0].train.tokens)
    path = first.sources[0].train.path
    with open(os.path.join(path, "tokens.bin"), "r+b") as f:
        f.truncate(100)
    again = build_corpus(cfg)
    assert not again.prepared[0]["train"].reused and np.array_equal(again.sources[0].train.tokens, tokens)


def test_data_prepare_and_info_commands(tmp_path, capsys):
    path = str(write_txt(tmp_path / "t.txt", [story(i) for i in range(100)]))
    argv = ["data", "prepare", "--tinystories_path", path, "--tinystories_weight", "1", "--tokenizer", "byte",
            "--tinystories_subset", "all", "--no_progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "prepared" in out and str(prepared_root()) in out and "tinystories" in out
    assert main(argv) == 0 and "reused" in capsys.readouterr().out
    assert main(["data", "info"]) == 0
    info = capsys.readouterr().out
    corpus = build_corpus(tiny(tinystories_path=path))
    for s in (corpus.sources[0].train, corpus.sources[0].test):
        assert f"{len(s.tokens):,}" in info and os.path.basename(s.path) in info
    assert "tokens/byte" in info
    numbers = tmp_path / "n.txt"
    assert main(["data", "numbers", "--out", str(numbers), "--count", "5"]) == 0
    assert len(numbers.read_text().splitlines()) == 5
    assert main(["data", "prepare", "--models", "lstm"]) == 2  # data flags only


# --------------------------------------------------------------------------- a prepare killed midway


def spawn_prepare(argv, cache_dir, **env):
    e = dict(os.environ, PICOLLM_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen([sys.executable, "-m", "picollm", "data", "prepare", *argv], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def arrays(split_dir):
    m = json.load(open(os.path.join(split_dir, "manifest.json")))
    return {name: open(os.path.join(split_dir, f"{name}.bin"), "rb").read() for name in ("tokens", *prepare.ARRAYS)}, \
        {k: v for k, v in m.items() if k not in ("created", "seconds")}


def test_a_prepare_killed_midway_leaves_nothing_trusted_and_the_next_one_completes(tmp_path, monkeypatch):
    stories = [story(i) * 3 for i in range(8000)]  # ~3 MB: several chunks
    path = str(write_txt(tmp_path / "t.txt", stories))
    argv = ["--tinystories_path", path, "--tinystories_weight", "1", "--tinystories_subset", "all",
            "--tokenizer", "byte", "--no_progress"]
    killed, flag = tmp_path / "killed", tmp_path / "paused"
    proc = spawn_prepare(argv, killed, **{prepare.PAUSE_ENV: str(flag)})
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the prepare never reached its pause"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    root = killed / "prepared"
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]  # half written ...
    monkeypatch.setenv("PICOLLM_CACHE_DIR", str(killed))
    assert prepare.prepared_info()[0] == []  # ... and nothing under a name a run would trust
    proc = spawn_prepare(argv, killed)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the leftovers are gone
    resumed = {m["split"]: m["path"] for m in prepare.prepared_info()[0]}
    monkeypatch.setenv("PICOLLM_CACHE_DIR", str(tmp_path / "clean"))
    corpus = build_corpus(tiny(tinystories_path=path))  # an uninterrupted prepare
    for split in ("train", "test"):
        clean = getattr(corpus.sources[0], split).path
        assert os.path.basename(clean) == os.path.basename(resumed[split])
        assert arrays(clean) == arrays(resumed[split]), split


# --------------------------------------------------------------------------- batches over the memmaps


def test_batches_come_from_the_memmaps_and_resume_identically(tmp_path):
    corpus = build_corpus(tiny(tinystories_path=str(write_txt(tmp_path / "t.txt", [story(i) for i in range(300)]))))
    for mode in ("packed", "padded"):
        b1 = Batcher(corpus.sources, 32, 8, mode=mode, seed=4)
        b1.next_batch()
        state = b1.state_dict()
        want = [b1.next_batch() for _ in range(3)]
        b2 = Batcher(corpus.sources, 32, 8, mode=mode, seed=0)
        b2.load_state_dict(state)
        for (x, y), (x2, y2) in zip(want, [b2.next_batch() for _ in range(3)]):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_a_run_from_before_the_hash_split_is_refused_not_scored_on_its_training_data(tmp_path, capsys):
    """A config.json without "split" held out a seeded shuffle: rebuilding its test split by hash would
    score documents it trained on, so eval and --resume refuse it in one line (other files still work)."""
    import json

    from picollm.cli import main

    flags = ["--dataset", "numbers", "--numbers_count", "120", "--tokenizer", "byte", "--models", "lstm",
             "--embed_size", "16", "--block_size", "16", "--batch_size", "4", "--max_steps_per_epoch", "2",
             "--epochs", "2", "--stop_at_step", "2", "--no_progress", "--prompt", "1 2"]
    assert main(["train", *flags, "--output_dir", str(tmp_path), "--run_name", "old"]) == 0
    run = tmp_path / "old"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["split"] == "hash-v1"
    del cfg["data"]["split"]
    (run / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    for argv in (["eval", str(run)], ["train", "--resume", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "seeded-shuffle split" in err and "Traceback" not in err
    other = tmp_path / "other.txt"
    other.write_text("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18\n" * 4)
    assert main(["eval", str(run), "--input_files", str(other)]) == 0
