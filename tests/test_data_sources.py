"""Data sources: the numeric corpus, the user's text files, TinyStories in its real file formats."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picollm.data import sources
from picollm.data.sources import (
    NUMBER_KINDS,
    find_text_files,
    generate_numbers,
    generate_numbers_with_kinds,
    load_tinystories,
    read_text_files,
)
from picollm.errors import PicoError

# --------------------------------------------------------------------------- numbers


def test_numbers_deterministic_per_seed():
    assert generate_numbers(200, seed=3) == generate_numbers(200, seed=3)
    assert generate_numbers(200, seed=3) != generate_numbers(200, seed=4)
    assert len(generate_numbers(57)) == 57


def _follows_rule(kind, xs):
    d = [b - a for a, b in zip(xs, xs[1:])]
    if kind == "counting":
        return set(d) == {1}
    if kind == "arithmetic":
        return len(set(d)) == 1 and d[0] not in (0, 1)
    if kind == "fibonacci":
        return all(c == a + b for a, b, c in zip(xs, xs[1:], xs[2:]))
    if kind == "powers_of_two":
        return all(x > 0 and x & (x - 1) == 0 for x in xs) and all(b == 2 * a for a, b in zip(xs, xs[1:]))
    if kind == "squares":
        roots = [round(x ** 0.5) for x in xs]
        return all(r * r == x for r, x in zip(roots, xs)) and set(b - a for a, b in zip(roots, roots[1:])) == {1}
    if kind == "constant":
        return set(d) == {0}
    raise AssertionError(kind)


def test_numbers_kinds_rules_and_shape():
    pairs = generate_numbers_with_kinds(2000, seed=0)
    assert [t for _, t in pairs] == generate_numbers(2000, seed=0)
    counts = {k: sum(kind == k for kind, _ in pairs) for k in NUMBER_KINDS}
    assert all(counts[k] > 0 for k in NUMBER_KINDS), counts
    assert counts["counting"] == max(counts.values())  # the demo's prompt is a counting run
    for kind, text in pairs:
        assert text == text.strip() and "  " not in text
        xs = [int(tok) for tok in text.split(" ")]  # every token is an integer
        assert 2 <= len(xs) <= 40 and all(abs(x) < 1_000_000 for x in xs)
        assert _follows_rule(kind, xs), (kind, text)
    texts = [t for _, t in pairs]
    assert any(t.startswith("0 1 2 3 4 5 6 7 8 9") for t in texts)
    assert any(t.startswith("-") for t in texts) and any(" -" in t for t in texts)
    assert sum(len(t.split()) >= 8 for t in texts) > 0.9 * len(texts)


# --------------------------------------------------------------------------- text files


@pytest.fixture
def files(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("0 1 2 3\n\n  \n4 5 6\r\nlast line without newline", encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("héllo wörld\nsecond\n", encoding="utf-8")
    return a, b


def test_read_lines_and_documents(files):
    a, b = files
    assert read_text_files([a, b]) == ["0 1 2 3", "4 5 6", "last line without newline", "héllo wörld", "second"]
    assert read_text_files(str(b), mode="documents") == ["héllo wörld\nsecond\n"]
    assert read_text_files([a, b], mode="documents") == [a.read_text(encoding="utf-8"), b.read_text(encoding="utf-8")]


def test_read_limit(files):
    a, b = files
    assert read_text_files([a, b], limit=2) == ["0 1 2 3", "4 5 6"]
    assert read_text_files([a, b], limit=4) == ["0 1 2 3", "4 5 6", "last line without newline", "héllo wörld"]
    assert read_text_files([a, b], mode="documents", limit=1) == [a.read_text(encoding="utf-8")]


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
def test_read_empty_file(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_bytes(content)
    for mode in ("lines", "documents"):
        with pytest.raises(PicoError, match="empty.txt"):
            read_text_files([p], mode=mode)


def test_read_errors(tmp_path, files):
    with pytest.raises(PicoError, match="nope.txt"):
        read_text_files([files[0], tmp_path / "nope.txt"], limit=1)  # checked even past the limit
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(PicoError, match="latin1.txt.*UTF-8"):
        read_text_files([bad])
    with pytest.raises(PicoError, match="directory"):
        read_text_files([tmp_path])
    with pytest.raises(PicoError, match="mode"):
        read_text_files([files[0]], mode="paragraphs")


def test_find_text_files(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for rel in ("b.txt", "a.txt", "sub/c.txt", "sub/deeper/d.txt", "sub/skip.md"):
        (tmp_path / rel).write_text("x\n")
    found = find_text_files(tmp_path)
    assert found == sorted(found)
    assert [p[len(str(tmp_path)) + 1:] for p in found] == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]
    with pytest.raises(PicoError, match="not found"):
        find_text_files(tmp_path / "missing")
    only_md = tmp_path / "only_md"
    only_md.mkdir()
    (only_md / "notes.md").write_text("x")
    with pytest.raises(PicoError, match="no .txt"):
        find_text_files(only_md)


# --------------------------------------------------------------------------- TinyStories

STORIES = [f"Once upon a time there was story number {i}.\nThe end." for i in range(7)]


def test_tinystories_txt(tmp_path):
    p = tmp_path / "TinyStories-valid.txt"
    p.write_text("\n<|endoftext|>\n".join(STORIES) + "\n<|endoftext|>\n\n", encoding="utf-8")
    assert load_tinystories(str(p), subset=None) == STORIES
    assert load_tinystories(str(p), subset=3) == STORIES[:3]


def test_tinystories_txt_streams_across_chunks():
    import io

    text = "<|endoftext|>".join(STORIES)
    assert list(sources._split_eot_stream(io.StringIO(text), chunk_chars=5)) == STORIES


def test_tinystories_parquet(tmp_path):
    p = tmp_path / "train-00000-of-00004.parquet"
    pq.write_table(pa.table({"text": STORIES, "id": list(range(len(STORIES)))}), p, row_group_size=3)
    assert load_tinystories(str(p), subset=None) == STORIES
    assert load_tinystories(str(p), subset=5) == STORIES[:5]
    q = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"story": STORIES}), q)
    with pytest.raises(PicoError, match="no 'text' column"):
        load_tinystories(str(q))
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(PicoError, match="junk.parquet"):
        load_tinystories(str(junk))


def test_tinystories_jsonl(tmp_path):
    p = tmp_path / "stories.jsonl"
    p.write_text("\n".join(json.dumps({"text": s, "source": "gpt-4"}) for s in STORIES) + "\n\n", encoding="utf-8")
    assert load_tinystories(str(p), subset=None) == STORIES
    assert load_tinystories(str(p), subset=2) == STORIES[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
    with pytest.raises(PicoError, match=r"bad.jsonl:2"):
        load_tinystories(str(bad))
    notext = tmp_path / "notext.jsonl"
    notext.write_text(json.dumps({"story": "x"}) + "\n")
    with pytest.raises(PicoError, match=r"notext.jsonl:1.*'text'"):
        load_tinystories(str(notext))


def test_tinystories_path_errors(tmp_path):
    with pytest.raises(PicoError, match="not found"):
        load_tinystories(str(tmp_path / "missing.txt"))
    csv = tmp_path / "stories.csv"
    csv.write_text("text\nx\n")
    with pytest.raises(PicoError, match="unsupported file type"):
        load_tinystories(str(csv))
    empty = tmp_path / "empty.txt"
    empty.write_text("<|endoftext|>\n  \n")
    with pytest.raises(PicoError, match="no stories"):
        load_tinystories(str(empty))


def _fake_datasets(monkeypatch, load):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", load)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: True)  # no real network probe


def test_tinystories_hub_offline_names_local_alternative(monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub\n(LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(PicoError) as e:
        load_tinystories(None)
    msg = str(e.value)
    assert "--tinystories_path" in msg and ".parquet" in msg and "\n" not in msg


def test_tinystories_hub_returns_texts(monkeypatch):
    calls = []

    def fake(name, split):
        calls.append((name, split))
        return [{"text": f"  {s}\n"} for s in STORIES] + [{"text": ""}]

    _fake_datasets(monkeypatch, fake)
    assert load_tinystories(subset=4, split="validation") == STORIES[:4]
    assert load_tinystories(subset=None) == STORIES
    assert calls == [("roneneldan/TinyStories", "validation"), ("roneneldan/TinyStories", "train")]


def test_tinystories_hub_unreachable_uses_offline_mode(monkeypatch):
    """Without network the hub client is put in offline mode (no half-minute of retries)."""
    import datasets

    seen = []

    def fake(name, split):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)
    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(PicoError, match="--tinystories_path"):
        load_tinystories()
    assert seen == [True] and datasets.config.HF_HUB_OFFLINE == before
