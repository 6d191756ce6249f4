"""The staged data pipeline, as llama2.c's: documents -> split -> tokenizer -> tokens -> prepared arrays.

1. Documents stream from every source (a SourcePlan: the numeric corpus, text files, TinyStories as .txt,
   .parquet, .jsonl or from the hub). No stage holds a list of all documents.
2. Split by a stable hash of each document's text (8 bytes of blake2b, salted with SPLIT_SALT): a document
   is a test document when hash / 2**64 < test_fraction, so it lands in the same split whatever else is in
   the corpus, for any --seed. Exact duplicates are dropped, remembered as a sorted array of digests
   (8 bytes per document). Two fallbacks keep tiny corpora usable: when no document hashes into the test
   split (and test_fraction > 0) the one with the smallest hash is the test split; a corpus of a single
   document trains on it. A source with an official test split (TinyStories' validation file, the hub's
   `validation`) uses it instead: every document of it is a test document and none of them is trained on.
3. The tokenizer: bpe is trained (HF tokenizers `train_from_iterator`) on a bounded sample of the training
   split: the first TOKENIZER_SAMPLE_BYTES of training text, shared equally among the sources (a source
   smaller than its share gives all of it, so small corpora train on all their training text). It is
   cached by what determines it (the sources' fingerprints, split, vocab_size, sample size), so a second
   run does not read the sample again. A run's own tokenizer is reused on resume and eval.
4. Tokenization: `Tokenizer.encode_documents` over chunks of CHUNK_CHARS characters, in this process, on
   every core: tiktoken's encoder with the bpe's own ranks, proven and spot-checked to give HF's ids
   (data/tokenizers.py), else HF's encode_batch; see `encode_chunks` for the measurements.
5. A prepared directory per (source, split) under cache_dir()/prepared/NAME-SPLIT-KEY/, where KEY hashes
   what determines it (the source's fingerprint, the split rule, the tokenizer's identity):
       tokens.bin   every document's ids followed by end-of-text; uint16 when the ids fit, else uint32
       starts.bin   int64, where each document starts in tokens.bin
       lengths.bin  int64, each document's number of ids (end-of-text excluded)
       bytes.bin    int64, each document's UTF-8 bytes
       manifest.json  what it was built from, the tokenizer, the split rule, counts, dtype
   read back as read-only np.memmap. It is written into prepared/.tmp-NAME-SPLIT-KEY-*/ and renamed when
   complete: a directory under its final name is always whole, so a killed prepare leaves nothing a later
   run trusts (its leftovers are removed by the next prepare). Every run, sweep point and DDP rank on the
   same data finds the same directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import tokenizers
from tqdm import tqdm

from ..errors import PicoError
from ..fsio import cache_dir, fsync_dir, write_json, write_text
from ..tables import md_table
from .batches import TokenSplit, document_starts, token_dtype
from .sources import is_numeric_text
from .tokenizers import BPETokenizer, Tokenizer, build_tokenizer, tokenizer_from_json

FORMAT = 1  # of a prepared directory; part of every key
SPLIT_SALT = b"picollm-split-v1"  # blake2b's `person` (16 bytes): changing it re-splits every corpus
TOKENIZER_SAMPLE_BYTES = 20_000_000  # text a bpe tokenizer is trained on, at most (about 20k TinyStories)
CHUNK_CHARS = 1 << 20  # documents are split, tokenized and written this many characters at a time
FULL_HASH_BYTES = 32 << 20  # files up to this size are fingerprinted by their whole content
EDGE_BYTES = 1 << 20  # larger ones by path, size, mtime and a hash of their first and last MB
ARRAYS = {"starts": np.int64, "lengths": np.int64, "bytes": np.int64}  # beside tokens.bin
SPLITS = ("train", "test")
# Test hook: once a prepare has written its first chunk of tokens, touch this path and pause (for up to
# PAUSE_S seconds) with the directory half written, so a test can kill the process there.
PAUSE_ENV, PAUSE_S = "PICOLLM_TEST_PAUSE_IN_PREPARE", 120.0


def prepared_root() -> Path:
    return cache_dir() / "prepared"


# --------------------------------------------------------------------------- what determines the data


def file_fingerprint(path: str) -> dict:
    """What a file's content is known by: its whole content's hash when small, else its absolute path,
    size, mtime and a hash of its first and last EDGE_BYTES (a changed file changes one of them)."""
    p = Path(path)
    try:
        st = p.stat()
        h = hashlib.blake2b(digest_size=16)
        with open(p, "rb") as f:
            if st.st_size <= FULL_HASH_BYTES:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                return {"size": st.st_size, "content": h.hexdigest()}
            h.update(f.read(EDGE_BYTES))
            f.seek(st.st_size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    except OSError as e:
        raise PicoError(f"cannot read {p}: {e.strerror or e}") from None
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": h.hexdigest()}


def texts_fingerprint(texts: Iterable[str]) -> str:
    """A hash of a sequence of texts (length-prefixed: ["ab", "c"] differs from ["a", "bc"])."""
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@dataclass
class SourcePlan:
    """A source before it is read: its name and mixing weight, what determines its documents, and how to
    stream them (a fresh iterator per call). `test`: its official test split, when it has one."""

    name: str
    weight: float
    fingerprint: dict
    docs: Callable[[], Iterator[str]]
    size: Optional[int] = None  # bytes of input, for the progress bar
    test: Optional["SourcePlan"] = None


def split_rule(plan: SourcePlan, test_fraction: float) -> dict:
    if plan.test is not None:
        return {"kind": "official", "test": plan.test.fingerprint}
    return {"kind": "hash", "test_fraction": test_fraction, "salt": SPLIT_SALT.decode()}


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def split_dir_name(plan: SourcePlan, split: str, rule: dict, tokenizer: Tokenizer) -> str:
    return f"{plan.name}-{split}-" + _key({"format": FORMAT, "source": plan.fingerprint, "split": split,
                                           "rule": rule, "tokenizer": tokenizer.identity})


# --------------------------------------------------------------------------- the split


def digests(data: Sequence[bytes]) -> np.ndarray:
    """(n,) uint64: the split hash of each document's UTF-8 bytes."""
    return np.frombuffer(b"".join(hashlib.blake2b(b, digest_size=8, person=SPLIT_SALT).digest() for b in data),
                         dtype="<u8").astype(np.uint64)


