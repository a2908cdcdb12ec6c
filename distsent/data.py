"""IMDB data: find and read the source, check it, build the vocabulary, tokenize once and cache the result."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig

log = logging.getLogger(__name__)

PAD, UNK = "<pad>", "<unk>"
PAD_ID = 0
SPLITS = ("train", "test")
DATA_PATH_ENV = "DISTSENT_DATA_PATH"
CACHE_ENV = "DISTSENT_CACHE"


class DataError(ValueError):
    """The data is missing or malformed; the message names the file (and row) at fault."""


# --- sources ---------------------------------------------------------------------------------------------------

@dataclass
class Source:
    kind: str  # "parquet", "aclimdb" or "hub"
    location: str

    def fingerprint(self) -> str:
        """Changes whenever the data files change (name, size, modification time), without reading them."""
        if self.kind == "hub":
            return f"hub:{self.location}"
        h = hashlib.sha256(f"{self.kind}:{Path(self.location).resolve()}".encode())
        for f in sorted(_source_files(self)):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()


def _source_files(src: Source) -> list[Path]:
    root = Path(src.location)
    if src.kind == "parquet":
        return [root / f"{s}.parquet" for s in SPLITS]
    return [root / s / lab for s in SPLITS for lab in ("pos", "neg")]  # folder stats change when files change


def find_source(cfg: DataConfig) -> Source:
    """Pick the source: data.path, else $DISTSENT_DATA_PATH, else the hub; a folder's kind is read off its files."""
    path = cfg.path or os.environ.get(DATA_PATH_ENV, "")
    if not path:
        return Source("hub", cfg.hub_name)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path {root}: no such folder")
    if any((root / f"{s}.parquet").exists() for s in SPLITS):
        for s in SPLITS:
            if not (root / f"{s}.parquet").is_file():
                raise DataError(f"{root / (s + '.parquet')}: missing (a parquet IMDB copy needs train.parquet "
                                f"and test.parquet)")
        return Source("parquet", str(root))
    for candidate in (root, root / "aclImdb"):
        if (candidate / "train").is_dir() or (candidate / "test").is_dir():
            for s in SPLITS:
                for lab in ("pos", "neg"):
                    if not (candidate / s / lab).is_dir():
                        raise DataError(f"{candidate / s / lab}: missing (an aclImdb copy needs "
                                        f"{{train,test}}/{{pos,neg}}/*.txt)")
            return Source("aclimdb", str(candidate))
    raise DataError(f"data.path {root}: holds neither train.parquet/test.parquet nor an aclImdb folder "
                    f"(train/pos, train/neg, test/pos, test/neg)")


@dataclass
class RawSplit:
    texts: object  # a pyarrow large_string array: 25,000 reviews are never copied into Python strings
    labels: np.ndarray  # int64, 0 = negative, 1 = positive
    ids: np.ndarray  # int64, stable ids of the records within the split


