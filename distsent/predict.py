"""Prediction with a trained model folder (<run>/best): one JSON line per input text.

    distsent-predict --model runs/imdb_lstm/best "A wonderful film." "Dull and far too long."
    distsent-predict --model runs/imdb_lstm/best --file texts.txt        # one text per line
    distsent-predict --model runs/tickets/best --file new.csv            # .csv/.jsonl/.parquet: the text column
    distsent-predict --model runs/tickets/best --file new.csv --keep id  # each result with the record's id too
    cat texts.txt | distsent-predict --model runs/imdb_lstm/best -

Python:  Predictor.load("runs/imdb_lstm/best").predict(["A wonderful film."])
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import math
import os
import select
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import skip_final_collection
from .checkpoint import load_weights, verify_model_folder
from .config import ConfigError
from .configfile import load_config
from .model import build_model
from .files import EXIT_WRITE, IntegrityError
from .labels import BINARY_NAMES
from .readers import FORMATS, read_file
from .records import SURROGATE, DataError
from .sampler import by_length
from .tokenizer import UNK, cut, encode, index_words, load_tokenizer, text_rules, word_ids


# --file types that are neither a data file (FORMATS) nor plain text with one text per line
NOT_TEXT = {".json", ".ndjson", ".tsv", ".xml", ".html", ".htm", ".xlsx", ".xls", ".docx", ".pdf", ".gz", ".tgz",
            ".bz2", ".xz", ".zst", ".zip", ".7z", ".rar", ".tar", ".arrow", ".feather", ".pkl", ".pickle", ".avro",
            ".orc", ".npy", ".npz", ".pt", ".bin", ".safetensors"}
# the keys of a result line: a kept column of one of these names (the true label, say) is written as file_<name>
RESULT_KEYS = ("row", "line", "text", "label", "probability", "probabilities", "p_positive", "warning", "truncated",
               "error")
ENCODE_CHUNK = 4096  # texts tokenized together (memory), each chunk cut into batches sorted by length
UNICODE_CODECS = {"utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}


class Predictor:
    """A trained model with its tokenizer and config; batches reviews by length like the trainer does."""

    def __init__(self, model, tokenizer, cfg, label_names: list[str], batch_size: int = 256, meta: dict | None = None):
        self.model, self.tokenizer, self.cfg, self.batch_size = model.eval(), tokenizer, cfg, batch_size
        # meta.json: step, validation score, val_texts (evaluate checks --split val against it)
        self.label_names, self.meta = label_names, meta or {}

    @classmethod
    def load(cls, folder: str | Path, batch_size: int = 0) -> "Predictor":
        """The model folder's model; batches of `batch_size` texts (0: its train.eval_batch_size)."""
        folder = Path(folder)
        verify_model_folder(folder)  # IntegrityError naming the file if anything is missing or damaged
        cfg = load_config(folder / "config.yaml")
        if cfg.data.path and cfg.data.train_file:  # written by an earlier version, $DISTSENT_DATA_PATH as data.path
            cfg = replace(cfg, data=replace(cfg.data, path=""))  # beside the files it trained on, which won then
        meta = _read_meta(folder / "meta.json")
        names = meta.get("label_names", BINARY_NAMES)  # model folders of earlier versions: IMDB's two classes
        tokenizer = load_tokenizer(folder / "tokenizer.json")
        model = build_model(tokenizer.get_vocab_size(), cfg.model, len(names))
        load_weights(folder, model)
        return cls(model, tokenizer, cfg, names, batch_size or cfg.train.eval_batch_size, meta)

    def logits(self, texts: list[str], heads: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The model's logits ([texts] for two classes, [texts, classes] for more) in input order, and each text's
        word count before truncation; with heads=True, each classifier head's logits instead ([texts, heads] or
        [texts, heads, classes]; model.combine gives the model's). The ids come from the model folder's
        tokenizer.json, as for anyone who loads it with the tokenizers library. `texts`: a list, or an Arrow string
        array (a read split's). A text predict() would answer with an error (null or NaN, empty, not a string, not
        UTF-8) raises ValueError naming its index: these arrays have no place for it. A text with no words left (an
        HTML tag alone) gets logits carrying no information: its word count is 0."""
        return self._read(texts if hasattr(texts, "to_pylist") else _as_list(texts), heads, check=True)[:2]

    def probabilities(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities [texts, classes] in input order, and each text's word count before truncation; texts
        as for logits()."""
        logits, words = self.logits(texts)
        return self.model.probabilities(torch.from_numpy(logits)).numpy(), words

    @torch.no_grad()
    def _read(self, texts, heads: bool = False, check: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """logits(), and for each text how many of the words the model reads (after the cut) are in its vocabulary
        (not <unk>). `check`: each text's problem is a ValueError (as Python strings, a chunk at a time: an Arrow
        array of a million texts is not copied whole)."""
        classes = len(self.label_names)
        shape = (len(texts), len(self.model.head_names)) if heads else (len(texts),)
        out = np.zeros(shape if classes == 2 else (*shape, classes), dtype=np.float32)
        words, known = np.zeros(len(texts), dtype=np.int64), np.zeros(len(texts), dtype=np.int64)
        unk = self.tokenizer.token_to_id(UNK)
        # a chunk of texts at a time: the tokenizers library's encodings take about 30x their text's size
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[start: start + ENCODE_CHUNK]
            chunk = chunk.to_pylist() if hasattr(chunk, "to_pylist") else chunk
            for i, text in enumerate(chunk if check else ()):
                if problem := _problem(text):
                    raise ValueError(f"texts[{start + i}]: {problem} (predict() answers such a text with an error "
                                     "of its own)")
            split, words[start: start + ENCODE_CHUNK] = encode(self.tokenizer, chunk, self.cfg.data.max_len,
                                                               self.cfg.data.truncate, True)
            text_of_token = np.repeat(np.arange(len(split.lengths)), split.lengths)
            known[start: start + len(split.lengths)] = np.bincount(text_of_token, split.tokens != unk,
                                                                   len(split.lengths))
            for idx in by_length(split.lengths, self.batch_size):
                ids, lengths = split.batch(idx)
                logits = self.model(torch.from_numpy(ids), torch.from_numpy(lengths), heads=heads)
                out[start + idx] = logits.float().numpy()
        return out, words, known

    def tokenized(self, split):
        """A read split's texts cut into ids as training cut them (the token cache's vectorized cutter, with this
        model's vocabulary and data settings; not encode(), whose library may split a character Python's tables do
        not know otherwise), its ids and labels kept."""
        data = self.cfg.data
        distinct, index, offsets = index_words(split.texts, *text_rules(data))
        ids = word_ids(self.tokenizer, distinct)[index]
        return cut(ids, offsets, data.max_len, data.truncate).relabel(split.labels, split.ids)

    def predict(self, texts: list[str]) -> list[dict]:
        """One result per text: {"label", "probability" (of that label), "probabilities" (every class's)}, and for
        two classes "p_positive": the probability of the second class in label_names (label 1, the class the
        single logit scores: "positive" for IMDB, whatever its name); or {"error"}."""
        texts = _as_list(texts)
        results: list[dict] = [{} for _ in texts]
        valid = []
        for i, text in enumerate(texts):
            if problem := _problem(text):
                results[i] = {"error": problem}
            else:
                valid.append(i)
        if valid:
            logits, n_words, n_known = self._read([texts[i] for i in valid])
            probs = self.model.probabilities(torch.from_numpy(logits)).numpy()
            chosen = self.model.predicted(torch.from_numpy(logits)).tolist()  # the training's own rule
            for i, p, best, n, k in zip(valid, probs, chosen, n_words, n_known):
                results[i] = {"label": self.label_names[best], "probability": round(float(p[best]), 6),
                              "probabilities": {name: round(float(q), 6) for name, q in zip(self.label_names, p)}}
                if len(p) == 2:
                    results[i]["p_positive"] = round(float(p[1]), 6)
                if n == 0:
                    results[i]["warning"] = "no words in the text: the prediction carries no information"
                if n > 0 and k == 0:  # in another language, say: every word read as <unk>, only the length is left
                    results[i]["warning"] = "none of the words the model read is in its vocabulary: the prediction " \
                                            "carries no information"
                if n > self.cfg.data.max_len:
                    data = self.cfg.data
                    results[i]["truncated"] = f"{n} words, the model read the {data.truncate} {data.max_len}"
        return results


def _as_list(texts) -> list:
    """The texts as a list: a generator is read twice; a pandas Series is indexed by its labels, not 0..n-1."""
    if isinstance(texts, str):  # it would be read as a list of characters
        raise TypeError("the Predictor takes a list of texts; to classify one, pass [text]")
    return list(texts)


def _problem(text) -> str | None:
    """Why a text cannot be classified, or None."""
    if _missing(text):
        return "no text (null)"
    if not isinstance(text, str):
        return f"expected a string, got {type(text).__name__}"
    if not text or text.isspace():
        return "empty text: nothing to classify"
    if SURROGATE.search(text):  # bytes that were not UTF-8, as Python keeps them (a command-line argument)
        return "not valid UTF-8 (holds a lone surrogate)"
    return None


def _read_meta(path: Path) -> dict:
    """A model folder's meta.json (class names); {} for folders of earlier versions, which had none."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise IntegrityError(f"{path}: not a table of the model's settings")
    return meta


def _line_chunks(stream, size: int = 1 << 16) -> Iterator[list[tuple[dict, str | None, str | None]]]:
    """The lines of a binary stream as lists of ({"line": n}, text, error): all that can be read at once, up to
    ENCODE_CHUNK lines (a file, a busy pipe: full batches), so a text typed or piped in slowly is answered at once,
    and a file is never held whole. Lines that are not UTF-8 become an error, not a crash; a failed read,
    ReadError."""
    n, parts, lines = 0, [], []  # parts: the line read so far (a line may span reads); lines: not yet given
    try:
        while block := stream.read1(size):
            *ends, rest = block.split(b"\n")
            lines += [b"".join(parts) + ends[0], *ends[1:]] if ends else []
            parts = [rest] if ends else parts + [rest]
            if lines and (len(lines) >= ENCODE_CHUNK or not _more_waiting(stream)):
                yield [_line(raw, i) for i, raw in enumerate(lines, n + 1)]
                n, lines = n + len(lines), []
    except OSError as exc:  # raised here by the read alone: a failed write is the caller's
        raise ReadError(exc.strerror or str(exc)) from exc
    if last := b"".join(parts):
        lines.append(last)
    if lines:
        yield [_line(raw, i) for i, raw in enumerate(lines, n + 1)]


class ReadError(Exception):
    """The input (a --file, stdin) could not be read."""


def _more_waiting(stream) -> bool:
    """Whether more input can be read now without waiting (a file; a pipe with data in it); False where unknown."""
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError):  # no descriptor (an in-memory stream: io.UnsupportedOperation)
        return False


def _line(raw: bytes, n: int) -> tuple[dict, str | None, str | None]:
    place = {"row": n - 1, "line": n}  # as a data file's records: the row from 0, the line from 1
    try:  # utf-8-sig on the first line: a byte order mark (as some editors save) is not part of the text
        return place, raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r"), None
    except UnicodeDecodeError as exc:
        return place, None, f"line {n}: not valid UTF-8 ({exc.reason} at byte {exc.start})"


def _print_json(record: dict, strict: bool = False) -> None:
    """One result line: its text as UTF-8 where stdout takes it, as \\u escapes where it does not (a latin-1
    locale, a Windows console): valid JSON either way, and no crash on a tweet's emoji."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(json.dumps(record, ensure_ascii=codecs.lookup(encoding).name not in UNICODE_CODECS, allow_nan=not strict))


def main(argv: list[str] | None = None) -> int:
    skip_final_collection()
    try:
        return _run(argv)
    except BrokenPipeError:  # the reader stopped early (`| head`): no traceback (the handling Python's docs give)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # the output cannot be written (a full disk)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"distsent-predict: cannot write the results: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_WRITE


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="distsent-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder, e.g. runs/imdb_lstm/best")
    parser.add_argument("--file", help="a file with one text per line (- for stdin), or a .csv, .jsonl or .parquet "
                        "file, read as training reads it (texts may hold commas and newlines), whose text column is "
                        "classified; other structured types (.json, .tsv, .xlsx, .gz, ...) are refused")
    parser.add_argument("--text-column", help="the text column of a .csv/.jsonl/.parquet --file (default: the "
                        "model's data.text_column)")
    parser.add_argument("--keep", action="append", default=[], metavar="COLUMN",
                        help="a column of a .csv/.jsonl/.parquet --file to copy into each result (an id to join "
                        "the results back on, say; one named like a result key, e.g. label, as file_label); repeat "
                        "it, or COLUMN,COLUMN")
    parser.add_argument("texts", nargs="*", help="texts to classify; '-' reads them from stdin, one per line")
    args = parser.parse_args(argv)
    suffix = Path(args.file).suffix.lower() if args.file and args.file != "-" else ""
    table = suffix in FORMATS
    if suffix in NOT_TEXT:  # read line by line, its markup or bytes would be classified
        parser.error(f"--file {args.file}: {suffix} is not read here: a .csv, .jsonl or .parquet file, or plain text "
                     f"with one text per line")
    if args.file and args.texts:
        parser.error("give texts or --file, not both")
    if args.file == "-":  # stdin, as the texts' '-'
        args.file, args.texts = None, ["-"]
    if args.text_column and not table:
        parser.error("--text-column is for a .csv, .jsonl or .parquet --file")
    keep = tuple(dict.fromkeys(c.strip() for arg in args.keep for c in arg.split(",") if c.strip()))
    if keep and not table:
        parser.error("--keep is for a .csv, .jsonl or .parquet --file")
    if clash := [c for c in keep if c in RESULT_KEYS and f"file_{c}" in keep]:
        parser.error(f"--keep {clash[0]} and file_{clash[0]}: the first is written as the second (a result has a key "
                     f"'{clash[0]}')")
    try:
        predictor = Predictor.load(args.model)
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        print(f"distsent-predict: cannot load {args.model}: {exc}", file=sys.stderr)
        return 2
    if table:
        return _predict_table(predictor, Path(args.file), args.text_column, keep)
    with contextlib.ExitStack() as stack:
        if args.file:
            try:
                chunks = _line_chunks(stack.enter_context(open(args.file, "rb")))
            except OSError as exc:
                print(f"distsent-predict: --file {args.file}: {exc.strerror or exc}", file=sys.stderr)
                return 2
        elif args.texts == ["-"]:
            if sys.stdin is None:
                print("distsent-predict: '-' reads the texts from stdin, which is closed", file=sys.stderr)
                return 2
            chunks = _line_chunks(sys.stdin.buffer)
        elif "-" in args.texts:
            parser.error("'-' (read stdin) cannot be mixed with texts")
        elif args.texts:
            # an argument that was not UTF-8 holds surrogates (Python's way to keep its bytes): an error, not printed
            chunks = [[({}, t, None) if not SURROGATE.search(t) else ({}, None, f"argument {n}: not valid UTF-8")
                       for n, t in enumerate(args.texts, 1)]]
        else:
            parser.error("give texts, --file PATH, or - for stdin")
        try:
            for chunk in chunks:  # printed as read, a chunk of at most ENCODE_CHUNK texts at a time
                for start in range(0, len(chunk), ENCODE_CHUNK):
                    part = chunk[start: start + ENCODE_CHUNK]
                    results = iter(predictor.predict([t for _, t, err in part if err is None]))
                    for place, text, err in part:  # place: the line of a file or stdin, as a data file's records
                        _print_json({**place, "text": None, "error": err} if err else {**place, "text": _shown(text),
                                                                                       **next(results)})
                sys.stdout.flush()
        except ReadError as exc:
            print(f"distsent-predict: {args.file or 'stdin'}: cannot be read: {exc}", file=sys.stderr)
            return 2
    return 0


def _predict_table(predictor: Predictor, path: Path, text_column: str | None, keep: tuple[str, ...]) -> int:
    """One JSON line per record of a data file, in file order, each with its row (and for CSV, JSONL, its line) and
    the columns to keep."""
    cfg = replace(predictor.cfg.data, text_column=text_column or predictor.cfg.data.text_column)
    try:
        split = read_file(path, cfg, labeled=False, keep=keep)
    except DataError as exc:
        print(f"distsent-predict: {exc}", file=sys.stderr)
        return 2
    for start in range(0, len(split.texts), ENCODE_CHUNK):  # as above: a chunk at a time
        texts = split.texts.slice(start, ENCODE_CHUNK).to_pylist()
        kept = {c: v.slice(start, ENCODE_CHUNK).to_pylist() if hasattr(v, "slice") else v[start: start + ENCODE_CHUNK]
                for c, v in split.kept.items()}  # an Arrow column or a list
        for i, (text, result) in enumerate(zip(texts, predictor.predict(texts)), start):
            # row: the record's place in file order (0 for the first: a join back to the file's other columns)
            place = {"row": i} | ({"line": int(split.lines[i])} if split.lines is not None else {}) | {
                f"file_{c}" if c in RESULT_KEYS else c: values[i - start] for c, values in kept.items()}
            if i in split.problems:  # a record the reader could not take (not JSON, a number for a text, ...)
                result = {"error": split.problems[i]}
            # strict JSON: the kept values are the file's; an error may quote bytes that were not UTF-8
            _print_json(_json_value({**place, "text": _shown(text), **result}), strict=True)
    return 0


def _json_value(value):
    """A value as strict JSON has it: NaN and infinities null, bytes that were not UTF-8 (a lone surrogate) U+FFFD,
    binary as hex, dates and times in ISO 8601, decimals and durations as text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return SURROGATE.sub("\ufffd", value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, dict):
        return {_json_value(str(k)): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (bool, int)):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _missing(value) -> bool:
    """None, a float NaN (numpy's and pandas' missing number) or pandas.NA: a missing value in a table."""
    return value is None or (isinstance(value, float) and value != value) or type(value).__name__ == "NAType"


def _shown(text: str | None) -> str | None:
    """The text as a result line echoes it, to tell the lines apart: its first 80 characters, "..." if cut."""
    return text if text is None or len(text) <= 80 else text[:80] + "..."


if __name__ == "__main__":
    sys.exit(main())