class DigestSet:
    """A set of 64-bit digests as one sorted array: 8 bytes a document."""

    def __init__(self):
        self.sorted = np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return len(self.sorted)

    def contains(self, d: np.ndarray) -> np.ndarray:
        if not len(self.sorted):
            return np.zeros(len(d), bool)
        pos = np.minimum(np.searchsorted(self.sorted, d), len(self.sorted) - 1)
        return self.sorted[pos] == d

    def add_new(self, d: np.ndarray) -> np.ndarray:
        """Adds d; returns the mask of its entries seen for the first time (first occurrences only)."""
        fresh = np.zeros(len(d), bool)
        fresh[np.unique(d, return_index=True)[1]] = True
        fresh &= ~self.contains(d)
        new = np.sort(d[fresh])
        self.sorted = np.insert(self.sorted, np.searchsorted(self.sorted, new), new)
        return fresh


@dataclass
class Assignment:
    """Which split a digest belongs to: test below the threshold (test_fraction * 2**64), or all test (an
    official test split), or none (a training split with its official test split excluded); `force_test`: the
    fallback's digest, held out when the hash put nothing in the test split."""

    threshold: int = 0
    all_test: bool = False
    exclude: Optional[DigestSet] = None
    force_test: Optional[int] = None

    def is_test(self, d: np.ndarray) -> np.ndarray:
        test = np.full(len(d), True) if self.all_test else d < np.uint64(self.threshold)
        if self.force_test is not None:
            test |= d == np.uint64(self.force_test)
        return test


@dataclass
class Chunk:
    """Documents of one chunk that survived de-duplication, with their bytes and split."""

    docs: list[str]
    n_bytes: np.ndarray  # (n,) int64
    test: np.ndarray  # (n,) bool
    digests: np.ndarray  # (n,) uint64
    read_bytes: int  # bytes of the documents read, duplicates included (progress)

    def part(self, split: str) -> tuple[list[str], np.ndarray]:
        m = self.test if split == "test" else ~self.test
        return [d for d, keep in zip(self.docs, m) if keep], self.n_bytes[m]


@dataclass
class PassStats:
    unique: int = 0
    duplicates: int = 0
    excluded: int = 0  # training documents dropped because the official test split has them
    n_test: int = 0
    min_digest: Optional[int] = None