def checked_split(texts, labels, where: str) -> RawSplit:
    """A RawSplit from any sequence or Arrow array of texts, after checking texts and labels."""
    import pyarrow as pa

    if len(texts) == 0:
        raise DataError(f"{where}: the split is empty")
    try:
        texts = pa.array(texts) if not isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{where}: the texts are not all strings ({exc})") from exc
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise DataError(f"{where}: the text column holds {texts.type}, expected strings")
    if texts.null_count:
        row = int(np.flatnonzero(texts.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: row {row} has no text (null)")
    labels = np.asarray(labels)
    bad = np.flatnonzero(~np.isin(labels, (0, 1)))
    if bad.size:
        raise DataError(f"{where}: row {int(bad[0])} has label {labels[bad[0]].item()!r}; labels must be 0 or 1")
    return RawSplit(texts.cast(pa.large_string()), labels.astype(np.int64), np.arange(len(texts), dtype=np.int64))


def _read_parquet(path: Path) -> RawSplit:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot be read as parquet: {exc}") from exc
    for col in ("text", "label"):
        if col not in table.column_names:
            raise DataError(f"{path}: no '{col}' column (columns: {', '.join(table.column_names)})")
    return checked_split(table.column("text"), table.column("label").to_numpy(zero_copy_only=False), str(path))


def _read_aclimdb(root: Path, split: str) -> RawSplit:
    texts, labels = [], []
    for label, lab in ((0, "neg"), (1, "pos")):
        folder = root / split / lab

        def review_id(p: Path):
            head = p.stem.split("_")[0]
            return (int(head), p.name) if head.isdigit() else (1 << 62, p.name)

        for f in sorted(folder.glob("*.txt"), key=review_id):
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{f}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
            labels.append(label)
    return checked_split(texts, labels, str(root / split))


def _read_hub(name: str, split: str) -> RawSplit:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(f"cannot load {name!r} split {split!r} from the Hugging Face hub ({exc}); on a machine "
                        f"without internet, point data.path or ${DATA_PATH_ENV} at a local copy") from exc
    for col in ("text", "label"):
        if col not in ds.column_names:
            raise DataError(f"hub dataset {name} [{split}]: no '{col}' column")
    table = ds.with_format("arrow")[:]
    return checked_split(table.column("text"), table.column("label").to_numpy(), f"hub dataset {name} [{split}]")


def read_split(src: Source, split: str) -> RawSplit:
    if src.kind == "parquet":
        return _read_parquet(Path(src.location) / f"{split}.parquet")
    if src.kind == "aclimdb":
        return _read_aclimdb(Path(src.location), split)
    return _read_hub(src.location, split)


def subset(split: RawSplit, idx: np.ndarray) -> RawSplit:
    return RawSplit(split.texts.take(idx), split.labels[idx], split.ids[idx])


def carve(cfg: DataConfig, train: RawSplit, test: RawSplit) -> dict[str, RawSplit]:
    """Apply the size limits and hold out validation from train, all seeded by data.split_seed."""
    rng = np.random.default_rng(cfg.split_seed)
    order = rng.permutation(len(train.texts))
    if cfg.limit:
        order = order[: cfg.limit]
    n_val = max(1, int(round(len(order) * cfg.val_fraction)))
    if n_val >= len(order):
        raise DataError(f"data.val_fraction={cfg.val_fraction} leaves no training reviews out of {len(order)}")
    splits = {"val": subset(train, np.sort(order[:n_val])), "train": subset(train, np.sort(order[n_val:]))}
    if cfg.test_limit and cfg.test_limit < len(test.texts):
        test = subset(test, np.sort(rng.permutation(len(test.texts))[: cfg.test_limit]))
    splits["test"] = test
    return splits


# --- tokenizer ---------------------------------------------------------------------------------------------------
#
# The words are those of the reference pipeline (`re.findall(r"\b\w+\b", text.lower())`): runs of letters, digits
# and underscores. The bulk work (50,000 reviews) runs vectorized over the texts' UTF-8 bytes in numpy, split over
# the cores; the same rules are saved as a Hugging Face `tokenizer.json` (WordLevel) with this pattern, which
# prediction uses one review at a time. Both cut words identically (tested).
WORD_CLASS = r"\p{L}\p{N}_"  # a letter or a number of any script, or the underscore
NON_WORD = rf"[^{WORD_CLASS}]+"
HTML_BREAK = r"<br\s*/?>"

# Which ASCII bytes belong to words; bytes of other characters are classified per character (_word_bytes).
_ASCII_WORD = np.zeros(256, dtype=bool)
_ASCII_WORD[np.frombuffer(b"0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)] = True


def _word_chars(code_points: np.ndarray) -> np.ndarray:
    """Whether each code point is a word character, by the same regex engine (RE2) and Unicode tables as the
    pattern above: Python's own `unicodedata` can be older and miss recently assigned letters."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chars = pa.array([chr(c) for c in code_points.tolist()], pa.string())
    return pc.match_substring_regex(chars, rf"^[{WORD_CLASS}]$").to_numpy(zero_copy_only=False)


def _normalize(texts, lowercase: bool, strip_html: bool):
    import pyarrow.compute as pc

    if strip_html:
        texts = pc.replace_substring_regex(texts, HTML_BREAK, " ")
    return pc.utf8_lower(texts) if lowercase else texts


def _word_bytes(data: np.ndarray) -> np.ndarray:
    """For each byte of UTF-8 text, whether it is part of a word character.

    A regex over Unicode classes was the slowest step of data preparation; a byte table does the ASCII characters,
    and the few multi-byte characters are decoded and classified once per distinct code point.
    """
    word = _ASCII_WORD[data]
    lead = np.flatnonzero(data >= 0xC0)  # first bytes of multi-byte characters (continuations are 0x80-0xBF)
    if lead.size:
        b = [data[np.minimum(lead + k, len(data) - 1)].astype(np.int32) for k in range(4)]
        size = 2 + (b[0] >= 0xE0) + (b[0] >= 0xF0)
        tail = [x & 0x3F for x in b[1:]]
        code = np.where(size == 2, (b[0] & 0x1F) << 6 | tail[0],
                        np.where(size == 3, (b[0] & 0x0F) << 12 | tail[0] << 6 | tail[1],
                                 (b[0] & 0x07) << 18 | tail[0] << 12 | tail[1] << 6 | tail[2]))
        distinct, which = np.unique(code, return_inverse=True)
        is_word = _word_chars(distinct)[which]
        for k in range(4):  # the character's class covers all of its bytes
            has = size > k
            word[lead[has] + k] = is_word[has]
    return word


def _words_chunk(texts, lowercase: bool, strip_html: bool):
    """(flat words, words per text) for one Arrow chunk of texts."""
    import pyarrow as pa

    texts = _normalize(texts, lowercase, strip_html).cast(pa.large_string())
    _, offsets_buf, data_buf = texts.buffers()
    bounds = np.frombuffer(offsets_buf, np.int64)[texts.offset: texts.offset + len(texts) + 1]
    data = np.frombuffer(data_buf, np.uint8)[bounds[0]: bounds[-1]] if data_buf is not None else np.zeros(0, np.uint8)
    bounds = bounds - bounds[0]
    word = _word_bytes(data)
    # words start and end where the byte class changes; a text boundary inside a run of word bytes (text i ends
    # with a word, text i+1 starts with one) is both an end and a start, so words never join across texts
    padded = np.zeros(len(word) + 2, dtype=bool)
    padded[1:-1] = word
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # alternately a start and an end
    inner = np.unique(bounds[1:-1])  # empty texts repeat a boundary
    inner = inner[(inner > 0) & (inner < len(word))]
    joined = inner[word[inner - 1] & word[inner]]
    if joined.size:
        edges = np.insert(edges, np.searchsorted(edges, joined).repeat(2), joined.repeat(2))
    starts, ends = edges[0::2], edges[1::2]
    word_offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(ends - starts, out=word_offsets[1:])
    words = pa.Array.from_buffers(pa.large_string(), len(starts),
                                  [None, pa.py_buffer(word_offsets), pa.py_buffer(data[word])])
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


def index_words(texts, lowercase: bool = True, strip_html: bool = False):
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
        words, counts = _words_chunk(chunk, lowercase, strip_html)
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


def build_tokenizer(vocab_words: list[str], lowercase: bool, strip_html: bool):
    """A Hugging Face WordLevel tokenizer with <pad>=0, <unk>=1 and the given words, applying the same rules."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(vocab_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    steps = ([normalizers.Replace(Regex(HTML_BREAK), " ")] if strip_html else []) + (
        [normalizers.Lowercase()] if lowercase else [])
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(NON_WORD), behavior="removed")
    return tok


def vocabulary(distinct, counts: np.ndarray, min_freq: int) -> list[str]:
    """Words seen at least min_freq times, most frequent first, ties in alphabetical order."""
    keep = np.flatnonzero(counts >= min_freq)
    words = distinct.take(keep).to_pylist()
    order = sorted(range(len(keep)), key=lambda i: (-counts[keep[i]], words[i]))
    return [words[i] for i in order]


def train_tokenizer(texts, cfg: DataConfig):
    """The reference vocabulary of `texts`: words seen >= min_freq times (most frequent first), <pad>=0, <unk>=1."""
    distinct, index, _ = index_words(texts, cfg.lowercase, cfg.strip_html)
    counts = np.bincount(index, minlength=len(distinct))
    return build_tokenizer(vocabulary(distinct, counts, cfg.min_freq), cfg.lowercase, cfg.strip_html)


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a readable tokenizer.json ({exc})") from exc


def _tokenizer_rules(tok) -> tuple[bool, bool]:
    """(lowercase, strip_html) as saved in a tokenizer.json."""
    norm = json.loads(tok.to_str()).get("normalizer") or {}
    steps = norm.get("normalizers", [norm]) if norm else []
    return (any(s.get("type") == "Lowercase" for s in steps), any(s.get("type") == "Replace" for s in steps))


def encode(tok, texts: list[str], max_len: int, truncate: str, with_counts: bool = False):
    """Token ids of every text, cut to max_len from the head or the tail (no padding: batches pad themselves).

    With `with_counts`, also each text's number of words before the cut.
    """
    distinct, index, offsets = index_words(texts, *_tokenizer_rules(tok))
    return cut(_id_table(tok, distinct)[index], offsets, max_len, truncate, with_counts)


def _id_table(tok, distinct) -> np.ndarray:
    """The token id of each distinct word (<unk> for words outside the vocabulary)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    vocab = tok.get_vocab()
    by_id = sorted(vocab, key=vocab.get)
    index = pc.index_in(distinct, value_set=pa.array(by_id, pa.large_string()))
    return index.fill_null(vocab[UNK]).to_numpy().astype(np.int32)


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


# --- tokenized splits ------------------------------------------------------------------------------------------

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

    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, offsets=self.offsets, labels=self.labels, ids=self.ids)

    @classmethod
    def load(cls, path: Path) -> "TokenizedSplit":
        with np.load(path) as z:
            return cls(z["tokens"], z["offsets"], z["labels"], z["ids"])


@dataclass
class PreparedData:
    train: TokenizedSplit
    val: TokenizedSplit
    test: TokenizedSplit
    tokenizer: object
    cache_hit: bool


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/distsent"
    return Path(root).expanduser()


def _split_key(cfg: DataConfig, src: Source) -> str:
    parts = [src.fingerprint(), cfg.limit, cfg.test_limit, cfg.val_fraction, cfg.split_seed]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, tokenizer_path: Path | None = None) -> PreparedData:
    """Tokenized train/val/test, from the cache when the same data and tokenizer were prepared before.

    The vocabulary comes from the training split only. Pass `tokenizer_path` to reuse an existing tokenizer
    (a resumed run keeps its vocabulary); a new one is trained otherwise. Safe to call from several processes
    as long as one of them runs it first (the cache is written atomically).
    """
    src = find_source(cfg)
    split_dir = cache_root(cfg) / _split_key(cfg, src)
    tok_settings = {"min_freq": cfg.min_freq, "lowercase": cfg.lowercase, "strip_html": cfg.strip_html}
    tok_file = split_dir / f"tokenizer-{_hash(tok_settings)}.json"
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        tok_file = Path(tokenizer_path)
    def arrays_dir(tok_text: str) -> Path:  # token ids depend on the exact vocabulary and the cut
        return split_dir / f"tok-{_hash([tok_text, cfg.max_len, cfg.truncate])}"

    tok_text = tok_file.read_text() if tok_file.is_file() else None
    if tok_text and (arrays_dir(tok_text) / "done").is_file():
        cached = arrays_dir(tok_text)
        return PreparedData(*(TokenizedSplit.load(cached / f"{s}.npz") for s in ("train", "val", "test")),
                            tokenizer=load_tokenizer(tok_file), cache_hit=True)

    import pyarrow as pa

    raw = carve(cfg, read_split(src, "train"), read_split(src, "test"))
    names = ("train", "val", "test")
    # all three splits are cut into words and hashed together, once: the vocabulary counts the training part
    distinct, index, offsets = index_words(pa.concat_arrays([raw[n].texts for n in names]), cfg.lowercase,
                                           cfg.strip_html)
    bounds = np.cumsum([0] + [len(raw[n].labels) for n in names])
    if tok_text:
        tok = load_tokenizer(tok_file)
    else:
        counts = np.bincount(index[: offsets[bounds[1]]], minlength=len(distinct))
        tok = build_tokenizer(vocabulary(distinct, counts, cfg.min_freq), cfg.lowercase, cfg.strip_html)
        split_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(tok_file, tok.to_str())
        tok_text = tok_file.read_text()
    if _tokenizer_rules(tok) != (cfg.lowercase, cfg.strip_html):
        raise DataError(f"{tok_file}: its rules (lowercase, strip_html) = {_tokenizer_rules(tok)} differ from the "
                        f"config's data.lowercase={cfg.lowercase}, data.strip_html={cfg.strip_html}")
    ids = _id_table(tok, distinct)[index]
    out = {}
    for name, a, b in zip(names, bounds[:-1], bounds[1:]):
        first, last = offsets[a], offsets[b]
        out[name] = cut(ids[first:last], offsets[a: b + 1] - first, cfg.max_len, cfg.truncate).relabel(
            raw[name].labels, raw[name].ids)
    final = arrays_dir(tok_text)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, split in out.items():
        split.save(tmp / f"{name}.npz")
    (tmp / "done").write_text("")
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same cache first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(out["train"], out["val"], out["test"], tokenizer=tok, cache_hit=False)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
