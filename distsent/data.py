"""The token cache: each data set prepared once (split, vocabulary, ids) and stored for every later run."""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import files
from .config import DataConfig
from .records import DataError
from .sources import find_source, load_splits
from .tokenizer import (RULES, TokenizedSplit, build_tokenizer, cut, index_words, load_tokenizer, text_rules,
                        tokenizer_rules, vocabulary, word_ids)

log = logging.getLogger(__name__)

CACHE_ENV = "DISTSENT_CACHE"
SPLIT_NAMES = ("train", "val", "test")
# flat .npy arrays and the class names; npy-2: labels read by the stricter rules of records.py (stripped, an empty
# one refused); npy-3: an integer label beside classes named after the training file's strings is the class written
# like it (it was the class at its position); npy-4: a CSV label with a leading zero is a string ("01" was class
# "1"); npy-5: a parquet file's ClassLabel names its classes (they were named after its integers); npy-6: a hub
# ClassLabel's integers are its names also with data.label_names (they were positions in it); npy-7: a parquet
# ClassLabel's classes are all its names (a class without examples was dropped); npy-8: data.test_limit's subset
# drawn apart from the carve; so entries prepared by earlier rules are prepared again (left alone)
CACHE_LAYOUT = "npy-8"
SOURCE_FILE = "source.json"  # in each split folder: where its data lies and which version (_note_earlier_versions)
TMP_MARK = ".tmp"  # an entry being written: <entry>.tmp<pid>-<random>


@dataclass
class PreparedData:
    train: TokenizedSplit
    val: TokenizedSplit
    test: TokenizedSplit
    tokenizer: object
    cache_hit: bool
    label_names: list[str]  # class i is label_names[i]
    content: str = ""  # what the model learns from and is selected on: see training_content()

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def wordless_warning(self, symbols: bool) -> str | None:
        """Texts left without a token (emoji or punctuation alone, with data.symbols off): the model reads them as
        empty, which bad-data checks cannot see (the text is not empty)."""
        counts = {name: int((getattr(self, name).lengths == 0).sum()) for name in ("train", "val", "test")}
        if not any(counts.values()):
            return None
        held = "spaces or marks" if symbols else "symbols, spaces or marks"
        hint = "" if symbols else "; data.symbols=true keeps punctuation and emoji as tokens"
        return (", ".join(f"{n} of the {len(getattr(self, s))} {s}" for s, n in counts.items() if n) +
                f" texts keep no token (they hold nothing but {held}): the model reads them as empty{hint}")


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/distsent"
    return Path(root).expanduser()


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def training_content(manifest: dict) -> str:
    """A digest of the train and validation token arrays (ids, lengths, labels, record ids) and the class names,
    from the token cache's checksums: the same data gives the same digest wherever it lies and whenever it was
    prepared; an edited text or label changes it. The test split is left out (evaluated once, at the end)."""
    arrays = {name: meta["sha256"] for name, meta in manifest["files"].items() if name.startswith(("train.", "val."))}
    return _hash([arrays, manifest["label_names"]])


def _load_cached(folder: Path) -> tuple[list[TokenizedSplit], dict] | None:
    """The cached splits of `folder` and its manifest (class names, checksums), or None if absent; a damaged entry
    is reported, removed and rebuilt. One that cannot be read (no permission, too many open files) is not damaged:
    it may be another user's, or memory-mapped by other runs, and is left as it is (DataError)."""
    if not folder.is_dir():
        return None
    try:
        manifest = files.verify(folder, required=tuple(f"{s}.{a}.npy" for s in SPLIT_NAMES
                                                       for a in TokenizedSplit.ARRAYS))
        if not isinstance(manifest.get("label_names"), list):
            raise files.IntegrityError(f"{folder / files.MANIFEST}: no class names")
        return [TokenizedSplit.load(folder, s) for s in SPLIT_NAMES], manifest
    except (files.IntegrityError, ValueError, KeyError, EOFError) as exc:  # a missing, cut or altered file
        log.warning("token cache entry damaged, rebuilding it: %s", exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) or exc.errno == errno.ESTALE:
            # removed or replaced while this run read it (another run rebuilding it, a shared filesystem's node
            # replacing it): prepared again; what is there now is the other run's, and stays
            log.warning("token cache entry changed while it was read, preparing the data again: %s", exc)
            return None
        raise DataError(f"token cache {folder}: cannot be read ({exc}); name another cache folder with data.cache_dir "
                        f"or ${CACHE_ENV}") from None


