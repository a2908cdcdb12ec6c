"""Data sources: find a data set (local parquet, an aclImdb folder, the hub, a labeled file), read and check it,
and carve the splits."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig

SPLITS = ("train", "test")
DATA_PATH_ENV = "DISTSENT_DATA_PATH"


class DataError(ValueError):
    """The data is missing or malformed; the message names the file (and row) at fault."""


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


def read_labeled_file(path: Path) -> RawSplit:
    """A file of labeled reviews: .parquet, .jsonl or .csv with `text` and `label` (0/1) columns."""
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet as pq

    readers = {".parquet": pq.read_table, ".jsonl": pyarrow.json.read_json, ".csv": pyarrow.csv.read_csv}
    if path.suffix not in readers:
        raise DataError(f"{path}: unknown file type {path.suffix!r} (use .parquet, .jsonl or .csv)")
    try:
        table = readers[path.suffix](path)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    for col in ("text", "label"):
        if col not in table.column_names:
            raise DataError(f"{path}: no '{col}' column (columns: {', '.join(table.column_names)})")
    return checked_split(table.column("text"), table.column("label").to_numpy(), str(path))
