"""Data sources: find a data set (a folder or files in CSV, JSONL or parquet, an aclImdb folder, the hub), read it,
name its classes, and carve the splits.

Every reader (readers.py for the file formats) returns texts and raw labels (integers or strings); `load_splits`
then fixes the class names from the training split (or data.label_names) and turns every label into its class index
(labels.py), naming the file and row of any label it cannot place.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .config import DataConfig
from .files import sha256_file
from .labels import class_names, encode_labels, integers_are_positions, label_lookup, read_class_labels
from .readers import FORMATS, check_format, read_file
from .records import DataError, RawSplit, checked_split, label_array, label_type_check, missing_columns, warn_once

SPLITS = ("train", "validation", "test")
SPLIT_FILE_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
DATA_PATH_ENV = "DISTSENT_DATA_PATH"


@dataclass
class Source:
    kind: str  # "files", "aclimdb" or "hub"
    location: str  # the folder, or the hub name
    files: dict[str, Path] = field(default_factory=dict)  # "files": split -> file (no validation: carved)

    def fingerprint(self) -> str:
        """Changes whenever the data files change: their names and contents (sha256 reads about 1.7 GB/s: 0.02 s for
        IMDB's parquet), so an edit that keeps a file's size and times (an image file system built with fixed
        times) is new data, and a copy of the same bytes (cp, rsync) is not; an aclImdb folder's 50,000 reviews
        by their names and `_stamp`s."""
        if self.kind == "hub":
            if not Path(self.location).is_dir():  # a hub name: its files are datasets' to keep
                return f"hub:{self.location}"
            # a local folder in the hub's layout (load_dataset reads those too): a changed file is new data (not
            # .git/ and the like: a clone's history, read by no one)
            root = Path(self.location)
            paths = sorted(f for f in root.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(root).parts))
        elif self.kind == "files":
            paths = [self.files[s] for s in SPLITS if s in self.files]
        else:
            return self._review_files_fingerprint()
        h = hashlib.sha256(self.kind.encode())
        for f in paths:
            try:
                h.update(f"{f.resolve()}:{sha256_file(f)};".encode())
            except OSError as exc:
                raise DataError(f"{f}: cannot be read ({exc.strerror or exc})") from None
        return h.hexdigest()

    def place(self) -> dict:
        """Where the data lies, whatever its content: the same for every version of edited files (their fingerprint
        differs), different for other files. A hub name's data is datasets' to keep: it has none."""
        if self.kind == "hub" and not Path(self.location).is_dir():
            return {}
        return {"kind": self.kind, "location": str(Path(self.location).resolve()),
                "files": {s: str(p.resolve()) for s, p in self.files.items()}}

    def _review_files_fingerprint(self) -> str:
        """aclImdb: every review file's name, size and modification time (rewriting a file in place changes no
        folder's); os.scandir, as 50,000 Path.stat() and resolve() calls take seconds."""
        root = Path(self.location).resolve()
        h = hashlib.sha256(f"aclimdb:{root}".encode())
        for folder in (f"{s}/{lab}" for s in ("train", "test") for lab in ("pos", "neg")):
            with os.scandir(root / folder) as entries:
                stats = sorted((e.name, _stamp(e.stat())) for e in entries if e.name.endswith(".txt"))
            h.update(f"{folder}:{stats}".encode())
        return h.hexdigest()


def located(cfg: DataConfig) -> DataConfig:
    """The data settings with the data's place written out: absolute paths, and $DISTSENT_DATA_PATH as data.path. A
    model folder keeps these, so that `distsent-evaluate --split` reads the data the model was trained on from any
    directory and environment."""
    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve()) if p else p

    hub = absolute(cfg.hub_name) if cfg.hub_name and Path(cfg.hub_name).expanduser().is_dir() else cfg.hub_name
    return replace(cfg, path=absolute(data_path(cfg)), hub_name=hub,
                   train_file=absolute(cfg.train_file), validation_file=absolute(cfg.validation_file),
                   test_file=absolute(cfg.test_file))