def _text_chunks(stream: Iterator[str]) -> Iterator[list[str]]:
    chunk, n = [], 0
    for doc in stream:
        chunk.append(doc)
        n += len(doc)
        if n >= CHUNK_CHARS:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def split_chunks(stream: Iterator[str], assign: Assignment, stats: PassStats) -> Iterator[Chunk]:
    """One pass over a stream of documents: de-duplicated, each assigned its split; counts in stats."""
    seen = DigestSet()
    for docs in _text_chunks(stream):
        data = [d.encode("utf-8") for d in docs]
        d = digests(data)
        n_bytes = np.fromiter(map(len, data), np.int64, len(data))
        keep = seen.add_new(d)
        stats.duplicates += int((~keep).sum())
        if assign.exclude is not None:
            official = assign.exclude.contains(d) & keep
            stats.excluded += int(official.sum())
            keep &= ~official
        test = assign.is_test(d[keep])
        stats.unique += int(keep.sum())
        stats.n_test += int(test.sum())
        if keep.any():
            low = int(d[keep].min())
            stats.min_digest = low if stats.min_digest is None else min(stats.min_digest, low)
        yield Chunk([x for x, k in zip(docs, keep) if k], n_bytes[keep], test, d[keep], int(n_bytes.sum()))


def fallback(assign: Assignment, stats: PassStats, test_fraction: float, name: str) -> Optional[Assignment]:
    """The assignment to redo a finished pass with, when it left a split empty that must not be; None
    when the pass stands. A corpus too small for test_fraction is a PicoError."""
    if assign.all_test or assign.exclude is not None or stats.unique == 0:
        return None
    if stats.unique == 1:  # one split or the other would be empty: no test loss, or nothing to train on
        raise PicoError(f"{name}: only 1 distinct document, too few for a train and a test split; give more "
                        "documents, or --input_mode lines (one example per non-empty line)")
    if stats.n_test == stats.unique:  # nothing to train on
        raise PicoError(f"{name}: only {stats.unique} distinct documents: too few for --test_fraction {test_fraction}")
    if test_fraction > 0 and stats.n_test == 0 and stats.unique >= 2 and assign.force_test is None:
        return Assignment(assign.threshold, force_test=stats.min_digest)
    return None


def hash_assignment(test_fraction: float) -> Assignment:
    return Assignment(threshold=min(int(test_fraction * 2.0 ** 64), 2 ** 64 - 1))


def official_digests(plan: SourcePlan) -> DigestSet:
    """The digests of a source's official test split (one pass over it, hashing only)."""
    seen = DigestSet()
    for docs in _text_chunks(plan.test.docs()):
        seen.add_new(digests([d.encode("utf-8") for d in docs]))
    return seen


def split_documents(docs: Sequence[str], test_fraction: float) -> tuple[list[str], list[str]]:
    """(train, test) of a list of documents by the pipeline's hash split, duplicates dropped."""
    assign = hash_assignment(test_fraction)
    while True:
        stats = PassStats()
        chunks = list(split_chunks(iter(docs), assign, stats))
        redo = fallback(assign, stats, test_fraction, "the corpus")
        if redo is None:
            return [d for c in chunks for d in c.part("train")[0]], [d for c in chunks for d in c.part("test")[0]]
        assign = redo


# --------------------------------------------------------------------------- the tokenizer


def training_sample(plans: list[SourcePlan], test_fraction: float, budget: int = TOKENIZER_SAMPLE_BYTES) -> list[str]:
    """The first budget / len(plans) bytes of each source's training split (all of it when smaller)."""
    sample = []
    for plan in plans:
        share = budget // max(1, len(plans))
        assign = Assignment(exclude=official_digests(plan)) if plan.test is not None else hash_assignment(test_fraction)
        while True:
            got, n, stats, ended = [], 0, PassStats(), True
            for chunk in split_chunks(plan.docs(), assign, stats):
                for doc, nb in zip(*chunk.part("train")):
                    if n < share:
                        got.append(doc)
                        n += int(nb)
                if n >= share and (stats.n_test > 0 or test_fraction == 0 or plan.test is not None):
                    ended = False  # enough, and no fallback can apply any more
                    break
            redo = fallback(assign, stats, test_fraction, plan.name) if ended else None
            if redo is None:
                break
            assign = redo
        sample.extend(got)
    return sample


