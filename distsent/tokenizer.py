"""Words to ids: the word cutter (vectorized over UTF-8 bytes), the vocabulary, the saved Hugging Face tokenizer,
and reviews as flat id arrays cut to length."""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig
from .records import DataError

PAD, UNK = "<pad>", "<unk>"
PAD_ID = 0

# --- the word cutter -----------------------------------------------------------------------------------------------
#
# The words are those of the reference pipeline (`re.findall(r"\b\w+\b", text.lower())`): runs of letters, digits
# and underscores. With data.symbols, each punctuation mark or symbol (`!`, `?`, an emoji) is a token of its own too;
# without, they only separate words. Data preparation (50,000 reviews) cuts them vectorized over the texts' UTF-8
# bytes in numpy, split over the cores. The same rules are saved as a Hugging Face `tokenizer.json` (WordLevel with
# these patterns): the artifact that travels with a model, which prediction uses (`encode`). Both give identical ids
# (tested).
WORD_CLASS = r"\p{L}\p{N}_"  # a letter or a number of any script, or the underscore
NON_WORD = rf"[^{WORD_CLASS}]+"
# punctuation (all but the connectors, such as the underscore, a word character) and symbols, emoji among them
SYMBOL_CLASS = r"\p{Pd}\p{Ps}\p{Pe}\p{Pi}\p{Pf}\p{Po}\p{S}"
SYMBOL = rf"[{SYMBOL_CLASS}]"
NON_TOKEN = rf"[^{WORD_CLASS}{SYMBOL_CLASS}]+"
# \s spelt out: RE2 (preparation) reads \s as ASCII whitespace, Oniguruma (tokenizer.json) as any Unicode space
HTML_BREAK = r"<br[\t\n\f\r ]*/?>"
HTML_BREAK_BEFORE = r"<br\s*/?>"  # the pattern tokenizer.json files saved before it was spelt out