def prepare(cfg: DataConfig, tokenizer_path: Path | None = None) -> PreparedData:
    """Tokenized train/val/test, from the cache when the same data and tokenizer were prepared before.

    The cache has one folder per stage: the split (source files and carving settings) holds one tokenizer per
    vocabulary setting, and one id folder per (tokenizer, cut). The vocabulary comes from the training split only.
    Pass `tokenizer_path` to reuse an existing tokenizer (a resumed run keeps its vocabulary); a new one is trained
    otherwise. Safe to call from several processes as long as one of them runs it first (writes are atomic).
    """
    src = find_source(cfg)
    fingerprint = src.fingerprint()
    split_dir = cache_root(cfg) / _hash([fingerprint, cfg.stage_settings("split")])
    given = tokenizer_path is not None and Path(tokenizer_path).is_file()
    tok_file = Path(tokenizer_path) if given else split_dir / f"tokenizer-{_hash(cfg.stage_settings('vocab'))}.json"

    def ids_dir(tok_text: str) -> Path:  # token ids depend on the exact vocabulary, the cut and the file layout
        return split_dir / f"tok-{_hash([tok_text, cfg.stage_settings('cut'), CACHE_LAYOUT])}"

    tok_text = tok_file.read_text(encoding="utf-8") if given else _cached_tokenizer(tok_file)
    cached = _load_cached(ids_dir(tok_text)) if tok_text else None
    if cached:
        splits, manifest = cached
        return PreparedData(*splits, tokenizer=_load_checked(tok_file, cfg), cache_hit=True,
                            label_names=manifest["label_names"], content=training_content(manifest))

    import pyarrow as pa

    raw, names = load_splits(cfg)
    # all three splits are cut into words and hashed together, once: the vocabulary counts the training part
    distinct, index, offsets = index_words(pa.concat_arrays([raw[n].texts for n in SPLIT_NAMES]), *text_rules(cfg))
    bounds = np.cumsum([0] + [len(raw[n].labels) for n in SPLIT_NAMES])
    if tok_text:
        tok = _load_checked(tok_file, cfg)
    else:
        counts = np.bincount(index[: offsets[bounds[1]]], minlength=len(distinct))
        tok = build_tokenizer(vocabulary(distinct, counts, cfg.min_freq), *text_rules(cfg))
        with _cache_writes(), files.writing(split_dir):
            split_dir.mkdir(parents=True, exist_ok=True)
            files.atomic_write(tok_file, tok.to_str())
        tok_text = tok_file.read_text(encoding="utf-8")
    ids = word_ids(tok, distinct)[index]
    out = {}
    for name, a, b in zip(SPLIT_NAMES, bounds[:-1], bounds[1:]):
        first, last = offsets[a], offsets[b]
        out[name] = cut(ids[first:last], offsets[a: b + 1] - first, cfg.max_len, cfg.truncate).relabel(
            raw[name].labels, raw[name].ids)
    with _cache_writes():
        manifest = _store(ids_dir(tok_text), out, names)
    _note_earlier_versions(cache_root(cfg), split_dir, src.place(), fingerprint)
    return PreparedData(out["train"], out["val"], out["test"], tokenizer=tok, cache_hit=False, label_names=names,
                        content=training_content(manifest))


@contextlib.contextmanager
def _cache_writes():
    """A cache write that fails (a full disk, a read-only cache) says where another cache folder can be named."""
    try:
        yield
    except files.WriteError as exc:
        raise files.WriteError(exc.errno, f"{exc} (the token cache: data.cache_dir or ${CACHE_ENV} names another "
                               "folder)") from exc


def _cached_tokenizer(tok_file: Path) -> str | None:
    """The cache's tokenizer.json for this vocabulary setting, or None if there is none yet; a damaged one (cut
    short, not UTF-8) is reported, removed and rebuilt, as a damaged id folder is. A run's own tokenizer (a
    resume's) is never replaced: _load_checked refuses it instead."""
    if not tok_file.is_file():
        return None
    try:
        load_tokenizer(tok_file)
        return tok_file.read_text(encoding="utf-8")
    except (UnicodeDecodeError, DataError) as exc:
        log.warning("token cache: %s is damaged, rebuilding it (%s)", tok_file, exc)
        with contextlib.suppress(OSError):  # a read-only cache: writing the rebuilt one names the problem
            tok_file.unlink(missing_ok=True)
        return None


def _load_checked(tok_file: Path, cfg: DataConfig):
    """A saved tokenizer (a resumed run's, or the cache's), refused if its text rules are not the config's: the ids
    it gives would not be the ones the config asks for."""
    tok = load_tokenizer(tok_file)
    if tokenizer_rules(tok) != text_rules(cfg):
        raise DataError(f"{tok_file}: its rules ({', '.join(RULES)}) = {tokenizer_rules(tok)} differ from the "
                        "config's " + ", ".join(f"data.{k}={v}" for k, v in zip(RULES, text_rules(cfg))))
    return tok


