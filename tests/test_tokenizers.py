"""Tokenizers: byte, bpe (HF tokenizers, cached) and gpt2 (tiktoken, or local GPT-2 files). No network."""

import json

import numpy as np
import pytest
import torch

from picollm.data import tokenizers as tk
from picollm.data.sources import generate_numbers
from picollm.data.stories import story_texts
from picollm.data.tokenizers import build_tokenizer, load_tokenizer
from picollm.errors import PicoError

EOT = "<|endoftext|>"

SAMPLES = [
    "12 13 14",
    "0 1 2 3 4 5 6 7 8 9",
    "-3 -2 -1 0 1 2",
    "Once upon a time, there was a little dog named Tim.\nHe liked to play!",
    "  two leading spaces, two  inner, trailing \t\n\n",
    "héllo wörld — 日本語 🙂",
    "",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PICOLLM_GPT2_DIR", raising=False)


@pytest.fixture(scope="module")
def corpus():
    return generate_numbers(400, seed=1) + [
        "Once upon a time there was a little girl named Lily. She liked to play with her dog.",
        "The dog was happy. Lily and the dog played in the park all day.",
    ] * 20


def _roundtrip(tok, texts=SAMPLES):
    for s in texts:
        ids = tok.encode(s)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s, s
    assert tok.encode_batch(texts) == [tok.encode(s) for s in texts]


def _eot_decodes_as_marker(tok):
    ids = tok.encode("a") + [tok.eot_id] + tok.encode("b")
    assert tok.decode(ids) == "a<|endoftext|>b"


# --------------------------------------------------------------------------- byte


def test_byte(tmp_path):
    tok = build_tokenizer("byte")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    assert tok.encode("Hi é") == [72, 105, 32, 0xC3, 0xA9]
    _roundtrip(tok)
    _eot_decodes_as_marker(tok)
    assert tok.decode([0xC3]) == "\ufffd"  # a cut-off character decodes with a replacement mark
    assert tok.decode(torch.tensor([72, 105])) == tok.decode(np.array([72, 105])) == "Hi"
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"type": "byte"}
    assert load_tokenizer(tmp_path).encode("Hi é") == tok.encode("Hi é")


# --------------------------------------------------------------------------- bpe


def test_bpe_roundtrip_and_specials(corpus):
    tok = build_tokenizer("bpe", corpus, vocab_size=600)
    assert tok.name == "bpe" and tok.eot_id == 0
    assert 257 < tok.vocab_size <= 600
    _roundtrip(tok, SAMPLES + corpus[:50])
    _eot_decodes_as_marker(tok)
    assert len(tok.encode("0 1 2 3 4 5 6 7 8 9")) <= 10  # merges learned: fewer ids than bytes
    assert tok.encode(" Lily") == [tok.hf.token_to_id("ĠLily")]  # GPT-2 style: the space joins the word


def test_bpe_save_load(tmp_path, corpus):
    import tokenizers

    tok = build_tokenizer("bpe", corpus, vocab_size=500)
    tok.save(tmp_path)
    path = tmp_path / "tokenizer.json"
    hf = tokenizers.Tokenizer.from_file(str(path))  # the plain HF format, loadable elsewhere
    loaded = load_tokenizer(tmp_path)
    assert (loaded.name, loaded.vocab_size, loaded.eot_id) == ("bpe", tok.vocab_size, tok.eot_id)
    for s in SAMPLES + corpus[:20]:
        assert loaded.encode(s) == tok.encode(s) == hf.encode(s, add_special_tokens=False).ids
    assert load_tokenizer(path).encode("12 13 14") == tok.encode("12 13 14")  # the file itself works too


def test_bpe_cache_hit_skips_training(tmp_path, corpus, monkeypatch):
    tok = build_tokenizer("bpe", corpus, vocab_size=500)
    cached = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    assert len(cached) == 1 and len(cached[0].stem) == 64
    assert not [p for p in cached[0].parent.iterdir() if p.suffix == ".tmp"]

    def no_training(*a, **k):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(tk, "_train_bpe", no_training)
    again = build_tokenizer("bpe", list(corpus), vocab_size=500)
    assert again.to_json() == tok.to_json()
    with pytest.raises(AssertionError, match="trained again"):  # other data or size: a new key
        build_tokenizer("bpe", corpus, vocab_size=501)
    with pytest.raises(AssertionError, match="trained again"):
        build_tokenizer("bpe", corpus[:-1], vocab_size=500)


