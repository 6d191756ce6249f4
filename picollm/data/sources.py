"""Where the text comes from: the built-in numeric corpus, the user's text files, TinyStories.

Every source streams its documents (examples) as strings (`iter_text_files`, `iter_tinystories`), so a
corpus larger than memory passes through once; `read_text_files` and `load_tinystories` are the same
streams as lists. Splitting, tokenizing and batching happen later (prepare.py). Every mistake a user can
cause (a missing file, bad bytes, no network) is a PicoError with one line that names the file or the
offline alternative.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import socket
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from ..config import EOT
from ..errors import PicoError

# --------------------------------------------------------------------------- numeric sequences

NUMBER_KINDS = ("counting", "arithmetic", "fibonacci", "powers_of_two", "squares", "constant")
# Counting runs dominate: they are what a demo prompt like "0 1 2 3 4" asks the model to continue.
_KIND_WEIGHTS = (0.40, 0.20, 0.10, 0.10, 0.10, 0.10)
_MIN_LEN, _MAX_LEN = 8, 40
_MAX_ABS = 1_000_000  # growing kinds stop before reaching this


def _sequence(kind: str, rng: random.Random) -> list[int]:
    n = rng.randint(_MIN_LEN, _MAX_LEN)
    if kind == "counting":
        start = 0 if rng.random() < 0.2 else rng.randint(-20, 150)
        return list(range(start, start + n))
    if kind == "arithmetic":
        step = rng.choice([s for s in range(-10, 11) if s not in (0, 1)])  # 1 is counting, 0 constant
        start = rng.randint(-50, 100)
        return [start + i * step for i in range(n)]
    if kind == "fibonacci":
        seq = [rng.randint(0, 9), rng.randint(1, 9)]
        while len(seq) < n and seq[-1] + seq[-2] < _MAX_ABS:
            seq.append(seq[-1] + seq[-2])
        return seq
    if kind == "powers_of_two":
        e = rng.randint(0, 12)  # 2**19 < 1e6: at least 8 terms from any start
        return [2 ** k for k in range(e, min(e + n, 20))]
    if kind == "squares":
        start = rng.randint(0, 30)
        return [k * k for k in range(start, start + n)]
    if kind == "constant":
        return [rng.randint(-20, 99)] * n
    raise ValueError(f"unknown kind {kind!r}")


def generate_numbers_with_kinds(count: int = 3333, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, sequence) pairs; see generate_numbers."""
    rng = random.Random(seed)
    kinds = rng.choices(NUMBER_KINDS, weights=_KIND_WEIGHTS, k=count)
    return [(kind, " ".join(map(str, _sequence(kind, rng)))) for kind in kinds]


def generate_numbers(count: int = 3333, seed: int = 0) -> list[str]:
    """The built-in "3seqs"-style corpus: `count` sequences of 8..40 space-separated integers
    (counting runs, arithmetic progressions, Fibonacci-like, powers of two, squares, constant runs),
    the same list for the same seed. Numbers stay below 1e6 in magnitude and are mostly small."""
    return [text for _, text in generate_numbers_with_kinds(count, seed)]


def is_numeric_text(doc: str) -> bool:
    """A document of whitespace-separated integers, like the numeric corpus ("3seqs")."""
    parts = doc.split()
    return bool(parts) and all(p.lstrip("-").isdigit() for p in parts)


# --------------------------------------------------------------------------- the user's text files

_NEWLINE = re.compile(r"\r\n?")


def check_text_file(path: Union[str, Path]) -> Path:
    """The path of a readable text file, or the PicoError that says why not."""
    p = Path(path)
    if not p.exists():
        raise PicoError(f"input file not found: {p}")
    if p.is_dir():
        raise PicoError(f"{p} is a directory, not a text file (use --input_dir for a directory)")
    return p


