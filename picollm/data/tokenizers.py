"""One Tokenizer interface, three tokenizers:

    byte  ids 0..255 are the UTF-8 bytes, 256 is <|endoftext|>; vocab_size 257. Needs nothing.
    bpe   byte-level BPE trained on the run's own training text with HF `tokenizers` (GPT-2's
          pre-tokenizer regex and byte alphabet, <|endoftext|> = id 0). Cached by content hash.
    gpt2  GPT-2's BPE through tiktoken (eot 50256, vocab_size 50257), or built from the original
          GPT-2 files (vocab.bpe + encoder.json) in $PICOLLM_GPT2_DIR when tiktoken cannot
          download them.

encode() adds no special tokens; decode() renders the end-of-text id as "<|endoftext|>".
encode_documents() (what data preparation calls) runs tiktoken's encoder for bpe and gpt2: for bpe, loaded
with the trained merges as ranks when that is proven to give HF's ids (see `tiktoken_for`), on every core,
about 4-5x HF's own encode_batch on TinyStories-like text (bench/RESULTS.md).
A run directory holds run_dir/tokenizer.json: the HF tokenizers JSON for bpe (loadable by
`tokenizers.Tokenizer.from_file` and `transformers.PreTrainedTokenizerFast`), {"type": "byte"}, or
{"type": "gpt2"} (plus "local_dir" when built from local files), so loading needs nothing else.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..config import EOT, MIN_BPE_VOCAB
from ..device import cpu_count
from ..errors import PicoError
from ..fsio import cache_dir, write_text

TOKENIZER_FILE = "tokenizer.json"
PathLike = Union[str, Path]

# GPT-2's pre-tokenizer regex, as the original release wrote it. tiktoken ships an equivalent,
# faster form; use that one when present so local files encode exactly as tiktoken's gpt2 does.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_OFFLINE_HINT = ("use --tokenizer bpe (trained on your data, no download), or make GPT-2's files "
                     "available: a warm TIKTOKEN_CACHE_DIR, or PICOLLM_GPT2_DIR=DIR with vocab.bpe and encoder.json")
_TIKTOKEN_DEADLINE_S = 60.0  # tiktoken fetches with `requests` and no timeout; a stalled network must not hang us


def _ids(ids) -> list[int]:
    """Token ids from a list, tuple, numpy array or tensor."""
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def _joined(ids: list[list[int]], eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (them joined, end-of-text after each, uint32; their lengths, int64)."""
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(i + [eot_id] for i in ids), np.uint32,
                         int(lengths.sum()) + len(ids))
    return tokens, lengths


class Tokenizer(ABC):
    """What the rest of pico-llm relies on. vocab_size is the size of the id space a model must
    cover, specials included."""

    name: str
    vocab_size: int
    eot_id: int
    encoder = "python"  # what encode_documents runs: "python", "tiktoken" or "hf"

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> ids; no special tokens added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(each text's ids followed by the end-of-text id, all one after another, uint32; the number of
        ids of each text, end-of-text not counted, int64): what a prepared token file holds, made without
        a Python int kept per token."""
        return _joined(self.encode_batch(texts), self.eot_id)

    @property
    def identity(self) -> str:
        """sha256 of the tokenizer's JSON: two tokenizers with the same identity give the same ids."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @abstractmethod
    def decode(self, ids) -> str:
        """Ids (list, array or tensor) -> text; the end-of-text id reads "<|endoftext|>"."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (end-of-text: b"<|endoftext|>"). A token may hold part of a UTF-8
        character: decoding a stream token by token joins these bytes (what the server streams)."""

    @abstractmethod
    def to_json(self) -> str:
        """The content of a run's tokenizer.json."""

    def save(self, run_dir: PathLike) -> None:
        write_text(Path(run_dir) / TOKENIZER_FILE, self.to_json())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# --------------------------------------------------------------------------- byte


