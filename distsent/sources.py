"""Data sources: find a data set (a folder or files in CSV, JSONL or parquet, an aclImdb folder, the hub), read and
check it, name its classes, and carve the splits.

Every reader returns texts and raw labels (integers or strings); `load_splits` then fixes the class names from the
training split (or data.label_names) and turns every label into its class index, naming the file and row of any
label it cannot place.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DataConfig

SPLITS = ("train", "validation", "test")
SPLIT_FILE_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
FORMATS = (".csv", ".jsonl", ".parquet")
BINARY_NAMES = ["negative", "positive"]  # integer labels 0/1 without names: the sentiment convention
DATA_PATH_ENV = "DISTSENT_DATA_PATH"


class DataError(ValueError):
    """The data is missing or malformed; the message names the file (and row) at fault."""


@dataclass
class Source:
    kind: str  # "files", "aclimdb" or "hub"
    location: str  # the folder, or the hub name
    files: dict[str, Path] = field(default_factory=dict)  # "files": split -> file (no validation: carved)

    def fingerprint(self) -> str:
        """Changes whenever the data files change (name, size, modification time), without reading them."""
        if self.kind == "hub":
            if not Path(self.location).is_dir():  # a hub name: its files are datasets' to keep
                return f"hub:{self.location}"
            # a local folder in the hub's layout (load_dataset reads those too): a changed file is new data
            paths = sorted(f for f in Path(self.location).rglob("*") if f.is_file())
        elif self.kind == "files":
            paths = [self.files[s] for s in SPLITS if s in self.files]
        else:  # folder stats change when files are added or removed
            paths = [Path(self.location) / s / lab for s in ("train", "test") for lab in ("pos", "neg")]
        h = hashlib.sha256(self.kind.encode())
        for f in paths:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()


def find_source(cfg: DataConfig) -> Source:
    """data.train_file (+ validation_file, test_file), else data.path (or $DISTSENT_DATA_PATH), else the hub."""
    if cfg.train_file or cfg.test_file or cfg.validation_file:
        named = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        for split in ("train", "test"):
            if not named[split]:
                raise DataError(f"data.{split}_file is not set: naming files one by one needs data.train_file and "
                                f"data.test_file (data.validation_file is optional)")
        files = {s: Path(p).expanduser() for s, p in named.items() if p}
        for split, path in files.items():
            if not path.is_file():
                raise DataError(f"data.{split}_file {path}: no such file")
            _check_format(path)
        return Source("files", str(files["train"].parent), files)
    path = cfg.path or os.environ.get(DATA_PATH_ENV, "")
    if not path:
        return Source("hub", cfg.hub_name)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path {root}: no such folder")
    files = {}
    for split, names in SPLIT_FILE_NAMES.items():
        found = [root / f"{n}{ext}" for n in names for ext in FORMATS if (root / f"{n}{ext}").is_file()]
        if len(found) > 1:
            raise DataError(f"data.path {root}: several {split} files ({', '.join(p.name for p in found)}); keep one")
        if found:
            files[split] = found[0]
    if files:
        for split in ("train", "test"):
            if split not in files:
                raise DataError(f"data.path {root}: no {split} file (expected {split}.csv, .jsonl or .parquet beside "
                                f"{', '.join(p.name for p in files.values())})")
        return Source("files", str(root), files)
    for candidate in (root, root / "aclImdb"):
        if (candidate / "train").is_dir() or (candidate / "test").is_dir():
            for s in ("train", "test"):
                for lab in ("pos", "neg"):
                    if not (candidate / s / lab).is_dir():
                        raise DataError(f"{candidate / s / lab}: missing (an aclImdb copy needs "
                                        f"{{train,test}}/{{pos,neg}}/*.txt)")
            return Source("aclimdb", str(candidate))
    raise DataError(f"data.path {root}: holds no train / test files (train.csv, test.csv, validation.csv; or .jsonl "
                    f"or .parquet) and no aclImdb folder (train/pos, train/neg, test/pos, test/neg)")


def _check_format(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: unknown file type {path.suffix!r} (use .csv, .jsonl or .parquet)")


@dataclass
class RawSplit:
    texts: object  # a pyarrow large_string array: 25,000 reviews are never copied into Python strings
    labels: np.ndarray  # as read (integers or strings); class indices (int64) after load_splits
    ids: np.ndarray  # int64, stable ids of the records within the split
    lines: np.ndarray | None = None  # each record's line in its file, for messages ("line 12"); None: "row i"

    def where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines is not None else f"row {i}"


def checked_split(texts, labels, where: str, lines: list[int] | None = None, labeled: bool = True) -> RawSplit:
    """A RawSplit from any sequence or Arrow array of texts, after checking that every text is a non-empty string.
    Unlabeled texts (to classify) may be empty or null: prediction answers each of those with an error of its own."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(texts) == 0:
        raise DataError(f"{where}: " + ("the split is empty" if labeled else "no records"))
    try:
        texts = pa.array(texts) if not isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{where}: the texts are not all strings ({exc})") from exc
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if pa.types.is_null(texts.type):  # every text null: Arrow cannot tell their type; each is reported below
        texts = texts.cast(pa.large_string())
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise DataError(f"{where}: the text column holds {texts.type}, expected strings")
    split = RawSplit(texts.cast(pa.large_string()), np.asarray(labels), np.arange(len(texts), dtype=np.int64),
                     None if lines is None else np.asarray(lines, dtype=np.int64))
    if not labeled:
        return split
    if texts.null_count:
        row = int(np.flatnonzero(texts.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: {split.where(row)} has no text (null)")
    blank = pc.match_substring_regex(texts, r"^\s*$").to_numpy(zero_copy_only=False)  # stops at a text's first word
    if blank.any():
        raise DataError(f"{where}: {split.where(int(np.flatnonzero(blank)[0]))} has an empty text")
    if len(split.labels) and split.labels.dtype == object and any(v is None for v in split.labels):
        row = next(i for i, v in enumerate(split.labels) if v is None)
        raise DataError(f"{where}: {split.where(row)} has no label")
    return split


def _missing_columns(where, present, cfg: DataConfig, labeled: bool = True) -> None:
    hint = "name the column with data.text_column / data.label_column, or --text-column / --label-column"
    for col in (cfg.text_column, cfg.label_column) if labeled else (cfg.text_column,):
        if col not in present:
            raise DataError(f"{where}: no '{col}' column (columns: {', '.join(present)}); {hint}")


def _utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 ({exc.reason} at byte {exc.start}); save the "
                        f"file as UTF-8") from None


def _read_csv(path: Path, cfg: DataConfig, labeled: bool = True) -> RawSplit:
    # strict: a stray quote is an error naming its line, not a field that swallows the rest of the file
    reader = csv.reader(io.StringIO(_utf8(path), newline=""), strict=True)
    header = next(reader, None)
    if not header:
        raise DataError(f"{path}: empty (expected a header row, e.g. text,label)")
    _missing_columns(path, header, cfg, labeled)
    ti = header.index(cfg.text_column)
    li = header.index(cfg.label_column) if labeled else None
    texts, labels, lines = [], [], []
    end = reader.line_num
    try:
        for record in reader:
            first, end = end + 1, reader.line_num  # a quoted text may run over several lines: name the first
            if not record:  # a blank line
                continue
            if len(record) != len(header):
                raise DataError(f"{path}: line {first} has {len(record)} fields, the header has "
                                f"{len(header)} (an unquoted comma or quote in a text?)")
            texts.append(record[ti])
            if labeled:
                labels.append(record[li])
            lines.append(first)
    except csv.Error as exc:
        raise DataError(f"{path}: line {end + 1}: {exc} (a quote left open, or followed by something other than a "
                        f"comma; inside a quoted text write a quote as \"\")") from None
    return checked_split(texts, _as_numbers(labels), str(path), lines, labeled)


def _read_jsonl(path: Path, cfg: DataConfig, labeled: bool = True) -> RawSplit:
    texts, labels, lines = [], [], []
    # lines end at \n, \r\n or \r only (a JSON string holds those escaped); str.splitlines() would also split at
    # U+2028 and other characters a JSON string may hold raw
    for n, line in enumerate(_utf8(path).replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {n} is not a JSON object")
        _missing_columns(f"{path}: line {n}", list(record), cfg, labeled)
        text = record[cfg.text_column]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}: line {n}: the text is {type(text).__name__}, expected a string")
        texts.append(text)
        if labeled:
            labels.append(record[cfg.label_column])
        lines.append(n)
    return checked_split(texts, _as_array(labels), str(path), lines, labeled)


def _read_parquet(path: Path, cfg: DataConfig, labeled: bool = True) -> RawSplit:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot be read as parquet: {exc}") from exc
    _missing_columns(path, table.column_names, cfg, labeled)
    if not labeled:
        return checked_split(table.column(cfg.text_column), [], str(path), labeled=False)
    labels = table.column(cfg.label_column)
    return checked_split(table.column(cfg.text_column), _as_array(labels.to_pylist()) if labels.null_count
                         else labels.to_numpy(zero_copy_only=False), str(path))


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def read_file(path: Path, cfg: DataConfig, labeled: bool = True) -> RawSplit:
    """One file (.csv, .jsonl or .parquet) with the configured text column and, if labeled, label column (else the
    RawSplit's labels are empty)."""
    path = Path(path)
    _check_format(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return READERS[path.suffix.lower()](path, cfg, labeled)


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
    return checked_split(texts, np.asarray(labels, np.int64), str(root / split))


def _hub_where(cfg: DataConfig, split: str) -> str:
    return f"hub dataset {cfg.hub_name}" + (f" ({cfg.hub_config})" if cfg.hub_config else "") + f" [{split}]"


def _read_hub(cfg: DataConfig, role: str) -> tuple[RawSplit, list[str] | None]:
    """The split of a hub data set that data.hub_{role}_split names, and its class names when the label column is a
    ClassLabel."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    # without the hub its retries print two warnings each for half a minute; the failure is reported in one line
    hub_logging.set_verbosity_error()
    split = getattr(cfg, f"hub_{role}_split")
    where = _hub_where(cfg, split)
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config or None, split=split)
    except ValueError as exc:  # datasets' word for a split or configuration the data set does not have
        raise DataError(f"{where}: {exc} (data.hub_config={cfg.hub_config!r}, "
                        f"data.hub_{role}_split={split!r})") from exc
    except Exception as exc:
        raise DataError(f"cannot load {where} from the Hugging Face hub ({exc}); on a machine without internet, "
                        f"point data.path or ${DATA_PATH_ENV} at a local copy") from exc
    _missing_columns(where, ds.column_names, cfg)
    names = getattr(ds.features[cfg.label_column], "names", None)
    table = ds.with_format("arrow")[:]
    return checked_split(table.column(cfg.text_column), table.column(cfg.label_column).to_numpy(), where), names


def _as_array(values: list) -> np.ndarray:
    """Labels as one numpy array: int64 when every label is an integer, else objects (strings, or bad values)."""
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, np.int64)
    return np.asarray(values, dtype=object)


def _as_numbers(values: list[str]) -> np.ndarray:
    """CSV labels are text: integers when every one reads as an integer, strings otherwise."""
    if values and all(re.fullmatch(r"\s*-?\d+\s*", v) for v in values):
        return np.asarray([int(v) for v in values], np.int64)
    return np.asarray(values, dtype=object)


def class_names(train: RawSplit, cfg: DataConfig, hub_names: list[str] | None, where: str) -> tuple[list[str], dict]:
    """The classes in their order, and the map from a label as written in the files to its class index.

    data.label_names names the classes (string labels are looked up by name, integer labels are indices into it);
    else a hub ClassLabel's names; else the sorted training labels, integer labels 0/1 being named negative and
    positive (the sentiment convention) and other integers by themselves."""
    values = train.labels.tolist()
    strings = train.labels.dtype == object
    if strings and not all(isinstance(v, str) for v in values):
        bad = next(i for i, v in enumerate(values) if not isinstance(v, str))
        raise DataError(f"{where}: {train.where(bad)} has label {values[bad]!r}; labels must be all integers or all "
                        f"strings")
    seen = sorted(set(values))
    if cfg.label_names or hub_names is not None:
        names = [str(n) for n in (cfg.label_names or hub_names)]
    elif not strings and set(seen) <= {0, 1}:
        names = list(BINARY_NAMES)
    else:
        names = [str(v) for v in seen]
    if len(set(names)) != len(names):
        raise DataError(f"data.label_names {names}: a name appears twice")
    if len(names) < 2:
        raise DataError(f"{where}: one class only ({names[0]!r}); a classifier needs two or more")
    return names, label_lookup(names, strings)


def label_lookup(names: list[str], strings: bool) -> dict:
    """Label as written -> class index: strings by name; integers as indices into `names`, or, where the names are
    themselves integers (classes named after integer labels), by value."""
    if strings:
        return {n: i for i, n in enumerate(names)}
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return {int(n): i for i, n in enumerate(names)}
    return {i: i for i in range(len(names))}


def encode_labels(split: RawSplit, names: list[str], lookup: dict, where: str) -> np.ndarray:
    """Class indices of a split's labels; DataError naming the first label that is not one of the classes."""
    out = np.empty(len(split.labels), np.int64)
    for i, key in enumerate(split.labels.tolist()):
        index = lookup.get(key)
        if index is None:
            raise DataError(f"{where}: {split.where(i)} has label {key!r}, which is not one of the classes {names} "
                            f"(they come from the training data, or data.label_names)")
        out[i] = index
    return out


def load_splits(cfg: DataConfig) -> tuple[dict[str, RawSplit], list[str]]:
    """train / val / test of the configured source with class indices as labels, and the class names."""
    src = find_source(cfg)
    raw, hub_names, where = {}, None, {}
    for split in SPLITS:
        if src.kind == "files":
            if split in src.files:
                raw[split], where[split] = read_file(src.files[split], cfg), str(src.files[split])
        elif src.kind == "aclimdb":
            if split != "validation":
                raw[split], where[split] = _read_aclimdb(Path(src.location), split), str(Path(src.location) / split)
        else:
            name = getattr(cfg, f"hub_{split}_split")
            if name:
                raw[split], hub_names = _read_hub(cfg, split)
                where[split] = _hub_where(cfg, name)
    names, lookup = class_names(raw["train"], cfg, hub_names, where["train"])
    for split, data in raw.items():
        data.labels = encode_labels(data, names, lookup, where[split])
    counts = np.bincount(raw["train"].labels, minlength=len(names))
    if not counts.all():
        missing = [names[i] for i in np.flatnonzero(counts == 0)]
        raise DataError(f"{where['train']}: no training example of class {', '.join(map(repr, missing))} "
                        f"(classes {names}); remove it from data.label_names or add examples")
    return carve(cfg, raw["train"], raw["test"], raw.get("validation")), names


def subset(split: RawSplit, idx: np.ndarray) -> RawSplit:
    return RawSplit(split.texts.take(idx), split.labels[idx], split.ids[idx])


def carve(cfg: DataConfig, train: RawSplit, test: RawSplit, val: RawSplit | None = None) -> dict[str, RawSplit]:
    """Apply the size limits and, without a validation file, hold out validation from train; seeded by
    data.split_seed."""
    rng = np.random.default_rng(cfg.split_seed)
    order = rng.permutation(len(train.texts))
    if cfg.limit:
        order = order[: cfg.limit]
    if val is not None:
        splits = {"val": val, "train": subset(train, np.sort(order))}
    else:
        n_val = max(1, int(round(len(order) * cfg.val_fraction)))
        if n_val >= len(order):
            raise DataError(f"data.val_fraction={cfg.val_fraction} leaves no training texts out of {len(order)}")
        splits = {"val": subset(train, np.sort(order[:n_val])), "train": subset(train, np.sort(order[n_val:]))}
    if cfg.test_limit and cfg.test_limit < len(test.texts):
        test = subset(test, np.sort(rng.permutation(len(test.texts))[: cfg.test_limit]))
    splits["test"] = test
    return splits
