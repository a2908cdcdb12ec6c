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
# and underscores. The bulk work (50,000 reviews) runs vectorized in Arrow's C++ kernels, split over the cores; the
# same rules are saved as a Hugging Face `tokenizer.json` (WordLevel), which prediction uses one review at a time.
# Both read this pattern with Unicode classes, so they cut words identically (tested).
NON_WORD = r"[^\p{L}\p{N}_]+"
HTML_BREAK = r"<br\s*/?>"


def _normalize(texts, lowercase: bool, strip_html: bool):
    import pyarrow.compute as pc

    if strip_html:
        texts = pc.replace_substring_regex(texts, HTML_BREAK, " ")
    return pc.utf8_lower(texts) if lowercase else texts


def _words_chunk(texts, lowercase: bool, strip_html: bool):
    """(flat words, words per text) for one Arrow chunk of texts."""
    import pyarrow.compute as pc

    parts = pc.split_pattern_regex(_normalize(texts, lowercase, strip_html), NON_WORD)
    flat = parts.flatten()
    keep = pc.greater(pc.binary_length(flat), 0)  # separators at either end leave empty strings
    owner = pc.list_parent_indices(parts).to_numpy()[keep.to_numpy(zero_copy_only=False)]
    return flat.filter(keep), np.bincount(owner, minlength=len(texts))


def split_words(texts, lowercase: bool = True, strip_html: bool = False):
    """All words of all texts (a list or an Arrow array) as one Arrow string array, plus offsets: text i is
    words[offsets[i]:offsets[i+1]]."""
    import pyarrow as pa
    from concurrent.futures import ThreadPoolExecutor

    if not isinstance(texts, pa.Array):
        texts = pa.array(texts, type=pa.large_string())
    n = len(texts)
    workers = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, n // 2000 or 1))
    bounds = np.linspace(0, n, workers + 1).astype(int)
    chunks = [texts.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(workers) as pool:  # Arrow kernels release the GIL
        results = list(pool.map(lambda c: _words_chunk(c, lowercase, strip_html), chunks))
    words = pa.concat_arrays([w.cast(pa.large_string()) for w, _ in results]) if results else pa.array([], pa.large_string())
    counts = np.concatenate([c for _, c in results]) if results else np.zeros(0, np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return words, offsets


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


def train_tokenizer(texts, cfg: DataConfig, words=None):
    """The reference vocabulary: words seen >= min_freq times in `texts` (most frequent first), <pad>=0, <unk>=1.
    Pass `words` (from split_words) when the texts were already split."""
    import pyarrow.compute as pc

    if words is None:
        words, _ = split_words(texts, cfg.lowercase, cfg.strip_html)
    counts = pc.value_counts(words)
    values, freq = counts.field("values").to_pylist(), counts.field("counts").to_numpy()
    order = sorted((i for i in range(len(values)) if freq[i] >= cfg.min_freq), key=lambda i: (-freq[i], values[i]))
    return build_tokenizer([values[i] for i in order], cfg.lowercase, cfg.strip_html)


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
    return numericalize(tok, *split_words(texts, *_tokenizer_rules(tok)), max_len, truncate, with_counts)


def numericalize(tok, words, offsets: np.ndarray, max_len: int, truncate: str, with_counts: bool = False):
    """encode() for texts already split into words."""
    import pyarrow as pa
    import pyarrow.compute as pc

    vocab = tok.get_vocab()
    by_id = sorted(vocab, key=vocab.get)
    index = pc.index_in(words, value_set=pa.array(by_id, pa.large_string()))
    ids = index.fill_null(vocab[UNK]).to_numpy().astype(np.int32)
    lengths = np.diff(offsets)
    kept = np.minimum(lengths, max_len)
    pos = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)  # position of each word within its text
    keep = pos < max_len if truncate == "head" else pos >= np.repeat(lengths - kept, lengths)
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

    raw = carve(cfg, read_split(src, "train"), read_split(src, "test"))
    train_words = split_words(raw["train"].texts, cfg.lowercase, cfg.strip_html)  # once: vocabulary and ids
    tok = load_tokenizer(tok_file) if tok_text else train_tokenizer(None, cfg, words=train_words[0])
    if not tok_text:
        split_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(tok_file, tok.to_str())
        tok_text = tok_file.read_text()
    if _tokenizer_rules(tok) != (cfg.lowercase, cfg.strip_html):
        raise DataError(f"{tok_file}: its rules (lowercase, strip_html) = {_tokenizer_rules(tok)} differ from the "
                        f"config's data.lowercase={cfg.lowercase}, data.strip_html={cfg.strip_html}")
    out = {"train": numericalize(tok, *train_words, cfg.max_len, cfg.truncate)}
    out.update({name: encode(tok, raw[name].texts, cfg.max_len, cfg.truncate) for name in ("val", "test")})
    out = {name: split.relabel(raw[name].labels, raw[name].ids) for name, split in out.items()}
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