class ByteTokenizer(Tokenizer):
    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        data = [t.encode("utf-8") + b"\0" for t in texts]  # a 0 byte marks where each end-of-text goes
        tokens = np.frombuffer(b"".join(data), np.uint8).astype(np.uint32)
        ends = np.cumsum(np.fromiter(map(len, data), np.int64, len(data))) - 1
        tokens[ends] = self.eot_id
        return tokens, np.diff(ends, prepend=-1) - 1

    def decode(self, ids) -> str:
        parts, run = [], bytearray()
        for i in _ids(ids):
            if i == self.eot_id:
                parts.append(run.decode("utf-8", errors="replace") + EOT)
                run = bytearray()
            elif 0 <= i < 256:
                run.append(i)
            else:
                raise ValueError(f"byte tokenizer: id {i} out of range 0..{self.vocab_size - 1}")
        return "".join(parts) + run.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if token_id == self.eot_id:
            return EOT.encode()
        if not 0 <= token_id < 256:
            raise ValueError(f"byte tokenizer: id {token_id} out of range 0..{self.vocab_size - 1}")
        return bytes([token_id])

    def to_json(self) -> str:
        return json.dumps({"type": "byte"})


# --------------------------------------------------------------------------- bpe (HF tokenizers)


class BPETokenizer(Tokenizer):
    name = "bpe"

    def __init__(self, hf):
        self.hf = hf  # tokenizers.Tokenizer
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise PicoError(f"the bpe tokenizer has no {EOT} token")
        self.eot_id = eot
        self._batch = getattr(hf, "encode_batch_fast", hf.encode_batch)  # no offsets: faster
        self._fast: Optional[object] = None  # the tiktoken Encoding, built on first use
        self._fast_checked = False
        self.encoder = "hf"  # which encoder encode_documents uses: "hf" or "tiktoken"
        self.encoder_why = "not used yet"
        self._bytes: Optional[list[bytes]] = None  # token_bytes' table

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._batch(list(texts), add_special_tokens=False)]

    def encode_documents_hf(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """encode_documents through HF tokenizers' encode_batch: the reference the fast path is checked on."""
        return _joined(self.encode_batch(texts), self.eot_id)

    def _fast_encoding(self):
        if not self._fast_checked:
            self._fast_checked = True
            self._fast, self.encoder_why = tiktoken_for(self.hf)
            self.encoder = "tiktoken" if self._fast is not None else "hf"
        return self._fast

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """tiktoken with this BPE's ranks when `tiktoken_for` accepts it. Its first call also encodes up to
        SPOT_CHECK_CHARS of the texts with HF and, should one id differ, uses HF from then on."""
        enc = self._fast_encoding()
        if enc is None:
            return self.encode_documents_hf(texts)
        tokens, lengths = tiktoken_documents(enc, texts, self.eot_id, literal_eot_special=True)
        if self.encoder_why != "spot-checked":
            k = int(np.searchsorted(np.cumsum([len(t) for t in texts]), SPOT_CHECK_CHARS)) + 1
            ref_tokens, ref_lengths = self.encode_documents_hf(texts[:k])
            if not (np.array_equal(ref_lengths, lengths[:k]) and np.array_equal(ref_tokens, tokens[:len(ref_tokens)])):
                self._fast, self.encoder, self.encoder_why = None, "hf", "tiktoken's ids differed from HF's on a sample"
                return self.encode_documents_hf(texts)
            self.encoder_why = "spot-checked"
        return tokens, lengths

    def decode(self, ids) -> str:
        return self.hf.decode(_ids(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        if self._bytes is None:  # the byte-level vocabulary read back to bytes, once
            chars = byte_alphabet()
            specials = {t.content for t in self.hf.get_added_tokens_decoder().values()}
            self._bytes = [b""] * self.vocab_size
            for text, i in self.hf.get_vocab(with_added_tokens=True).items():
                self._bytes[i] = text.encode() if text in specials else bytes(chars[c] for c in text)
        return self._bytes[token_id]

    def to_json(self) -> str:
        return self.hf.to_str()


def _bpe_key(texts: Sequence[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"bpe-v1 tokenizers={tokenizers.__version__} vocab={vocab_size}\n".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] != ["a", "bc"]
        h.update(b)
    return h.hexdigest()


def _train_bpe(texts: Sequence[str], vocab_size: int):
    """Train GPT-2-style byte-level BPE. Deterministic: same texts and size, same merges."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return hf


def train_bpe(texts: Sequence[str], vocab_size: int = 4096) -> BPETokenizer:
    """A bpe tokenizer for these texts: from $PICOLLM_CACHE_DIR/tokenizers/<sha256>.json when the
    same texts and size were seen before, else trained and cached."""
    texts = list(texts)
    if not any(t for t in texts):
        raise PicoError("the bpe tokenizer needs training text, and the training split is empty")
    path = cache_dir() / "tokenizers" / f"{_bpe_key(texts, vocab_size)}.json"
    if path.is_file():
        try:
            return BPETokenizer(HFTokenizer.from_file(str(path)))
        except Exception:  # a damaged cache entry: train again and overwrite it
            pass
    tok = BPETokenizer(_train_bpe(texts, vocab_size))
    try:
        write_text(path, tok.to_json())
    except OSError:
        pass  # an unwritable cache costs a retrain next time, nothing more
    return tok


# --------------------------------------------------------------------------- bpe through tiktoken

SPOT_CHECK_CHARS = 1 << 20  # the first encode_documents of a bpe tokenizer compares this much with HF
TIKTOKEN_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT2_PATTERN


def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for themselves, the
    other 68 bytes for the characters from U+0100 up, in byte order (what HF's ByteLevel writes)."""
    shown = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    hidden = [b for b in range(256) if b not in set(shown)]
    return {**{chr(b): b for b in shown}, **{chr(0x100 + i): b for i, b in enumerate(hidden)}}


def bpe_parts(word: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's rule on one word, with the tokens of rank < below: merge the adjacent pair whose
    concatenation has the lowest rank (leftmost first) until none is a token."""
    parts = [word[i:i + 1] for i in range(len(word))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], below)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _ranks_if_equivalent(data: dict) -> tuple[Optional[dict[bytes, int]], str]:
    """(bytes -> id, "") when HF's BPE on this tokenizer JSON and tiktoken's rank rule give the same
    ids, else (None, why). HF merges the pair of lowest merge index; tiktoken the pair whose concatenation
    has the lowest id, with no merge list. They agree when each merge's result has a larger id than every
    earlier merge's, and tiktoken's rule, given only the tokens below a token, rebuilds that token's own
    merge from its bytes (the check `tiktoken.load` relies on for GPT-2): then no other split of a token
    ever wins, and every step chooses the same pair."""
    m, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if (m.get("type") != "BPE" or data.get("normalizer") is not None or m.get("dropout")
            or m.get("continuing_subword_prefix") or m.get("end_of_word_suffix") or m.get("byte_fallback")
            or m.get("ignore_merges")):
        return None, "not a plain BPE model"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None, "not GPT-2's byte-level pre-tokenizer"
    if [(t.get("content"), t.get("special")) for t in data.get("added_tokens", [])] != [(EOT, True)]:
        return None, f"added tokens other than {EOT}"
    alphabet = byte_alphabet()
    try:
        ranks = {bytes(alphabet[c] for c in tok): i for tok, i in m["vocab"].items() if tok != EOT}
    except KeyError:
        return None, "a token outside the byte-level alphabet"
    by_id = {i: b for b, i in ranks.items()}
    last = -1
    for merge in m.get("merges", []):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        pa, pb = bytes(alphabet[c] for c in a), bytes(alphabet[c] for c in b)
        r = ranks.get(pa + pb)
        if r is None or r <= last or bpe_parts(pa + pb, ranks, r) != [pa, pb]:
            return None, f"merge {a!r} + {b!r} is not rebuilt by rank order"
        last = r
    singles = [i for i, b in by_id.items() if len(b) == 1]
    if len(singles) != 256 or max(singles) > min((i for i, b in by_id.items() if len(b) > 1), default=256):
        return None, "the 256 bytes are not the first tokens"
    return ranks, ""


def tiktoken_for(hf) -> tuple[Optional[object], str]:
    """(a tiktoken Encoding giving exactly this HF byte-level BPE's ids, "") or (None, why not)."""
    import tiktoken

    data = json.loads(hf.to_str())
    ranks, why = _ranks_if_equivalent(data)
    if ranks is None:
        return None, why
    eot = next(t["id"] for t in data["added_tokens"])
    try:
        return tiktoken.Encoding(name="picollm-bpe", pat_str=TIKTOKEN_GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: eot}), ""
    except Exception as e:  # noqa: BLE001 - any refusal by tiktoken means: use HF
        return None, f"tiktoken refused the ranks ({type(e).__name__})"


def _groups(texts: Sequence[str], n: int) -> list[Sequence[str]]:
    """texts cut into at most n runs of about equal characters, in order."""
    if n <= 1 or len(texts) < 2 * n:
        return [texts]
    ends = np.cumsum([len(t) for t in texts])
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, n) / n).tolist()
    bounds = sorted({0, *cuts, len(texts)})
    return [texts[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def tiktoken_documents(enc, texts: Sequence[str], eot_id: int, literal_eot_special: bool,
                       threads: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """encode_documents through tiktoken: each thread encodes its run of texts joined by end-of-text with
    `encode_to_numpy` (no Python int per token; tiktoken cuts at special tokens before its regex, so the
    ids are those of each text alone, and the separators are the end-of-text ids the file wants). A run
    whose texts hold the end-of-text string itself is encoded text by text: as the special id when
    literal_eot_special (HF's rule for added tokens), as plain text otherwise (tiktoken's encode_ordinary)."""
    if not texts:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64)

    def run(group):
        tokens = enc.encode_to_numpy(EOT.join(group) + EOT, allowed_special={EOT})
        ends = np.flatnonzero(tokens == eot_id)
        if len(ends) == len(group):
            return tokens, np.diff(ends, prepend=-1) - 1
        per = (enc.encode_batch(list(group), allowed_special={EOT}, num_threads=1) if literal_eot_special
               else enc.encode_ordinary_batch(list(group), num_threads=1))
        return _joined(per, eot_id)

    groups = _groups(texts, threads or cpu_count())
    with ThreadPoolExecutor(len(groups)) as pool:  # tiktoken releases the GIL while it encodes
        parts = list(pool.map(run, groups))
    return (np.concatenate([p[0] for p in parts]).astype(np.uint32, copy=False),
            np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False))


# --------------------------------------------------------------------------- gpt2 (tiktoken)


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"
    encoder = "tiktoken"

    def __init__(self, enc, local_dir: Optional[str] = None):
        self.enc = enc  # tiktoken.Encoding
        self.local_dir = local_dir
        self.vocab_size = enc.n_vocab
        self.eot_id = enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts))

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return tiktoken_documents(self.enc, texts, self.eot_id, literal_eot_special=False)

    def decode(self, ids) -> str:
        return self.enc.decode(_ids(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def to_json(self) -> str:
        return json.dumps({"type": "gpt2", **({"local_dir": self.local_dir} if self.local_dir else {})})


@contextmanager
def _tiktoken_cache_off():
    """tiktoken caches even local files, keyed by path (an edited file would come back stale);
    an empty TIKTOKEN_CACHE_DIR turns that off."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def gpt2_from_files(local_dir: PathLike):
    """A tiktoken Encoding from the original GPT-2 files DIR/vocab.bpe and DIR/encoder.json."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    d = Path(local_dir)
    vocab_bpe, encoder_json = d / "vocab.bpe", d / "encoder.json"
    missing = [p.name for p in (vocab_bpe, encoder_json) if not p.is_file()]
    if missing:
        raise PicoError(f"GPT-2 files missing in {d}: {', '.join(missing)} (need vocab.bpe and encoder.json)")
    try:
        with _tiktoken_cache_off():
            ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
        eot = json.loads(encoder_json.read_text(encoding="utf-8")).get(EOT, len(ranks))
        try:
            from tiktoken_ext.openai_public import r50k_pat_str as pattern
        except ImportError:
            pattern = GPT2_PATTERN
        return tiktoken.Encoding(name="gpt2", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={EOT: eot})
    except Exception as e:  # bad JSON, unknown characters, merges that disagree with the encoder
        raise PicoError(f"{d}: vocab.bpe and encoder.json are not valid GPT-2 files ({type(e).__name__})") from None


def _tiktoken_gpt2():
    """tiktoken's gpt2 encoding: from its cache, else downloaded; a PicoError when neither works."""
    import tiktoken

    box: dict = {}

    def work():
        try:
            box["enc"] = tiktoken.get_encoding("gpt2")
        except BaseException as e:  # noqa: BLE001 - reported below
            box["err"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(_TIKTOKEN_DEADLINE_S)
    if "enc" in box:
        return box["enc"]
    why = f"{type(box['err']).__name__}" if "err" in box else f"no answer in {_TIKTOKEN_DEADLINE_S:.0f} s"
    raise PicoError(f"cannot load the gpt2 tokenizer: tiktoken could not download its files ({why}); {GPT2_OFFLINE_HINT}")


def gpt2_tokenizer(local_dir: Optional[PathLike] = None) -> GPT2Tokenizer:
    """GPT-2 BPE: from local files (argument, else $PICOLLM_GPT2_DIR) when given, else tiktoken."""
    local_dir = local_dir or os.environ.get("PICOLLM_GPT2_DIR") or None
    if local_dir:
        local_dir = str(Path(local_dir).resolve())
        return GPT2Tokenizer(gpt2_from_files(local_dir), local_dir)
    return GPT2Tokenizer(_tiktoken_gpt2())


# --------------------------------------------------------------------------- build / load


def build_tokenizer(name: str, train_texts: Optional[Iterable[str]] = None, vocab_size: int = 4096,
                    gpt2_dir: Optional[PathLike] = None) -> Tokenizer:
    """name: "bpe" (trained on train_texts to at most vocab_size ids), "gpt2" or "byte"."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return gpt2_tokenizer(gpt2_dir)
    if name == "bpe":
        if vocab_size < MIN_BPE_VOCAB:
            raise PicoError(f"--vocab_size must be >= {MIN_BPE_VOCAB} for bpe (256 bytes + {EOT}), got {vocab_size}")
        return train_bpe(list(train_texts or []), vocab_size)
    raise PicoError(f"unknown tokenizer {name!r}; choose one of: bpe, gpt2, byte")


def tokenizer_from_json(text: str, where: str = "tokenizer.json") -> Tokenizer:
    """A tokenizer from the content of a run's tokenizer.json (`where` names it in errors)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PicoError(f"{where} is corrupt ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise PicoError(f"{where} is corrupt (not a JSON object)")
    if "model" in data:  # the HF tokenizers format: a bpe tokenizer
        try:
            return BPETokenizer(HFTokenizer.from_str(text))
        except PicoError:
            raise
        except Exception as e:
            raise PicoError(f"{where} is not a valid HF tokenizers file ({type(e).__name__})") from None
    kind = data.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        local = data.get("local_dir")
        return gpt2_tokenizer(local if local and Path(local).is_dir() else None)
    raise PicoError(f"{where}: unknown tokenizer type {kind!r}")


def load_tokenizer(run_dir: PathLike) -> Tokenizer:
    """The tokenizer a run saved: run_dir/tokenizer.json (or that file itself)."""
    p = Path(run_dir)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise PicoError(f"no {TOKENIZER_FILE} in {run_dir}: not a pico-llm run directory?")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PicoError(f"{p} is corrupt ({type(e).__name__})") from None
    return tokenizer_from_json(text, str(p))