def data_path(cfg: DataConfig) -> str:
    """data.path, else $DISTSENT_DATA_PATH where it stands for the default hub data set (IMDB's local copy): a
    config that names another hub data set (configs/emotion.yaml) is not silently trained on that copy."""
    env = os.environ.get(DATA_PATH_ENV, "")
    if cfg.path or not env or cfg.train_file or cfg.validation_file or cfg.test_file:  # files named: no folder
        return cfg.path
    if cfg.hub_name not in (DataConfig.hub_name, "imdb"):  # "imdb": the hub's older name for it
        warn_once("$%s (%s) is ignored: it stands for %s, and this config reads %s; give data.path=DIR to read a "
                  "local copy of that", DATA_PATH_ENV, env, DataConfig.hub_name, cfg.hub_name)
        return ""
    return env


def _stamp(st: os.stat_result) -> str:
    """What changes when a file's content may have: its size, its modification time, and the inode change time and
    inode number too, which a copy that keeps the modification time (cp -p, rsync -a, touch -r) does not keep."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def folder_files(root: Path, name: str) -> dict[str, Path]:
    """The train / validation / test files in folder `root` (named by the setting `name`), by split."""
    files = {}
    try:
        listing = sorted(root.iterdir())
    except OSError:  # a folder that may be entered but not listed: the names as written here only
        listing = [root / f"{n}{ext}" for names in SPLIT_FILE_NAMES.values() for n in names for ext in FORMATS]
    present: dict[str, list[Path]] = {}  # by lower-case name: train.CSV and Train.csv are train.csv too
    for p in listing:
        present.setdefault(p.name.lower(), []).append(p)
    for split, names in SPLIT_FILE_NAMES.items():
        named = [p for n in names for ext in FORMATS for p in present.get(f"{n}{ext}", [])]
        found = [p for p in named if p.is_file()]
        if len(found) > 1:
            raise DataError(f"{name} {root}: several {split} files ({', '.join(p.name for p in found)}); keep one")
        if found:
            files[split] = found[0]
        elif odd := next((p for p in named if p.is_dir() or not p.exists() and p.is_symlink()), None):
            raise DataError(f"{odd}: " + ("a folder, not a file (data written in parts, as Spark writes it, is "
                                          "not read: write one file per split)" if odd.is_dir() else
                                          f"a broken symbolic link (to {os.readlink(odd)})"))
    return files


def find_source(cfg: DataConfig) -> Source:
    """data.train_file (+ validation_file, test_file), else data.path (or $DISTSENT_DATA_PATH), else the hub."""
    if cfg.train_file or cfg.test_file or cfg.validation_file:
        named = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        if cfg.path:  # a folder, and some files by name: which is meant? (the folder was silently ignored)
            given = ", ".join(f"data.{s}_file" for s, p in named.items() if p)
            raise DataError(f"data.path and {given} are set: they are two ways to name the data (a folder of "
                            f"train / test files, or each file by name, data.train_file and data.test_file at "
                            f"least); use one")
        for split in ("train", "test"):
            if not named[split]:
                raise DataError(f"data.{split}_file is not set: naming files one by one needs data.train_file and "
                                f"data.test_file (data.validation_file is optional)")
        files = {s: Path(p).expanduser() for s, p in named.items() if p}
        for split, path in files.items():
            if not path.is_file():
                raise DataError(f"data.{split}_file {path}: " + ("a folder, not a file (data.path names a folder of "
                                                                 "train / test files)" if path.is_dir() else
                                                                 "no such file" + ("" if path.is_absolute() else
                                                                                   f" ({path.absolute()})")))
            check_format(path)
        _warn_reused(files, "data.{}_file")
        return Source("files", str(files["train"].parent), files)
    path = data_path(cfg)
    if not path:
        splits = {s: getattr(cfg, f"hub_{s}_split") for s in SPLITS if getattr(cfg, f"hub_{s}_split")}
        _warn_reused(splits, "data.hub_{}_split", splits)
        return Source("hub", cfg.hub_name)
    root = Path(path).expanduser()
    name = "data.path" if cfg.path else f"${DATA_PATH_ENV}"  # the setting that named it
    if root.is_file():
        raise DataError(f"{name} {root} is a file; data.path names a folder of train / test files, "
                        f"data.train_file and data.test_file name files one by one")
    if not root.is_dir():  # a relative path is read from the working directory (a Slurm job's may be elsewhere)
        raise DataError(f"{name} {root}: no such folder" + ("" if root.is_absolute() else f" ({root.absolute()})"))
    if files := folder_files(root, name):
        for split in ("train", "test"):
            if split not in files:
                raise DataError(f"{name} {root}: no {split} file (expected {split}.csv, .jsonl or .parquet beside "
                                f"{', '.join(p.name for p in files.values())})")
        _warn_reused(files, "the {} file")  # links to one file, say
        return Source("files", str(root), files)
    for candidate in (root, root / "aclImdb"):
        if (candidate / "train").is_dir() or (candidate / "test").is_dir():
            for s in ("train", "test"):
                for lab in ("pos", "neg"):
                    if not (candidate / s / lab).is_dir():
                        raise DataError(f"{candidate / s / lab}: missing (an aclImdb copy needs "
                                        f"{{train,test}}/{{pos,neg}}/*.txt)")
            return Source("aclimdb", str(candidate))
    raise DataError(f"{name} {root}: holds no train / test files (train.csv, test.csv, validation.csv; or .jsonl "
                    f"or .parquet) and no aclImdb folder (train/pos, train/neg, test/pos, test/neg)")


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
            if not texts[-1].strip():  # named here: checked_split could only give its row among all the split's
                raise DataError(f"{f}: an empty review")
            labels.append(label)
    return checked_split(texts, np.asarray(labels, np.int64), str(root / split))


def _hub_where(cfg: DataConfig, split: str) -> str:
    return f"hub dataset {cfg.hub_name}" + (f" ({cfg.hub_config})" if cfg.hub_config else "") + f" [{split}]"


def _read_hub(cfg: DataConfig, role: str) -> RawSplit:
    """The split of a hub data set that data.hub_{role}_split names, with its ClassLabel's names if it has one."""
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
        if Path(cfg.hub_name).expanduser().is_dir():  # a local folder: its files are at fault, not the network
            cause = f": {exc.__cause__}" if exc.__cause__ else ""
            raise DataError(f"cannot read {where} ({exc}{cause}); data.path=DIR (the folder holding the train / "
                            f"test files) reads them with distsent's own readers, which name the file and line at "
                            f"fault") from exc
        local = f"data.path (or ${DATA_PATH_ENV})" if cfg.hub_name == DataConfig.hub_name else "data.path"
        raise DataError(f"cannot load {where} from the Hugging Face hub ({exc}); on a machine without internet, "
                        f"point {local} at a local copy") from exc
    missing_columns(where, ds.column_names, cfg)
    table = ds.with_format("arrow")[:]
    labels = table.column(cfg.label_column)
    label_type_check(where, cfg.label_column, labels.type)
    # with nulls, numpy would make the integers floats and the nulls NaN: Python values, each checked (None: no label)
    labels = labels.to_numpy() if not labels.null_count else label_array(labels.to_pylist(), where)
    split = checked_split(table.column(cfg.text_column), labels, where)
    if np.issubdtype(split.labels.dtype, np.integer):
        split.class_label = getattr(ds.features[cfg.label_column], "names", None)
    return split