# The class of each byte: a word character's (WORD), a symbol's (SYMBOL_BYTE, with data.symbols) or neither (0).
# ASCII bytes by these tables; bytes of other characters are classified per character (_byte_classes).
WORD, SYMBOL_BYTE = 1, 2
_ASCII_WORDS = np.zeros(256, dtype=np.uint8)
_ASCII_WORDS[np.frombuffer(b"0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)] = WORD
_ASCII_SYMBOLS = _ASCII_WORDS.copy()
_ASCII_SYMBOLS[np.frombuffer(string.punctuation.replace("_", "").encode(), np.uint8)] = SYMBOL_BYTE  # P and S


def _char_classes(code_points: np.ndarray, symbols: bool) -> np.ndarray:
    """The class of each code point. Words by the pattern above in pyarrow's regex engine (RE2): Python's own
    `unicodedata` can be older and miss recently assigned letters. The saved tokenizer.json applies the same
    pattern with its own engine (Oniguruma), whose tables are newer: the letters of Unicode 16 (2024, e.g. U+105C0)
    are word characters there and not here, so a word holding one is cut differently at prediction (kept so: the
    cache's ids of earlier versions stay right). Symbols, a newer option, by tokenizer.json's own engine: every
    emoji it knows (Unicode 16's too, which RE2 does not) is a token on both sides."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chars = [chr(c) for c in code_points.tolist()]
    out = pc.match_substring_regex(pa.array(chars, pa.string()), rf"^[{WORD_CLASS}]$").to_numpy(
        zero_copy_only=False).astype(np.uint8)
    if symbols:
        from tokenizers import Regex, pre_tokenizers

        isolate = pre_tokenizers.Split(Regex(SYMBOL), behavior="removed")  # removes a symbol, leaves nothing
        out[[not isolate.pre_tokenize_str(c) for c in chars]] = SYMBOL_BYTE
    return out


def _normalize(texts, lowercase: bool, strip_html: bool):
    import pyarrow.compute as pc

    if strip_html:
        texts = pc.replace_substring_regex(texts, HTML_BREAK, " ")
    return pc.utf8_lower(texts) if lowercase else texts


def _byte_classes(data: np.ndarray, symbols: bool) -> np.ndarray:
    """For each byte of UTF-8 text, the class of the character it is part of (WORD, SYMBOL_BYTE or 0).

    A regex over Unicode classes was the slowest step of data preparation; a byte table does the ASCII characters,
    and the few multi-byte characters are decoded and classified once per distinct code point.
    """
    kind = (_ASCII_SYMBOLS if symbols else _ASCII_WORDS)[data]
    lead = np.flatnonzero(data >= 0xC0)  # first bytes of multi-byte characters (continuations are 0x80-0xBF)
    if lead.size:
        b = [data[np.minimum(lead + k, len(data) - 1)].astype(np.int32) for k in range(4)]
        size = 2 + (b[0] >= 0xE0) + (b[0] >= 0xF0)
        tail = [x & 0x3F for x in b[1:]]
        code = np.where(size == 2, (b[0] & 0x1F) << 6 | tail[0],
                        np.where(size == 3, (b[0] & 0x0F) << 12 | tail[0] << 6 | tail[1],
                                 (b[0] & 0x07) << 18 | tail[0] << 12 | tail[1] << 6 | tail[2]))
        distinct, which = np.unique(code, return_inverse=True)
        classes = _char_classes(distinct, symbols)[which]
        for k in range(4):  # the character's class covers all of its bytes
            has = size > k
            kind[lead[has] + k] = classes[has]
    return kind


def _words_chunk(texts, lowercase: bool, strip_html: bool, symbols: bool = False):
    """(flat words, words per text) for one Arrow chunk of texts; with `symbols`, each symbol is a word too."""
    import pyarrow as pa

    texts = _normalize(texts, lowercase, strip_html).cast(pa.large_string())
    _, offsets_buf, data_buf = texts.buffers()
    bounds = np.frombuffer(offsets_buf, np.int64)[texts.offset: texts.offset + len(texts) + 1]
    data = np.frombuffer(data_buf, np.uint8)[bounds[0]: bounds[-1]] if data_buf is not None else np.zeros(0, np.uint8)
    bounds = bounds - bounds[0]
    kind = _byte_classes(data, symbols)
    token = kind > 0
    # a token starts where the byte class changes (to WORD or SYMBOL_BYTE), a symbol also at each of its characters'
    # first bytes (ASCII or a lead byte: not 0x80-0xBF), and any token at a text's start, so that words never join
    # across texts
    start = token.copy()
    start[1:] &= kind[1:] != kind[:-1]
    if symbols:
        start |= (kind == SYMBOL_BYTE) & ((data < 0x80) | (data >= 0xC0))
    inner = np.unique(bounds[1:-1])  # empty texts repeat a boundary
    inner = inner[(inner > 0) & (inner < len(kind))]
    start[inner[token[inner]]] = True
    # a token's last byte: the next byte is no token's, or starts one
    last = token.copy()
    last[:-1] &= ~(token[1:] & ~start[1:])
    starts, ends = np.flatnonzero(start), np.flatnonzero(last) + 1
    word_offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(ends - starts, out=word_offsets[1:])
    words = pa.Array.from_buffers(pa.large_string(), len(starts),
                                  [None, pa.py_buffer(word_offsets), pa.py_buffer(data[token])])
    return words, np.diff(np.searchsorted(starts, bounds))


def _on_cores(fn, array, min_per_part: int) -> list:
    """fn over consecutive slices of an Arrow array, one per core (fewer for small arrays), on threads: the work
    runs in Arrow's and numpy's loops, which release the GIL. Results in order."""
    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parts = max(1, min(cores, len(array) // min_per_part))
    bounds = np.linspace(0, len(array), parts + 1).astype(int)
    slices = [array.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    if parts == 1:
        return [fn(slices[0])]
    with ThreadPoolExecutor(parts) as pool:
        return list(pool.map(fn, slices))


def index_words(texts, lowercase: bool = True, strip_html: bool = False, symbols: bool = False):
    """The words of all texts (a list or an Arrow array) as (distinct words, each word's index among them,
    offsets): text i reads distinct[index[offsets[i]:offsets[i+1]]].

    Each core cuts and hashes its share of the texts; the shares' dictionaries are then merged. The vocabulary
    counts the indices and the ids need one lookup per distinct word, not per word.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(texts, pa.Array):
        texts = pa.array(texts, type=pa.large_string())

    def share(chunk):
        words, counts = _words_chunk(chunk, lowercase, strip_html, symbols)
        encoded = pc.dictionary_encode(words)
        return encoded.dictionary, encoded.indices.to_numpy(), counts

    results = _on_cores(share, texts, min_per_part=2000)
    if len(results) == 1:
        distinct, index = results[0][:2]
    else:
        merged = pc.dictionary_encode(pa.concat_arrays([d for d, _, _ in results]))
        to_merged = merged.indices.to_numpy()
        first = np.cumsum([0] + [len(d) for d, _, _ in results])
        index = np.concatenate([to_merged[f + idx] for f, (_, idx, _) in zip(first, results)])
        distinct = merged.dictionary
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate([c for _, _, c in results]), out=offsets[1:])
    return distinct, index.astype(np.int32, copy=False), offsets


def build_tokenizer(vocab_words: list[str], lowercase: bool, strip_html: bool, symbols: bool = False):
    """A Hugging Face WordLevel tokenizer with <pad>=0, <unk>=1 and the given words, applying the same rules."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(vocab_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Lowercase follows Unicode's full mapping, which turns U+0130 (dotted capital I) into "i" and a combining dot
    # that splits the word; preparation's utf8_lower gives "i" alone, and so must prediction
    steps = ([normalizers.Replace(Regex(HTML_BREAK), " ")] if strip_html else []) + (
        [normalizers.Replace("\u0130", "i"), normalizers.Lowercase()] if lowercase else [])
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    words = pre_tokenizers.Split(Regex(NON_TOKEN if symbols else NON_WORD), behavior="removed")
    tok.pre_tokenizer = pre_tokenizers.Sequence([words, pre_tokenizers.Split(Regex(SYMBOL), behavior="isolated")]) \
        if symbols else words
    return tok


def vocabulary(distinct, counts: np.ndarray, min_freq: int) -> list[str]:
    """Words seen at least min_freq times, most frequent first, ties in alphabetical order."""
    keep = np.flatnonzero(counts >= min_freq)
    if not len(keep):  # every word <unk>: the model would learn from the texts' lengths alone
        raise DataError(f"data.min_freq={min_freq}: no word of the training split occurs that often (the commonest: "
                        f"{int(counts.max(initial=0))} times), so the vocabulary would be empty; lower data.min_freq")
    words = distinct.take(keep).to_pylist()
    order = sorted(range(len(keep)), key=lambda i: (-counts[keep[i]], words[i]))
    return [words[i] for i in order]


def train_tokenizer(texts, cfg: DataConfig):
    """The reference vocabulary of `texts`: words seen >= min_freq times (most frequent first), <pad>=0, <unk>=1."""
    distinct, index, _ = index_words(texts, *text_rules(cfg))
    counts = np.bincount(index, minlength=len(distinct))
    return build_tokenizer(vocabulary(distinct, counts, cfg.min_freq), *text_rules(cfg))


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a readable tokenizer.json ({exc})") from exc


RULES = ("lowercase", "strip_html", "symbols")  # the data settings that say how a text is cut into words


def text_rules(cfg: DataConfig) -> tuple[bool, bool, bool]:
    return tuple(getattr(cfg, name) for name in RULES)


def tokenizer_rules(tok) -> tuple[bool, bool, bool]:
    """(lowercase, strip_html, symbols) as saved in a tokenizer.json."""
    saved = json.loads(tok.to_str())
    norm, pre = saved.get("normalizer") or {}, saved.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm else []
    return (any(s.get("type") == "Lowercase" for s in steps),
            any(s.get("type") == "Replace" and s.get("pattern", {}).get("Regex") in (HTML_BREAK, HTML_BREAK_BEFORE)
                for s in steps),
            any(s.get("pattern", {}).get("Regex") == SYMBOL for s in pre.get("pretokenizers", [])))


def word_ids(tok, distinct) -> np.ndarray:
    """The token id of each distinct word from `index_words` (<unk> for words outside the vocabulary)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    vocab = tok.get_vocab()
    by_id = sorted(vocab, key=vocab.get)
    index = pc.index_in(distinct, value_set=pa.array(by_id, pa.large_string()))
    return index.fill_null(vocab[UNK]).to_numpy().astype(np.int32)


def encode(tok, texts: list[str], max_len: int, truncate: str, with_counts: bool = False):
    """Token ids of every text by the saved tokenizer itself (what any user of tokenizer.json gets), cut to max_len
    from the head or the tail, as a TokenizedSplit; with `with_counts`, also each text's word count before the cut."""
    texts = texts.to_pylist() if hasattr(texts, "to_pylist") else list(texts)  # an Arrow array of a read split
    short = iter(tok.encode_batch([t for t in texts if len(t) <= LONG_TEXT], add_special_tokens=False))
    ids = [_long_text_ids(tok, t) if len(t) > LONG_TEXT else np.asarray(next(short).ids, np.int32) for t in texts]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in ids], out=offsets[1:])
    return cut(np.concatenate(ids) if ids else np.zeros(0, np.int32), offsets, max_len, truncate, with_counts)