def corpus_tokenizer(name: str, vocab_size: int, plans: list[SourcePlan], test_fraction: float) -> Tokenizer:
    """The tokenizer of a corpus: byte or gpt2 as they are; bpe trained on training_sample, cached under
    prepared/tokenizers/ by what determines the sample (so a second run reads no text for it)."""
    if name != "bpe":
        return build_tokenizer(name)
    key = _key({"format": FORMAT, "tokenizer": "bpe", "vocab_size": vocab_size, "sample": TOKENIZER_SAMPLE_BYTES,
                "tokenizers": tokenizers.__version__,
                "sources": [[p.fingerprint, split_rule(p, test_fraction)] for p in plans]})
    path = prepared_root() / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            tok = tokenizer_from_json(path.read_text(encoding="utf-8"), str(path))
            if isinstance(tok, BPETokenizer):
                return tok
        except (PicoError, OSError, UnicodeDecodeError):
            pass  # a damaged entry: train again and overwrite it
    tok = build_tokenizer("bpe", training_sample(plans, test_fraction), vocab_size=vocab_size)
    try:
        write_text(path, tok.to_json())
    except OSError:
        pass  # an unwritable cache costs a retrain next time, nothing more
    return tok


# --------------------------------------------------------------------------- writing a prepared directory


def _pause_for_test() -> None:
    flag = os.environ.get(PAUSE_ENV)
    if flag and not os.path.exists(flag):
        Path(flag).touch()
        deadline = time.monotonic() + PAUSE_S
        while time.monotonic() < deadline:
            time.sleep(0.05)


