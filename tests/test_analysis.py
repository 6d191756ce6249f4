"""Looking inside: attention maps and head scores on hand-built heads, embedding neighbours, k-means, the
attention / neighbors / eval commands end to end, and the classic --monosemantic_enabled."""

import json
import math
import os

import pytest
import torch
from torch.testing import assert_close

from picollm import checkpoint as ckpt
from picollm.analysis.attention import (
    attention_weights,
    format_scores,
    head_scores,
    induction_scores,
    induction_sequences,
    looks_like,
    parse_heads,
    prev_token_scores,
    sink_scores,
    token_label,
)
from picollm.analysis.neighbors import embedding_tables, hidden_states, kmeans, nearest, neighbors, resolve_token
from picollm.cli import classic_main, main
from picollm.config import DataConfig, ModelConfig, TrainConfig
from picollm.data.tokenizers import ByteTokenizer
from picollm.errors import PicoError
from picollm.models import build_model
from picollm.training import train

# ----------------------------------------------------------------------------- hand-built heads


def blank_transformer(**kw) -> torch.nn.Module:
    """A transformer with every weight zero and every norm weight one: the tests write in what they need."""
    cfg = ModelConfig(model="transformer", pos_emb="learned", norm="rmsnorm", norm_placement="pre", mlp="gelu",
                      tie_weights=False, **kw)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
    return model


def previous_token_model() -> torch.nn.Module:
    """One layer, three heads on one-hot positions (x_p = e_p, so the normed input is sqrt(24) e_p):
    head 0 matches query i with key i-1 (q_i = c e_i, k_j = e_{j+1}); head 1 matches every query with key 0
    (a constant query from the bias, a key only at position 0); head 2 has q = k = 0, so it is uniform."""
    model = blank_transformer(vocab_size=5, block_size=8, n_embd=24, n_layer=1, n_head=3, bias=True)
    C, hs = 24, 8
    with torch.no_grad():
        model.wpe.weight[:, :8] = torch.eye(8)
        W, b = model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias  # rows: q (C), k (C), v (C)
        for d in range(8):
            W[d, d] = 5.0  # head 0 query: position i
        for j in range(7):
            W[C + j + 1, j] = 1.0  # head 0 key: position j + 1
        b[hs + 0] = 20.0  # head 1 query: constant
        W[C + hs + 0, 0] = 1.0  # head 1 key: only position 0
    return model


def induction_model() -> torch.nn.Module:
    """Two layers, the textbook induction circuit on a residual stream of three one-hot blocks: position
    (dims 0-15), token (16-25) and previous token (26-35). Layer 0 head 0 attends to the previous position
    and writes that position's token into the previous-token block; layer 1 head 0 queries with the current
    token and keys on the previous-token block, so it attends to the position right after the last
    occurrence of the current token. Heads 1 stay zero (uniform). Vocabulary 10, token 9 the bos."""
    model = blank_transformer(vocab_size=10, block_size=16, n_embd=36, n_layer=2, n_head=2, bias=False)
    C, P, V = 36, 16, 10
    with torch.no_grad():
        model.wpe.weight[:, :P] = torch.eye(P)
        model.wte.weight[:, P:P + V] = torch.eye(V)
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        for d in range(P):
            a0.qkv.weight[d, d] = 10.0  # query: position i
        for j in range(P - 1):
            a0.qkv.weight[C + j + 1, j] = 1.0  # key: position j + 1
        for t in range(V):
            a0.qkv.weight[2 * C + t, P + t] = 1.0  # value: the token
            a0.proj.weight[P + V + t, t] = 1.0 / math.sqrt(18)  # into the previous-token block, about 1
            a1.qkv.weight[t, P + t] = 15.0  # query: the current token
            a1.qkv.weight[C + t, P + V + t] = 1.0  # key: the previous token
    return model


def test_a_head_built_to_attend_to_the_previous_token_scores_about_one():
    model = previous_token_model()
    attn = attention_weights(model, [1, 3, 2, 4, 0, 1, 2, 3])
    assert len(attn) == 1 and attn[0].shape == (3, 8, 8)
    att = attn[0]
    assert_close(att.sum(-1), torch.ones(3, 8))  # every row a distribution
    assert torch.all(att.triu(diagonal=1) == 0)  # nothing from the future
    prev, sink = prev_token_scores(att), sink_scores(att)
    assert prev[0] > 0.95 and sink[0] < 0.2  # head 0: the previous token
    assert sink[1] > 0.95  # head 1: the first token
    uniform = sum(1 / (i + 1) for i in range(1, 8)) / 7  # head 2: 1/(i+1) everywhere
    assert_close(prev[2], torch.tensor(uniform)) and prev[2] < 0.3
    rows = head_scores(attn, torch.zeros(1, 3))
    assert [looks_like(r) for r in rows] == ["previous-token", "sink", ""]
    table = format_scores(rows)
    assert table.splitlines()[1].split()[:3] == ["0", "0", f"{float(prev[0]):.3f}"]