LONG_TEXT = 1 << 20  # characters: a longer text is tokenized a piece at a time
# a place to cut a text: whitespace after a character that is not, and not inside an HTML line break ("<br />",
# which the normalizer removes whole: "<br" and "/>" apart would leave the word "br")
SAFE_CUT = re.compile(r"(?<=\S)(?<!<br)[\t\n\f\r ]")


def _long_text_ids(tok, text: str) -> np.ndarray:
    """A text of millions of characters (a whole file on one line, say) in pieces of about LONG_TEXT characters cut
    at SAFE_CUT, where no word spans the cut: the ids of the whole text, without the library's encodings of all its
    words at once (about 100 bytes per character)."""
    pieces, start = [], 0
    while len(text) - start > LONG_TEXT and (m := SAFE_CUT.search(text, start + max(LONG_TEXT, 1))):
        pieces.append(np.asarray(tok.encode(text[start: m.start()], add_special_tokens=False).ids, np.int32))
        start = m.start()
    pieces.append(np.asarray(tok.encode(text[start:], add_special_tokens=False).ids, np.int32))
    return np.concatenate(pieces)


def cut(ids: np.ndarray, offsets: np.ndarray, max_len: int, truncate: str, with_counts: bool = False):
    """Texts' ids (text i is ids[offsets[i]:offsets[i+1]], offsets[0] = 0) cut to max_len from the head or the
    tail, as a TokenizedSplit; with `with_counts`, also each text's number of words before the cut."""
    lengths = np.diff(offsets)
    kept = np.minimum(lengths, max_len)
    # each text keeps the positions [offsets[i], offsets[i] + kept[i]) (head) or [offsets[i+1] - kept[i], offsets[i+1])
    position = np.arange(len(ids), dtype=np.int64)
    if truncate == "head":
        keep = position < np.repeat(offsets[:-1] + kept, lengths)
    else:
        keep = position >= np.repeat(offsets[1:] - kept, lengths)
    new_offsets = np.zeros_like(offsets)
    np.cumsum(kept, out=new_offsets[1:])
    n = len(offsets) - 1
    split = TokenizedSplit(ids[keep], new_offsets, np.zeros(n, np.int64), np.arange(n))
    return (split, lengths) if with_counts else split