def _note_earlier_versions(root: Path, kept: Path, place: dict, fingerprint: str) -> None:
    """Record in `kept` (a split folder just prepared) where its data lies, and name the split folders this host
    prepared of earlier versions of the same files (same place, other fingerprint), which no run hits again unless
    the files are put back as they were. (Another node's folder of the same path may be of its own node-local
    copy.) They are named, with their size, not removed: a run started before the edit may still be reading one
    (memory-mapped, perhaps from another node of a shared cache, where removing it would crash that run), and only
    the user knows. Folders written before this record are not named."""
    if not place:
        return
    host = socket.gethostname()
    try:
        files.atomic_write(kept / SOURCE_FILE, json.dumps({"place": place, "fingerprint": fingerprint, "host": host}))
    except files.WriteError as exc:  # the entry itself is whole: only the record is lost
        log.warning("token cache: %s", exc)
        return
    earlier = []
    for folder in root.iterdir():
        try:
            record = json.loads((folder / SOURCE_FILE).read_text())
        except (OSError, ValueError):  # not a split folder, or one from before the record
            continue
        if folder != kept and isinstance(record, dict) and record.get("place") == place and \
                record.get("host") == host and record.get("fingerprint") != fingerprint:
            earlier.append(folder.resolve())
    if earlier:
        try:
            size = f"{sum(f.stat().st_size for d in earlier for f in d.rglob('*') if f.is_file()) / 1e6:.1f} MB"
        except OSError:  # one removed meanwhile (by the user, say): the names still help
            size = "size unknown"
        log.info("token cache: %d entr%s of earlier versions of %s (%s) can be removed once no run started before "
                 "the edit is reading them: rm -r %s", len(earlier), "y" if len(earlier) == 1 else "ies",
                 place["location"], size, " ".join(shlex.quote(str(f)) for f in earlier))


def _store(final: Path, splits: dict[str, TokenizedSplit], label_names: list[str]) -> dict:
    """Write the id arrays into a sealed folder and return its manifest; if another process finished the same
    entry first, keep theirs (the same arrays). The temporary folder is this writer's alone (processes in other
    containers sharing the cache may have its pid), and is removed if the writing fails or is interrupted."""
    tmp = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with files.writing(final, partial=tmp):  # a full disk leaves no half-written entry
            tmp.mkdir(parents=True)
            for name, split in splits.items():
                split.save(tmp, name)
            manifest = files.seal(tmp, kind="token-cache", label_names=label_names)
    except BaseException:  # Ctrl-C, or a stop signal's exception, too
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    _note_unfinished(final.parent)
    return manifest


def _note_unfinished(folder: Path) -> None:
    """Name the temporary folders that preparations killed outright (kill -9, a lost node) left in `folder`, once a
    day old (not one being written now), with a command that removes them: nothing else ever would."""
    unfinished = []
    for tmp in folder.glob(f"*{TMP_MARK}*"):
        with contextlib.suppress(OSError):  # removed meanwhile
            if time.time() - tmp.stat().st_mtime > 86400:
                unfinished.append(tmp)
    if unfinished:
        log.warning("token cache: %d unfinished entr%s left by preparations that were killed: rm -r %s",
                    len(unfinished), "y" if len(unfinished) == 1 else "ies",
                    " ".join(shlex.quote(str(f)) for f in unfinished))


def size_warnings(train_labels: np.ndarray, val_labels: np.ndarray, names: list[str], global_batch: int,
                  test_labels=(), names_fixed: bool = False) -> list[str]:
    """Sizes that still run but make a run say little: a class of a text or two seen nowhere else and named like
    another (a mistyped label, where the data names the classes), a validation split too small to select a model
    on, or without a class, a global batch larger than the training split (one step per epoch)."""
    out, n_train, n_val = [], len(train_labels), len(val_labels)
    counts = [np.bincount(np.asarray(y, np.int64), minlength=len(names)) for y in (train_labels, val_labels,
                                                                                      test_labels)]
    like = {c: difflib.get_close_matches(names[c], names[:c] + names[c + 1:], 1, 0.8) for c in range(len(names))
            if not names_fixed and counts[0][c] <= 2 and not counts[1][c] + counts[2][c]}
    if typos := [c for c, close in like.items() if close]:
        out.append("; ".join(f"class {names[c]!r} ({counts[0][c]} training text{'s' if counts[0][c] > 1 else ''}) "
                             f"appears nowhere in validation or test and is named like {like[c][0]!r}" for c in typos)
                   + ": a mistyped label?")
    if absent := [repr(names[c]) for c in np.flatnonzero(counts[1] == 0) if c not in typos]:
        out.append(f"validation has no text of class {', '.join(absent)}: model selection cannot weigh it (a "
                   f"validation carved from training keeps each class's share with data.stratify=true)")
    if n_val < 100:
        out.append(f"validation has {n_val} texts: model selection on so few is mostly chance (a larger "
                   f"validation file; or, where it is carved from training, a larger data.val_fraction)")
    if global_batch > n_train:
        out.append(f"train.global_batch_size {global_batch} is larger than the {n_train} training texts: one "
                   f"optimizer step per epoch")
    return out