def load_splits(cfg: DataConfig) -> tuple[dict[str, RawSplit], list[str]]:
    """train / val / test of the configured source with class indices as labels, and the class names."""
    src = find_source(cfg)
    raw, where = {}, {}
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
                raw[split], where[split] = _read_hub(cfg, split), _hub_where(cfg, name)
    names = class_names(raw["train"], cfg, read_class_labels(raw, where), where["train"])
    # one lookup for every file: integer labels in train.csv and the same written as strings in test.jsonl
    lookup = label_lookup(names, integers_are_positions(names, bool(cfg.label_names), class_label=False))
    for split, data in raw.items():
        data.labels = encode_labels(data, names, lookup, where[split])
    splits = carve(cfg, raw["train"], raw["test"], raw.get("validation"))
    counts = np.bincount(splits["train"].labels, minlength=len(names))
    if not counts.all():
        missing = np.flatnonzero(counts == 0)
        listed = ", ".join(repr(names[i]) for i in missing)
        if np.bincount(raw["train"].labels, minlength=len(names))[missing].all():  # in the file, not in the part kept
            cuts = [f"data.limit={cfg.limit}"] * bool(cfg.limit) + [
                f"the validation carve (data.val_fraction={cfg.val_fraction})"] * ("validation" not in raw)
            cut = f"{' and '.join(cuts)}, with data.split_seed={cfg.split_seed}"
            stratify = "" if cfg.stratify else " (data.stratify=true keeps each class in its share)"
            raise DataError(f"{where['train']}: no training example of class {listed} is left after {cut}; add "
                            f"examples or change those settings{stratify}")
        fix = "remove it from data.label_names" if cfg.label_names else \
            "list the classes to train in data.label_names (the data's ClassLabel names it)"
        raise DataError(f"{where['train']}: no training example of class {listed} (classes {names}); {fix}, or add "
                        f"examples")
    return splits, names