def test_an_induction_circuit_built_by_hand_scores_about_one():
    model = induction_model()
    seqs = induction_sequences(10, bos_id=9, seq_len=7, n_seqs=3, seed=0)
    assert seqs.shape == (3, 15) and torch.all(seqs[:, 0] == 9)
    assert torch.equal(seqs[:, 1:8], seqs[:, 8:])  # [bos, r, r]
    assert all(len(set(r.tolist())) == 7 and 9 not in r.tolist() for r in seqs[:, 1:8])  # distinct, no bos
    scores, L = induction_scores(model, bos_id=9)
    assert L == 7 and scores.shape == (2, 2)
    assert scores[1, 0] > 0.9  # the induction head
    assert scores[0, 0] < 0.1 and scores[0, 1] < 0.3 and scores[1, 1] < 0.3  # previous-token and uniform heads
    att0 = attention_weights(model, seqs[0].tolist())[0]
    assert prev_token_scores(att0)[0] > 0.95


def test_heads_spec_and_token_labels():
    assert parse_heads("all", 4) == [0, 1, 2, 3]
    assert parse_heads("0-2", 4) == [0, 1, 2]
    assert parse_heads("3,1,1", 4) == [3, 1]
    assert parse_heads("0-1,3", 4) == [0, 1, 3]
    for bad in ("4", "0-4", "2-1", "x", "", "1,,2", "-1"):
        with pytest.raises(PicoError):
            parse_heads(bad, 4)
    assert token_label(" the") == "\u2423the"
    assert token_label("\n") == "\\n"
    assert token_label("a\tb") == "a\\tb"


# ----------------------------------------------------------------------------- neighbours and k-means


def test_parallel_embedding_rows_are_nearest_neighbours():
    model = build_model(ModelConfig(model="transformer", vocab_size=257, block_size=8, n_embd=16, n_layer=1,
                                    n_head=2, tie_weights=False))
    A, B, C = ord("A"), ord("B"), ord("C")
    with torch.no_grad():
        model.wte.weight[B] = 3.0 * model.wte.weight[A]  # parallel: cosine 1 whatever the length
        model.wte.weight[C] = -model.wte.weight[A]
    (i, cos), = nearest(embedding_tables(model)["input"], A, 1)
    assert i == B and cos == pytest.approx(1.0, abs=1e-5)
    res = neighbors(model, ByteTokenizer(), ["A"], k=300)  # k is capped at V - 1
    assert set(res[0]["neighbors"]) == {"input", "output"}  # untied: both tables
    near = res[0]["neighbors"]["input"]
    assert len(near) == 256 and near[0][:2] == (B, "B") and near[-1][:2] == (C, "C")
    assert near[-1][2] == pytest.approx(-1.0, abs=1e-5)


class SpacedTokenizer:
    """'dog' is two tokens, ' dog' one: as GPT-2 style BPE vocabularies hold words."""

    vocab = {" dog": 0, "d": 1, "og": 2, "x": 3, "y": 4, " ": 5}

    def encode(self, text):
        if text in self.vocab:
            return [self.vocab[text]]
        return [self.vocab[c] for c in ("d", "og")] if text == "dog" else [self.vocab["x"], self.vocab["y"]]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def test_token_lookup_tries_a_leading_space_and_refuses_words_it_splits():
    tok = SpacedTokenizer()
    assert resolve_token(tok, "x") == 3
    assert resolve_token(tok, "dog") == 0  # via ' dog'
    with pytest.raises(PicoError, match=r"'xy' is not a single token.*\['x', 'y'\]"):
        resolve_token(tok, "xy")
    with pytest.raises(PicoError, match="empty"):
        resolve_token(tok, "")


def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, -10.0, 0]])
    truth = torch.arange(4).repeat_interleave(25)
    x = centers[truth] + torch.randn(100, 3, generator=g)
    C, assign = kmeans(x, 4, seed=1)
    pairs = set(zip(truth.tolist(), assign.tolist()))
    assert len(pairs) == 4 and len({p for _, p in pairs}) == 4  # a one-to-one match of labels
    assert torch.cdist(C, centers).min(1).values.max() < 1.0
    C2, assign2 = kmeans(x, 4, seed=1)
    assert torch.equal(assign, assign2)  # seeded
    with pytest.raises(PicoError):
        kmeans(x, 101)