class SplitWriter:
    """Appends documents' tokens to the arrays of a prepared directory being built in `tmp`."""

    def __init__(self, tmp: Path, tokenizer: Tokenizer):
        self.tmp, self.eot, self.dtype = tmp, tokenizer.eot_id, token_dtype(tokenizer.vocab_size)
        self.files = {name: open(tmp / f"{name}.bin", "wb") for name in ("tokens", *ARRAYS)}
        self.n_tokens = self.n_docs = self.n_bytes = 0
        self.numeric = True  # every document so far a numeric sequence

    def add(self, docs: list[str], tokens: np.ndarray, lengths: np.ndarray, n_bytes: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        arrays = {"starts": document_starts(lengths, self.n_tokens), "lengths": lengths, "bytes": n_bytes}
        self.files["tokens"].write(tokens.tobytes())
        for name, dtype in ARRAYS.items():
            self.files[name].write(np.asarray(arrays[name], dtype).tobytes())
        self.n_tokens += len(tokens)
        self.n_docs += len(docs)
        self.n_bytes += int(n_bytes.sum())
        self.numeric = self.numeric and all(map(is_numeric_text, docs))
        _pause_for_test()

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


def _owner_alive(tmp: Path) -> bool:
    """Whether the process that is building a temporary directory still runs (unknown: yes)."""
    try:
        owner = json.loads((tmp / "owner.json").read_text())
        if owner.get("host") != socket.gethostname():
            return True
        os.kill(int(owner["pid"]), 0)
        return True
    except ProcessLookupError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        return (time.time() - tmp.stat().st_mtime) < 86400 if tmp.exists() else False


def sweep_stale(root: Path) -> None:
    """Removes the temporary directories of prepares that were killed (their process is gone)."""
    for tmp in root.glob(".tmp-*"):
        if tmp.is_dir() and not _owner_alive(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _new_tmp(root: Path, name: str) -> Path:
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    write_json(str(tmp / "owner.json"), {"host": socket.gethostname(), "pid": os.getpid()})
    return tmp


def _commit(tmp: Path, final: Path, manifest: dict) -> None:
    """manifest.json last, then the rename that makes the directory visible under its name."""
    write_json(str(tmp / "manifest.json"), manifest)
    (tmp / "owner.json").unlink()
    fsync_dir(str(tmp))
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same directory first: keep its copy
        if not (final / "manifest.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(str(final.parent))


# --------------------------------------------------------------------------- reading one back


@dataclass
class PreparedSplit:
    split: TokenSplit
    manifest: dict
    reused: bool  # found in the cache (not built by this call)


def open_prepared(path: Path) -> Optional[PreparedSplit]:
    """A complete prepared directory as read-only memmaps; None when it is missing or does not match its
    manifest (sizes checked, so a damaged one is rebuilt rather than trusted)."""
    try:
        m = json.loads((path / "manifest.json").read_text())
        dtype = np.dtype(m["dtype"])
        sizes = {"tokens": m["n_tokens"] * dtype.itemsize, **{k: m["n_docs"] * 8 for k in ARRAYS}}
        if m.get("format") != FORMAT or any((path / f"{k}.bin").stat().st_size != v for k, v in sizes.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None

    def arr(name, dt, n):
        return np.memmap(path / f"{name}.bin", dtype=dt, mode="r", shape=(n,)) if n else np.zeros(0, dt)

    split = TokenSplit(arr("tokens", dtype, m["n_tokens"]), arr("starts", np.int64, m["n_docs"]),
                       arr("lengths", np.int64, m["n_docs"]), int(m["n_bytes"]), str(path))
    return PreparedSplit(split, m, reused=True)


class DocumentTexts(Sequence[str]):
    """A split's documents as text, decoded from its tokens when asked for (nothing held)."""

    def __init__(self, split: TokenSplit, tokenizer: Tokenizer):
        self.split, self.tokenizer = split, tokenizer

    def __len__(self) -> int:
        return self.split.n_docs

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.tokenizer.decode(self.split.doc(i % len(self)))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


# --------------------------------------------------------------------------- preparing a source


def encode_chunks(tokenizer: Tokenizer, jobs: Iterator[tuple]) -> Iterator[tuple]:
    """(split, docs, n_bytes) jobs -> (split, docs, n_bytes, tokens, lengths), in order, tokenized in this
    process by `Tokenizer.encode_documents`, which spreads each chunk over every core (tiktoken's threads
    for bpe and gpt2). Measured end to end before tiktoken (read, split, tokenize, write; 20 MB of
    bench/make_tinystories.py stories, bpe, 2 idle cores): HF's encode_batch 4.5-6.1 MB/s (median 5.5), one
    thread 2.9-3.6, a 2-process fork pool over the chunks no better (median 5.5) and worse beside another
    job, as it adds a third busy process; the figures with tiktoken are in bench/RESULTS.md."""
    for split, docs, n_bytes in jobs:
        tokens, lengths = tokenizer.encode_documents(docs) if docs else (np.zeros(0, np.uint32), np.zeros(0, np.int64))
        yield split, docs, n_bytes, tokens, lengths


def _manifest(plan: SourcePlan, split: str, rule: dict, tokenizer: Tokenizer, w: SplitWriter,
              stats: PassStats, seconds: float) -> dict:
    return {"format": FORMAT, "name": plan.name, "split": split, "source": plan.fingerprint, "rule": rule,
            "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                          "identity": tokenizer.identity, "encoder": tokenizer.encoder},
            "dtype": np.dtype(w.dtype).name, "n_tokens": w.n_tokens, "n_docs": w.n_docs, "n_bytes": w.n_bytes,
            "numeric": bool(w.numeric and w.n_docs > 0), "duplicates_dropped": stats.duplicates,
            "excluded_as_test": stats.excluded, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(seconds, 2)}


def _write_pass(plan: SourcePlan, stream: Callable[[], Iterator[str]], assign: Assignment,
                wanted: dict[str, Path], tokenizer: Tokenizer, progress: bool) -> tuple[dict, dict, PassStats]:
    """One pass over a stream, the wanted splits (name -> final directory) written into temporary
    directories: (temporary directories, their writers, the pass's counts)."""
    tmps = {s: _new_tmp(prepared_root(), d.name) for s, d in wanted.items()}
    writers = {s: SplitWriter(tmps[s], tokenizer) for s in wanted}
    stats = PassStats()
    size = plan.test.size if assign.all_test else plan.size
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1000, desc=f"preparing {plan.name}",
              disable=None if progress else True, dynamic_ncols=True, leave=False) as bar:
        def jobs():
            for chunk in split_chunks(stream(), assign, stats):
                bar.update(chunk.read_bytes)
                for s in wanted:
                    yield (s, *chunk.part(s))

        for s, docs, n_bytes, tokens, lengths in encode_chunks(tokenizer, jobs()):
            writers[s].add(docs, tokens, lengths, n_bytes)
    for w in writers.values():
        w.close()
    return tmps, writers, stats


def _build(plan: SourcePlan, splits: dict[str, Path], tokenizer: Tokenizer, test_fraction: float,
           progress: bool) -> None:
    """Writes the missing splits of a source (name -> final directory): one pass over its documents (or,
    with an official test split, one over each), in temporary directories renamed when complete. A pass
    that leaves a split empty that must not be (see `fallback`) is done again with the fallback."""
    rule, t0 = split_rule(plan, test_fraction), time.perf_counter()
    if plan.test is not None:  # the official test split as it is; training without its documents
        passes = [(plan.test.docs, Assignment(all_test=True), "test"),
                  (plan.docs, Assignment(exclude=official_digests(plan)), "train")]
        passes = [(stream, assign, {s: splits[s]}) for stream, assign, s in passes if s in splits]
    else:
        passes = [(plan.docs, hash_assignment(test_fraction), splits)]
    for stream, assign, wanted in passes:
        while True:
            tmps, writers, stats = _write_pass(plan, stream, assign, wanted, tokenizer, progress)
            redo = fallback(assign, stats, test_fraction, plan.name)
            if redo is None:
                break
            for tmp in tmps.values():
                shutil.rmtree(tmp, ignore_errors=True)
            assign = redo
        for s, tmp in tmps.items():
            _commit(tmp, wanted[s], _manifest(plan, s, rule, tokenizer, writers[s], stats, time.perf_counter() - t0))


def prepare_source(plan: SourcePlan, tokenizer: Tokenizer, test_fraction: float,
                   progress: bool = True) -> dict[str, PreparedSplit]:
    """A source's train and test splits, prepared: from the cache when there, else built (and cached)."""
    root = prepared_root()
    rule = split_rule(plan, test_fraction)
    dirs = {s: root / split_dir_name(plan, s, rule, tokenizer) for s in SPLITS}
    found = {s: open_prepared(d) for s, d in dirs.items()}
    missing = {s: d for s, d in dirs.items() if found[s] is None}
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        sweep_stale(root)
        for d in missing.values():
            if d.exists():  # under its final name but not matching its manifest: damaged
                shutil.rmtree(d, ignore_errors=True)
        _build(plan, missing, tokenizer, test_fraction, progress)
        for s, d in missing.items():
            found[s] = open_prepared(d)
            if found[s] is None:
                raise PicoError(f"prepared data in {d} is unreadable after writing it; is {root} writable?")
            found[s].reused = False
    return found


# --------------------------------------------------------------------------- what is cached


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def prepared_info() -> tuple[list[dict], int]:
    """(every complete prepared directory's manifest with its path and size on disk, oldest first; the
    number of unfinished temporary directories)."""
    root = prepared_root()
    if not root.is_dir():
        return [], 0
    out = []
    for d in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
        if d.name.startswith(".") or d.name == "tokenizers" or not d.is_dir():
            continue
        got = open_prepared(d)
        if got is not None:
            out.append(dict(got.manifest, path=str(d), disk_bytes=dir_bytes(d)))
    return out, sum(1 for d in root.glob(".tmp-*") if d.is_dir())


PREPARED_COLUMNS = ["source", "split", "tokenizer", "docs", "tokens", "text MB", "tokens/byte"]


def prepared_row(m: dict) -> list[str]:
    tok = m["tokenizer"]
    return [m["name"], m["split"], f"{tok['name']} {tok['vocab_size']}", f"{m['n_docs']:,}", f"{m['n_tokens']:,}",
            f"{m['n_bytes'] / 1e6:,.1f}", f"{m['n_tokens'] / max(1, m['n_bytes']):.3f}"]


def info_table() -> str:
    """`pico-llm data info`: what is cached, one line per prepared directory, and the totals."""
    entries, unfinished = prepared_info()
    root = prepared_root()
    if not entries:
        text = f"no prepared data in {root}\n"
    else:
        rows = [prepared_row(m) + [f"{m['disk_bytes'] / 1e6:,.1f}", m.get("created", ""), Path(m["path"]).name]
                for m in entries]
        text = md_table(PREPARED_COLUMNS + ["disk MB", "created", "directory"], rows,
                        align="lllrrrrrll") + (f"{len(entries)} prepared directories, "
                                               f"{sum(m['disk_bytes'] for m in entries) / 1e6:,.1f} MB, in {root}\n")
    if unfinished:
        text += f"{unfinished} unfinished (from prepares that were stopped; the next prepare removes them)\n"
    return text