def _warn_reused(shown: dict, role: str, same: dict | None = None) -> None:
    """One file (or hub split) playing two parts, `same` telling them apart (default: the files' real paths);
    `role`: how a split's data is named. The scores it gives would measure nothing."""
    same = same or {s: p.resolve() for s, p in shown.items()}
    for held_out in ("validation", "test"):
        if same.get(held_out) == same["train"]:
            warn_once("%s (%s) is also the training data: its scores are on data the model trained on",
                      role.format(held_out), shown[held_out])
    if "validation" in same and same["validation"] == same["test"]:
        warn_once("%s (%s) is also the test data: the model is chosen on the data it is tested on",
                  role.format("validation"), shown["validation"])


def subset(split: RawSplit, idx: np.ndarray) -> RawSplit:
    return RawSplit(split.texts.take(idx), split.labels[idx], split.ids[idx])


def stratified(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`order` rearranged so that every prefix holds each class in about its share: the k-th of a class's n texts
    (in `order`) goes to (k + 1/2) / n of the way, ties in `order`'s own (random) order."""
    by_label = labels[order]
    counts = np.bincount(by_label)
    rank = np.empty(len(order))
    rank[np.argsort(by_label, kind="stable")] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    return order[np.argsort((rank + 0.5) / counts[by_label], kind="stable")]


def records_digest(split) -> str:
    """Which records a tokenized split holds, with their classes and token ids: a model folder keeps its validation
    split's, so that `distsent-evaluate --split val` can tell the split it reads now from the one the model was
    chosen on (the same rows reordered or replaced in a training file change the carve's texts, not its rows)."""
    digest = hashlib.sha256(f"{len(split.ids)} {len(split.tokens)}".encode())
    for array, dtype in ((split.ids, np.int64), (split.labels, np.int64), (split.tokens, np.int32),
                         (split.lengths, np.int64)):
        digest.update(np.ascontiguousarray(array, dtype).tobytes())
    return digest.hexdigest()[:16]


def carve(cfg: DataConfig, train: RawSplit, test: RawSplit, val: RawSplit | None = None) -> dict[str, RawSplit]:
    """Apply the size limits and, without a validation file, hold out validation from train; seeded by
    data.split_seed (the test subset of data.test_limit by a seed of its own)."""
    rng = np.random.default_rng(cfg.split_seed)
    order = rng.permutation(len(train.texts))
    if cfg.stratify:
        order = stratified(order, train.labels)
    if cfg.limit:
        order = order[: cfg.limit]
    if val is not None:
        splits = {"val": val, "train": subset(train, np.sort(order))}
    else:
        n_val = max(1, int(round(len(order) * cfg.val_fraction)))
        if n_val >= len(order):
            limited = cfg.limit and cfg.limit < len(train.texts)  # the limit cut some: it is the one to raise
            kept = f"the {len(order)} kept by data.limit={cfg.limit}" if limited else f"its {len(order)}"
            raise DataError(f"the training data: holding out data.val_fraction={cfg.val_fraction} of {kept} for "
                            f"validation leaves none to train on; " + ("raise data.limit" if limited else
                                                                      "give more texts") +
                            ", lower data.val_fraction, or give a validation file")
        splits = {"val": subset(train, np.sort(order[:n_val])), "train": subset(train, np.sort(order[n_val:]))}
    if cfg.test_limit and cfg.test_limit < len(test.texts):  # the same test texts whatever the other settings:
        # runs of other seeds, carves or training sizes are scored alike
        test = subset(test, np.sort(np.random.default_rng(0).permutation(len(test.texts))[: cfg.test_limit]))
    splits["test"] = test
    return splits