def _read_utf8(path: Union[str, Path]) -> str:
    p = check_text_file(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PicoError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PicoError(f"{p} is not UTF-8 text (bad byte at offset {e.start})") from None
    return _NEWLINE.sub("\n", text)  # universal newlines, as open(path) in text mode reads


def _utf8_lines(p: Path) -> Iterator[str]:
    """The lines of a file without their line breaks (\\n, \\r\\n or \\r, as text mode reads them), streamed;
    a leading BOM dropped. Bad UTF-8 is a PicoError naming the byte offset."""
    offset, pending = 0, ""  # pending: the text after the last line break (non-empty only at the end)
    try:
        with open(p, "rb") as f:
            for raw in f:
                try:
                    text = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
                except UnicodeDecodeError as e:
                    raise PicoError(f"{p} is not UTF-8 text (bad byte at offset {offset + e.start})") from None
                offset += len(raw)
                *done, pending = _NEWLINE.sub("\n", pending + text).split("\n")
                yield from done
    except OSError as e:
        raise PicoError(f"cannot read {p}: {e.strerror or e}") from None
    if pending:
        yield pending


def iter_text_files(paths: Union[str, Path, Iterable[Union[str, Path]]], mode: str = "lines",
                    limit: Optional[int] = None) -> Iterator[str]:
    """Examples from text files, streamed. mode "lines": one example per non-empty line (the newline
    removed, other whitespace kept), as the course starter read them; mode "documents": one example
    per file, its whole contents. `limit`: the first `limit` examples over all files. Every path is
    checked before the first example comes; a file with no example is an error."""
    if mode not in ("lines", "documents"):
        raise PicoError(f"unknown input mode {mode!r}; choose one of: lines, documents")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise PicoError("no input files given")
    for p in paths:  # every path is checked up front, even those a limit would leave unread
        if not Path(p).exists():
            raise PicoError(f"input file not found: {p}")
    n = 0
    for p in paths:
        if limit is not None and n >= limit:
            return
        found = 0
        if mode == "documents":
            text = _read_utf8(p)
            docs: Iterable[str] = [text] if text.strip() else []
        else:
            docs = (line for line in _utf8_lines(check_text_file(p)) if line.strip())
        for doc in docs:
            found += 1
            n += 1
            yield doc
            if limit is not None and n >= limit:
                return
        if not found:
            raise PicoError(f"{p} is empty (no non-empty lines)")


def read_text_files(paths: Union[str, Path, Iterable[Union[str, Path]]], mode: str = "lines",
                    limit: Optional[int] = None) -> list[str]:
    """iter_text_files as a list."""
    return list(iter_text_files(paths, mode, limit))


def find_text_files(input_dir: Union[str, Path]) -> list[str]:
    """Every *.txt file under input_dir, recursively, sorted."""
    d = Path(input_dir)
    if not d.is_dir():
        raise PicoError(f"input directory not found: {d}")
    files = sorted(str(p) for p in d.rglob("*.txt") if p.is_file())
    if not files:
        raise PicoError(f"no .txt files under {d}")
    return files


# --------------------------------------------------------------------------- TinyStories

TINYSTORIES_HUB = "roneneldan/TinyStories"
_OFFLINE_HINT = ("give a local copy with --tinystories_path FILE "
                 "(.txt with <|endoftext|> separators, .parquet or .jsonl with a text column)")


def _split_eot_stream(f, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Stories from a text stream separated by <|endoftext|>, without reading it all at once."""
    buf = ""
    while True:
        chunk = f.read(chunk_chars)
        if not chunk:
            break
        buf += chunk
        *done, buf = buf.split(EOT)
        yield from done
    yield buf


def _stories_txt(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from _split_eot_stream(f)
    except UnicodeDecodeError:
        raise PicoError(f"{path} is not UTF-8 text") from None


def _stories_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise PicoError(f"{path} is not a readable parquet file ({type(e).__name__})") from None
    if "text" not in pf.schema_arrow.names:
        raise PicoError(f"{path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _stories_jsonl(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise PicoError(f"{path}:{lineno}: not a JSON object") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise PicoError(f"{path}:{lineno}: expected an object with a string 'text' field")
                yield row["text"]
    except UnicodeDecodeError:
        raise PicoError(f"{path} is not UTF-8 text") from None


_READERS = {".txt": _stories_txt, ".parquet": _stories_parquet, ".jsonl": _stories_jsonl}


def _take_stories(stories: Iterable[str], subset: Optional[int], where: str) -> Iterator[str]:
    """The first `subset` stories (None: all), whitespace-stripped, empty ones dropped; none is an error."""
    cleaned = (t for t in (s.strip() for s in stories) if t)
    n = 0
    for story in itertools.islice(cleaned, subset):
        n += 1
        yield story
    if not n:
        raise PicoError(f"no stories in {where}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that a machine without network fails in seconds rather than after
    the hub client's retries (about half a minute). With a proxy configured we cannot tell: yes."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = re.sub(r"^\w+://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    host, _, port = host.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub_dataset(split: str):
    import datasets

    if _hub_reachable():
        return datasets.load_dataset(TINYSTORIES_HUB, split=split)
    # No network: ask datasets for its offline mode, so a cached copy loads at once and a missing
    # one fails at once. The flags are read at import time, hence the module attributes.
    import huggingface_hub.constants as hub_constants

    flags = [(m, "HF_HUB_OFFLINE") for m in (datasets.config, hub_constants) if hasattr(m, "HF_HUB_OFFLINE")]
    saved = [getattr(m, a) for m, a in flags]
    try:
        for m, a in flags:
            setattr(m, a, True)
        return datasets.load_dataset(TINYSTORIES_HUB, split=split)
    finally:
        for (m, a), v in zip(flags, saved):
            setattr(m, a, v)


def tinystories_file(path: str, flag: str = "--tinystories_path") -> Path:
    """A local TinyStories copy checked: it exists, is a file, and is .txt, .parquet or .jsonl."""
    p = Path(path)
    if not p.exists():
        raise PicoError(f"TinyStories file not found: {p}")
    if p.is_dir():
        raise PicoError(f"{flag} {p} is a directory; give a .txt, .parquet or .jsonl file")
    if p.suffix.lower() not in _READERS:
        raise PicoError(f"{flag} {p}: unsupported file type {p.suffix or '(none)'!r}; "
                        "use .txt (<|endoftext|> separators), .parquet or .jsonl")
    return p


def hub_split(split: str):
    """A split of TinyStories on the Hugging Face hub (a `datasets.Dataset`; a cached copy works offline)."""
    try:
        return _load_hub_dataset(split)
    except Exception as e:  # offline, hub errors, a missing split: all end the same way
        raise PicoError(f"could not load {TINYSTORIES_HUB} (split {split!r}) from the Hugging Face hub "
                        f"({type(e).__name__}); offline, {_OFFLINE_HINT}") from None


def _hub_texts(ds) -> Iterator[str]:
    try:
        for row in ds:
            yield row["text"]
    except (KeyError, TypeError):
        raise PicoError(f"{TINYSTORIES_HUB} rows have no 'text' field") from None


def iter_tinystories(path: Optional[str] = None, subset: Optional[int] = 20000, split: str = "train",
                     flag: str = "--tinystories_path", dataset=None) -> Iterator[str]:
    """The first `subset` TinyStories (None: all), whitespace-stripped, empty ones dropped, streamed. The
    file (or the hub split) is checked now; its stories are read as they are consumed.

    path: a local copy, one of: .txt with <|endoftext|> between stories (the release's
    TinyStories-train.txt), .parquet with a `text` column (the hub's files), .jsonl with one
    {"text": ...} object per line. Without a path: `split` of the Hugging Face hub through `datasets`
    (a cached copy works offline), or `dataset` when the caller has loaded it (hub_split)."""
    if subset is not None and subset < 1:
        raise PicoError(f"--tinystories_subset must be >= 1, got {subset}")
    if path is not None:
        p = tinystories_file(path, flag)
        return _take_stories(_READERS[p.suffix.lower()](p), subset, str(p))
    ds = hub_split(split) if dataset is None else dataset
    return _take_stories(_hub_texts(ds), subset, f"{TINYSTORIES_HUB} split {split!r}")


def load_tinystories(path: Optional[str] = None, subset: Optional[int] = 20000, split: str = "train") -> list[str]:
    """iter_tinystories as a list."""
    return list(iter_tinystories(path, subset, split))