@pytest.mark.parametrize("variant", ["onehot", "embedding", "conv"])
def test_kgram_and_lstm_embedding_tables(variant):
    V, C = 11, 8
    kg = build_model(ModelConfig(model="kgram", vocab_size=V, n_embd=C, kgram_k=3, kgram_variant=variant))
    tables = embedding_tables(kg)
    assert tables["input"].shape == (V, C) and tables["output"].shape == (V, C)
    if variant == "onehot":  # the rows of the current-token slot (slot k-1) of Linear(k*V, C)
        assert torch.equal(tables["input"], kg.in_proj.weight[2 * V: 3 * V].detach())
    lstm = build_model(ModelConfig(model="lstm", vocab_size=V, n_embd=C, hidden_size=6))
    tables = embedding_tables(lstm)
    assert tables["input"].shape == (V, C) and tables["output"].shape == (V, 6)


@pytest.mark.parametrize("family", ["transformer", "lstm", "kgram"])
@torch.no_grad()
def test_hidden_states_are_what_the_head_reads(family):
    model = build_model(ModelConfig(model=family, vocab_size=20, block_size=8, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(20, (13,), generator=torch.Generator().manual_seed(0)).tolist()  # longer than block_size
    h = hidden_states(model, ids)
    assert h.shape[0] == 13
    first = torch.tensor([ids[:8]])
    if family == "transformer":
        assert_close(model.head(model.ln_f(h[:8])), model(first)[0])
    elif family == "lstm":
        assert_close(model.head(h), model(torch.tensor([ids]))[0])
    else:
        assert_close(model.net[-1](h), model(torch.tensor([ids]))[0])


# ----------------------------------------------------------------------------- the commands end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny transformer run (bpe, untied) and a classic LSTM run trained with --monosemantic_enabled."""
    root = tmp_path_factory.mktemp("analysis")
    data = DataConfig(dataset="numbers", numbers_count=150, tokenizer="bpe", vocab_size=300, seed=1)
    tcfg = TrainConfig(epochs=1, max_steps_per_epoch=8, batch_size=8, warmup_steps=2, eval_batches=2, log_interval=4,
                       prompt="0 1 2", max_new_tokens=4)
    mcfg = ModelConfig(model="transformer", block_size=24, n_embd=32, n_layer=2, n_head=2, tie_weights=False)
    summary = train(mcfg, data, tcfg, str(root / "tf"), progress=False, log=lambda s: None)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = classic_main(["--tinystories_weight", "0", "--dataset", "numbers", "--numbers_count", "150",
                           "--tokenizer", "byte", "--block_size", "16", "--embed_size", "16", "--batch_size", "4",
                           "--max_steps_per_epoch", "3", "--epochs", "1", "--device_id", "cpu", "--output_dir",
                           str(root), "--run_name", "lstm", "--no_progress", "--prompt", "1 2", "--max_new_tokens", "3",
                           "--monosemantic_enabled"])
    assert rc == 0
    return {"root": root, "tf": str(root / "tf"), "lstm": str(root / "lstm"), "summary": summary,
            "classic_out": out.getvalue(), "tcfg": tcfg}


def test_classic_monosemantic_annotates_each_generated_token(runs):
    lines = runs["classic_out"].splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("monosemantic (lstm"))
    notes = lines[at + 1: at + 4]
    assert len(notes) == 3 and all(" -> " in n and n.count(", ") == 2 for n in notes)  # 3 tokens, 3 neighbours each


def test_attention_command_writes_figure_and_json(runs, tmp_path, capsys):
    png, js = tmp_path / "a.png", tmp_path / "a.json"
    assert main(["attention", runs["tf"], "--prompt", "0 1 2 3 4 5", "--layer", "1", "--heads", "0-1",
                 "--out", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    d = json.loads(js.read_text())
    assert {"run", "prompt", "tokens", "token_ids", "layers", "heads", "attention", "scores", "induction"} <= set(d)
    T = len(d["token_ids"])
    assert d["layers"] == [1] and d["heads"] == [0, 1] and len(d["tokens"]) == T
    assert [(a["layer"], a["head"]) for a in d["attention"]] == [(1, 0), (1, 1)]
    w = torch.tensor(d["attention"][0]["weights"])
    assert w.shape == (T, T) and torch.all(w.triu(1) == 0)
    assert_close(w.sum(-1), torch.ones(T), atol=1e-5, rtol=0)
    assert len(d["scores"]) == 4 and {"layer", "head", "prev_token", "sink", "induction"} <= set(d["scores"][0])
    assert "prev" in out and "induction" in out and len([line for line in out.splitlines() if line[:5].strip()
                                                         .isdigit()]) == 4  # one table row per head
    grid = tmp_path / "grid.png"
    assert main(["attention", runs["tf"], "--all", "--out", str(grid)]) == 0  # the run's prompt, every head
    assert grid.stat().st_size > 5000


def test_neighbors_command_prints_tables_and_clusters(runs, capsys):
    assert main(["neighbors", runs["tf"], "--tokens", "7,1", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "input embedding" in out and "output embedding" in out  # untied
    assert out.count("\n   1  ") == 2 and out.count("\n   3  ") == 2
    assert main(["neighbors", runs["tf"], "--clusters", "3", "--top", "4"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("cluster ") for line in out.splitlines()) == 3
    assert main(["neighbors", runs["lstm"], "--clusters", "2", "--text", "1 2 3 4 5 6"]) == 0
    out = capsys.readouterr().out
    assert "LSTM output" in out and sum(line.startswith("cluster ") for line in out.splitlines()) == 2


BAD = {
    "layer out of range": ["attention", "{tf}", "--layer", "2"],
    "negative layer": ["attention", "{tf}", "--layer", "-1"],
    "head out of range": ["attention", "{tf}", "--heads", "0-2"],
    "bad heads spec": ["attention", "{tf}", "--heads", "first"],
    "empty prompt": ["attention", "{tf}", "--prompt", ""],
    "prompt longer than block_size": ["attention", "{tf}", "--prompt", " ".join(str(i) for i in range(40))],
    "not a transformer": ["attention", "{lstm}"],
    "figure format": ["attention", "{tf}", "--out", "{tmp}/a.txt"],
    "figure directory missing": ["attention", "{tf}", "--out", "{tmp}/nodir/a.png"],
    "not a run (attention)": ["attention", "{tmp}"],
    "token not in the vocabulary": ["neighbors", "{tf}", "--tokens", "Lily"],
    "empty token": ["neighbors", "{tf}", "--tokens", "7,,1"],
    "k < 1": ["neighbors", "{tf}", "--tokens", "7", "--k", "0"],
    "nothing asked": ["neighbors", "{tf}"],
    "text without clusters": ["neighbors", "{tf}", "--text", "1 2 3"],
    "more clusters than positions": ["neighbors", "{tf}", "--clusters", "9", "--text", "1 2"],
    "eval json directory missing": ["eval", "{tf}", "--json", "{tmp}/nodir/e.json"],
    "eval missing input file": ["eval", "{tf}", "--input_files", "{tmp}/nope.txt"],
    "eval no input files": ["eval", "{tf}", "--input_files"],
    "eval batches < 1": ["eval", "{tf}", "--eval_batches", "0"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, runs, tmp_path, capsys):
    args = [a.format(tf=runs["tf"], lstm=runs["lstm"], tmp=tmp_path) for a in BAD[case]]
    before = sorted(os.listdir(runs["tf"]))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(os.listdir(runs["tf"])) == before


def test_eval_json_has_the_documented_figures(runs, tmp_path, capsys):
    js = tmp_path / "e.json"
    tcfg = runs["tcfg"]
    assert main(["eval", runs["tf"], "--json", str(js), "--batch_size", str(tcfg.batch_size),
                 "--eval_batches", str(tcfg.eval_batches)]) == 0
    d = json.loads(js.read_text())
    assert set(d) == {"run", "model", "test_loss", "perplexity", "bits_per_byte", "continuation_accuracy"}
    assert d["test_loss"] == pytest.approx(runs["summary"]["test_loss"], rel=1e-5)  # the same split and windows
    assert d["perplexity"] == pytest.approx(math.exp(d["test_loss"]))
    assert d["bits_per_byte"] == pytest.approx(runs["summary"]["bits_per_byte"], rel=1e-5)
    assert 0.0 <= d["continuation_accuracy"] <= 1.0
    assert "perplexity" in capsys.readouterr().out
    text = tmp_path / "words.txt"
    text.write_text("hello there\nsome words\n")
    assert main(["eval", runs["tf"], "--input_files", str(text), "--json", str(js)]) == 0
    d = json.loads(js.read_text())
    assert "continuation_accuracy" not in d and d["test_loss"] > 0  # not numeric data
    nums = tmp_path / "nums.txt"
    nums.write_text("\n".join(" ".join(str(i + j) for j in range(20)) for i in range(5)) + "\n")
    assert main(["eval", runs["tf"], "--input_files", str(nums), "--json", str(js)]) == 0
    assert 0.0 <= json.loads(js.read_text())["continuation_accuracy"] <= 1.0
    assert ckpt.is_run(runs["tf"])