def test_bpe_deterministic_and_corrupt_cache(tmp_path, corpus, monkeypatch):
    a = build_tokenizer("bpe", corpus, vocab_size=500)
    (entry,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    monkeypatch.setenv("PICOLLM_CACHE_DIR", str(tmp_path / "other_cache"))
    b = build_tokenizer("bpe", corpus, vocab_size=500)  # trained afresh
    assert a.to_json() == b.to_json()
    monkeypatch.setenv("PICOLLM_CACHE_DIR", str(tmp_path / "cache"))
    entry.write_text("{ damaged")
    c = build_tokenizer("bpe", corpus, vocab_size=500)  # retrains and repairs the entry
    assert c.to_json() == a.to_json() and entry.read_text() == a.to_json()


def test_bpe_errors():
    with pytest.raises(PicoError, match="training text"):
        build_tokenizer("bpe", [])
    with pytest.raises(PicoError, match="vocab_size"):
        build_tokenizer("bpe", ["abc"], vocab_size=100)
    with pytest.raises(PicoError, match="unknown tokenizer"):
        build_tokenizer("wordpiece")


# --------------------------------------------------------------------------- encode_documents


def _per_text(tok, texts):
    """What encode_documents must give, from encode(): each text's ids, then end-of-text."""
    return [i for t in texts for i in tok.encode(t) + [tok.eot_id]], [len(tok.encode(t)) for t in texts]


def _same(got, want):
    return np.array_equal(got[0], np.asarray(want[0])) and np.array_equal(got[1], np.asarray(want[1]))


def test_byte_encode_documents():
    tok = build_tokenizer("byte")
    texts = ["Hi é", "", "x\0y"]  # a NUL byte in a text stays a byte, never an end-of-text
    tokens, lengths = tok.encode_documents(texts)
    assert tokens.dtype == np.uint32 and lengths.dtype == np.int64
    assert _same((tokens, lengths), _per_text(tok, texts))
    assert tokens.tolist() == [72, 105, 32, 0xC3, 0xA9, 256, 256, 120, 0, 121, 256]


TRICKY = SAMPLES + [
    "it's they're we've I'm you'll he'd 'quoted' DON'T",
    "tabs\tand\u00a0no-break\u2003em space\u3000ideographic\n\r\n  \n",
    "numbers 1234567 3.14159 -42 \u2167 \u0661\u0662\u0663 1,000,000",
    f"a literal {EOT} inside, and {EOT}{EOT} twice",
    EOT,
    "     ",
    "emoji \U0001f469\u200d\U0001f469\u200d\U0001f467 flags \U0001f1eb\U0001f1f7, combining e\u0301",
]


@pytest.fixture(scope="module")
def mixed():
    """English-like stories, numeric sequences, and text that exercises GPT-2's regex and the specials."""
    return story_texts(300, seed=3) + generate_numbers(300, seed=2) + TRICKY * 3


def test_bpe_fast_encoder_gives_hf_ids(mixed):
    """encode_documents (data preparation's encoder) runs tiktoken with the bpe's own ranks and gives exactly
    HF's ids, on text it was not trained on as well; a literal <|endoftext|> in a text is the special id,
    as HF's added-token rule makes it."""
    tok = build_tokenizer("bpe", mixed[::2], vocab_size=1500)
    got = tok.encode_documents(mixed)
    assert tok.encoder == "tiktoken" and tok.encoder_why == "spot-checked"
    assert _same(got, tok.encode_documents_hf(mixed))
    assert _same(got, _per_text(tok, mixed))
    assert tok.encode(TRICKY[-4]).count(tok.eot_id) == 3
    enc = tok._fast_encoding()
    for threads in (1, 3, 8):  # however the texts are cut among threads
        assert _same(tk.tiktoken_documents(enc, mixed, tok.eot_id, True, threads=threads), got)


def test_bpe_fast_encoder_falls_back_when_a_spot_check_differs(mixed, monkeypatch):
    tok = build_tokenizer("bpe", mixed, vocab_size=800)
    real = tk.tiktoken_documents

    def off_by_one(*a, **k):
        tokens, lengths = real(*a, **k)
        tokens = tokens.copy()
        tokens[5] = (tokens[5] + 1) % tok.vocab_size
        return tokens, lengths

    monkeypatch.setattr(tk, "tiktoken_documents", off_by_one)
    assert _same(tok.encode_documents(mixed), tok.encode_documents_hf(mixed))
    assert tok.encoder == "hf" and "differed" in tok.encoder_why
    assert _same(tok.encode_documents(mixed[:5]), _per_text(tok, mixed[:5]))  # and stays on HF


def _hand_bpe(merges):
    """A byte-level BPE built from a merge list (as a hand-edited tokenizer.json could hold)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {EOT: 0, **{c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = HF(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    return tk.BPETokenizer(hf)


def test_tiktoken_is_used_only_where_it_gives_hf_ids():
    """tiktoken merges the pair whose concatenation has the lowest id, HF the pair of lowest merge index:
    with merges b+c, a+b, ab+c, HF encodes "abc" as a|bc and tiktoken's rule as abc. Such a tokenizer is
    refused (HF encodes it); one whose merges rank order rebuilds is taken."""
    import tiktoken

    odd = _hand_bpe([("b", "c"), ("a", "b"), ("ab", "c")])
    assert [odd.hf.id_to_token(i) for i in odd.encode("abc")] == ["a", "bc"]
    ranks = {bytes(tk.byte_alphabet()[c] for c in t): i for t, i in odd.hf.get_vocab().items() if t != EOT}
    naive = tiktoken.Encoding("naive", pat_str=tk.TIKTOKEN_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 0})
    assert naive.encode_ordinary("abc") != odd.encode("abc")  # what an unchecked conversion would get wrong
    enc, why = tk.tiktoken_for(odd.hf)
    assert enc is None and "'ab' + 'c'" in why
    texts = ["abc", "xabcx abc", "bc ab"]
    assert _same(odd.encode_documents(texts), _per_text(odd, texts)) and odd.encoder == "hf"

    fine = _hand_bpe([("a", "b"), ("ab", "c"), ("Ġ", "abc")])
    assert tk.tiktoken_for(fine.hf)[0] is not None
    assert _same(fine.encode_documents(texts), _per_text(fine, texts)) and fine.encoder == "tiktoken"


def test_byte_alphabet_is_hf_byte_level():
    from tokenizers import pre_tokenizers

    alphabet = tk.byte_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert alphabet["Ġ"] == ord(" ") and alphabet["!"] == ord("!") and alphabet["Ċ"] == ord("\n")


# --------------------------------------------------------------------------- gpt2


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table (the encoder.json alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    order, chars, n = list(keep), [chr(b) for b in keep], 0
    for b in range(256):
        if b not in keep:
            order.append(b)
            chars.append(chr(256 + n))
            n += 1
    return order, chars  # order[i] is the byte with id i, chars[i] its character


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("1", "2")]


@pytest.fixture
def gpt2_dir(tmp_path):
    """A tiny GPT-2 vocabulary in the original file formats: 256 byte tokens, 7 merges, <|endoftext|>."""
    d = tmp_path / "gpt2"
    d.mkdir()
    _, chars = _bytes_to_unicode()
    encoder = {c: i for i, c in enumerate(chars)}
    for a, b in MERGES:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (d / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    return d


def test_gpt2_from_local_files(gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOLLM_GPT2_DIR", str(gpt2_dir))
    tok = build_tokenizer("gpt2")
    assert (tok.name, tok.eot_id, tok.vocab_size) == ("gpt2", 263, 264)
    order, _ = _bytes_to_unicode()
    assert tok.encode("A") == [order.index(ord("A"))]
    assert tok.encode(" the cat") == [258, 261]  # "Ġthe", "Ġcat": the merges apply
    assert tok.encode("12") == [262]
    _roundtrip(tok)
    _eot_decodes_as_marker(tok)
    assert tok.encode("<|endoftext|>") != [tok.eot_id]  # encode adds (and parses) no specials

    run = tmp_path / "run"
    tok.save(run)
    saved = json.loads((run / "tokenizer.json").read_text())
    assert saved == {"type": "gpt2", "local_dir": str(gpt2_dir.resolve())}
    monkeypatch.delenv("PICOLLM_GPT2_DIR")
    loaded = load_tokenizer(run)  # the run directory alone is enough
    assert loaded.encode(" the cat 12") == tok.encode(" the cat 12")


def test_gpt2_local_file_errors(gpt2_dir):
    (gpt2_dir / "vocab.bpe").unlink()
    with pytest.raises(PicoError, match="vocab.bpe"):
        tk.gpt2_tokenizer(gpt2_dir)
    (gpt2_dir / "vocab.bpe").write_text("#version: 0.2\nx y\n")  # merges the encoder does not know
    with pytest.raises(PicoError, match="not valid GPT-2 files"):
        tk.gpt2_tokenizer(gpt2_dir)


def test_gpt2_through_tiktoken(gpt2_dir, tmp_path, monkeypatch):
    import tiktoken

    enc = tk.gpt2_from_files(gpt2_dir)  # stands in for tiktoken's downloaded encoding
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc if name == "gpt2" else None)
    tok = build_tokenizer("gpt2")
    assert tok.encode_batch([" the cat", "12"]) == [[258, 261], [262]]
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"type": "gpt2"}
    assert load_tokenizer(tmp_path).encode(" the cat") == [258, 261]


def _offline_tiktoken(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Max retries exceeded: Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)


def test_gpt2_offline_one_line_error(monkeypatch):
    _offline_tiktoken(monkeypatch)
    with pytest.raises(PicoError) as e:
        build_tokenizer("gpt2")
    msg = str(e.value)
    assert "--tokenizer bpe" in msg and "TIKTOKEN_CACHE_DIR" in msg and "PICOLLM_GPT2_DIR" in msg
    assert "\n" not in msg


def test_gpt2_stalled_download_gives_up(monkeypatch):
    import threading

    import tiktoken

    release = threading.Event()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: release.wait(5))
    monkeypatch.setattr(tk, "_TIKTOKEN_DEADLINE_S", 0.05)
    try:
        with pytest.raises(PicoError, match="no answer.*--tokenizer bpe"):
            build_tokenizer("gpt2")
    finally:
        release.set()


def test_gpt2_saved_run_offline(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "gpt2"}))
    _offline_tiktoken(monkeypatch)
    with pytest.raises(PicoError, match="--tokenizer bpe"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- loading


def test_load_errors(tmp_path):
    with pytest.raises(PicoError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(PicoError, match="corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(PicoError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "nonsense"}}))
    with pytest.raises(PicoError, match="not a valid HF tokenizers file"):
        load_tokenizer(tmp_path)


def test_gpt2_encode_documents_keeps_a_literal_end_of_text_as_text(gpt2_dir):
    tok = tk.gpt2_tokenizer(gpt2_dir)
    texts = [f"the cat {EOT} 12", "", "12 12"]
    got = tok.encode_documents(texts)
    assert _same(got, _per_text(tok, texts))
    assert got[0].tolist().count(tok.eot_id) == 3  # only the three separators


def test_token_bytes_join_to_the_decoded_text(mixed, gpt2_dir, monkeypatch):
    """token_bytes (what the server streams token by token) joins to decode()'s text for every tokenizer,
    including characters split across tokens."""
    monkeypatch.setenv("PICOLLM_GPT2_DIR", str(gpt2_dir))
    for tok in (build_tokenizer("bpe", mixed[::2], vocab_size=800), build_tokenizer("byte"), build_tokenizer("gpt2")):
        for text in TRICKY + mixed[:20]:
            ids = tok.encode(text)
            assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", "replace") == tok.decode(ids), tok.name
        assert tok.token_bytes(tok.eot_id) == EOT.encode()
    bpe = build_tokenizer("bpe", mixed[::2], vocab_size=800)
    split = [i for i in range(bpe.vocab_size) if not _utf8_whole(bpe.token_bytes(i))]
    assert split  # byte-level tokens that hold part of a character exist, and are not decodable alone


def _utf8_whole(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