@dataclass
class TokenizedSplit:
    """A split as flat arrays: review i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64, len n + 1
    labels: np.ndarray  # int64
    ids: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.labels)

    def relabel(self, labels, ids) -> "TokenizedSplit":
        return TokenizedSplit(self.tokens, self.offsets, np.asarray(labels, np.int64), np.asarray(ids, np.int64))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ids (len(idx), longest) and true lengths; an empty review keeps one <pad> token."""
        lengths = np.maximum(self.lengths[idx], 1)
        out = np.full((len(idx), int(lengths.max()) if len(idx) else 1), PAD_ID, dtype=np.int64)
        for row, i in enumerate(idx):
            seq = self.tokens[self.offsets[i]: self.offsets[i + 1]]
            out[row, : len(seq)] = seq
        return out, lengths

    ARRAYS = ("tokens", "offsets", "labels", "ids")

    def save(self, folder: Path, name: str) -> list[Path]:
        """One flat .npy file per array (`<name>.tokens.npy`, ...), which load() memory-maps."""
        paths = []
        for array in self.ARRAYS:
            paths.append(folder / f"{name}.{array}.npy")
            np.save(paths[-1], getattr(self, array))
        return paths

    @classmethod
    def load(cls, folder: Path, name: str) -> "TokenizedSplit":
        """Memory-mapped, read-only: the processes of a node share one copy in the page cache instead of each
        reading its own (10x IMDB's tokens are about 250 MB per copy)."""
        return cls(*(np.load(folder / f"{name}.{array}.npy", mmap_mode="r") for array in cls.ARRAYS))
