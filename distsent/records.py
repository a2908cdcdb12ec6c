"""A split's records as read (texts and raw labels, RawSplit) and the checks every source applies to them, each
problem a DataError naming the file and the line (or row): texts that are strings and not empty, labels that are one
integer or one string, the columns asked for present once."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DataConfig

INT64 = np.iinfo(np.int64)
SURROGATE = re.compile("[\ud800-\udfff]")

class DataError(ValueError):
    """The data is missing or malformed; the message names the file (and row) at fault."""

    exit_code = 2  # as distsent-train exits on it


log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def warn_once(message: str, *args) -> None:
    """A warning about the data, from the first process only (every process prepares the data), once (the data
    is read for --check, preparation, a resume)."""
    if os.environ.get("RANK", "0") == "0" and (text := message % args) not in _WARNED:
        _WARNED.add(text)
        log.warning(text)


@dataclass
class RawSplit:
    texts: object  # a pyarrow large_string array: 25,000 reviews are never copied into Python strings
    labels: np.ndarray  # as read (integers or strings); class indices (int64) after load_splits
    ids: np.ndarray  # int64, stable ids of the records within the split
    lines: np.ndarray | None = None  # each record's line in its file, for messages ("line 12"); None: "row i"
    class_label: list[str] | None = None  # a datasets ClassLabel's names, whose indices the integer labels are
    # texts to classify (unlabeled reading): record -> what is wrong with it (its text is None), which prediction
    # answers as that record's error; labeled reading stops at the first instead
    problems: dict[int, str] = field(default_factory=dict)
    # other columns read alongside the texts (read_file's `keep`): column -> a value per record (None where absent),
    # as a list or an Arrow array (sliced a chunk at a time by prediction)
    kept: dict[str, object] = field(default_factory=dict)

    def where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines is not None else f"row {i}"


def checked_split(texts, labels, where: str, lines: list[int] | None = None, labeled: bool = True) -> RawSplit:
    """A RawSplit from any sequence or Arrow array of texts, after checking that every text is a non-empty string.
    Unlabeled texts (to classify) may be empty, null or not UTF-8 (those become null, their error in `problems`):
    prediction answers each of those with an error of its own."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(texts) == 0:
        raise DataError(f"{where}: " + ("the split is empty" if labeled else "no records"))
    try:
        texts = pa.array(texts) if not isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{where}: the texts are not all strings ({exc})") from exc
    if pa.types.is_null(texts.type):  # every text null: Arrow cannot tell their type; each is reported below
        texts = texts.cast(pa.large_string())
    if pa.types.is_dictionary(texts.type):  # a pandas category column, say: the strings behind the codes
        texts = texts.cast(texts.type.value_type)
    if pa.types.is_string_view(texts.type):  # as Polars writes strings
        texts = texts.cast(pa.large_string())
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise DataError(f"{where}: the text column holds {texts.type}, expected strings")
    # 64-bit offsets before the chunks are joined: 32-bit ones overflow past 2 GiB of text
    texts = texts.cast(pa.large_string())
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    split = RawSplit(texts, np.asarray(labels), np.arange(len(texts), dtype=np.int64),
                     None if lines is None else np.asarray(lines, dtype=np.int64))
    if not labeled:  # each text that is not UTF-8 gets its error; the others are classified
        bad = invalid_utf8_rows(texts)
        split.problems = {row: f"{split.where(row)}: the text is not valid UTF-8" for row in bad}
        if bad:
            mask = np.zeros(len(texts), bool)
            mask[bad] = True
            split.texts = pc.if_else(pa.array(mask), pa.scalar(None, pa.large_string()), texts)
        return split
    if (bad := first_invalid_utf8(texts)) is not None:
        raise DataError(f"{where}: {split.where(bad)}: the text is not valid UTF-8")
    if split.labels.dtype == object:  # string labels of any format: spaces around one are not part of it
        split.labels = np.fromiter((v.strip() or None if isinstance(v, str) else v for v in split.labels), object,
                                   len(split.labels))
    # every record without a text or a label at once, the first few named: one run finds them all
    null = texts.is_null().to_numpy(zero_copy_only=False)
    problems = {int(row): "has no text (null)" for row in np.flatnonzero(null)}
    # blank: Python's whitespace (str.isspace, as prediction's text.strip()); RE2's \s alone is ASCII. The match
    # stops at a text's first other character.
    blank = pc.fill_null(pc.match_substring_regex(texts, r"^[\s\x0b\x1c-\x1f\x85\p{Z}]*$"), False)
    problems |= {int(row): "has an empty text" for row in np.flatnonzero(blank.to_numpy(zero_copy_only=False))}
    for i, v in enumerate(split.labels if split.labels.dtype == object else ()):
        if i not in problems and (v is None or not _scalar_label(v)):
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            problems[i] = "has no label" if v is None else f"has label {shown} (a label is one integer or one string)"
    if problems:
        raise DataError(f"{where}: {listed(split, problems)}")
    return split


def listed(split: RawSplit, problems: dict[int, str], shown: int = 5) -> str:
    """Records' problems (record -> what is wrong), the first `shown` named, with how many there are."""
    rows = sorted(problems)
    named = "; ".join(f"{split.where(r)} {problems[r]}" for r in rows[:shown])
    more = f"; and {len(rows) - shown} more" if len(rows) > shown else ""
    return (f"{len(rows)} records cannot be used: " if len(rows) > 1 else "") + named + more


def first_invalid_utf8(strings) -> int | None:
    """The row of the first string in an Arrow string array that is not valid UTF-8, or None. Parquet files are
    not checked on reading (nor by every writer): found here, by halving, before a tokenizer or a Python string
    conversion stops on it with a traceback."""
    import pyarrow as pa

    def valid(start: int, length: int) -> bool:
        try:
            strings.slice(start, length).validate(full=True)
            return True
        except pa.ArrowInvalid:
            return False

    if valid(0, len(strings)):
        return None
    lo, n = 0, len(strings)  # the first invalid string lies in rows lo .. lo + n - 1
    while n > 1:
        if valid(lo, n // 2):
            lo, n = lo + n // 2, n - n // 2
        else:
            n //= 2
    return lo


def invalid_utf8_rows(strings) -> list[int]:
    """Every row of an Arrow string array that is not valid UTF-8 (few, if any: each is found by halving)."""
    rows, start = [], 0
    while (bad := first_invalid_utf8(strings.slice(start))) is not None:
        rows.append(start + bad)
        start += bad + 1
    return rows


def _scalar_label(v) -> bool:
    """A label as read: a string, an integer (not a bool: JSON's true is no class number) or missing (None)."""
    return v is None or isinstance(v, str) or (isinstance(v, (int, np.integer)) and not isinstance(v, bool))


def missing_columns(where, present, cfg: DataConfig, labeled: bool = True) -> None:
    """DataError unless the text column (and, if labeled, the label column) is there exactly once."""
    hint = ("name the column with data.text_column / data.label_column (distsent-evaluate: --text-column / "
            "--label-column)" if labeled else "name the column with --text-column")
    if labeled and cfg.text_column == cfg.label_column:  # the model would read its answers: test accuracy 1.0
        raise DataError(f"{where}: the text column and the label column are both '{cfg.text_column}'; {hint}")
    for col in (cfg.text_column, cfg.label_column) if labeled else (cfg.text_column,):
        if col not in present:
            if len(present) == 1 and any(sep in present[0] for sep in ";\t|"):
                hint = "the file reads as one column: distsent reads CSV separated by commas"
            elif spaced := [c for c in present if isinstance(c, str) and c.strip() == col]:
                hint = f"the column {spaced[0]!r} has spaces in its name: remove them"
            elif cased := [c for c in present if isinstance(c, str) and c.strip().lower() == col.lower()]:
                hint = f"the column {cased[0]!r} differs in case: " + hint
            raise DataError(f"{where}: no '{col}' column (columns: {', '.join(present)}); {hint}")
        _named_once(where, present, col)


def label_type_check(where, column: str, arrow_type) -> None:
    """DataError for a label column of dates, times or durations (a date column taken for the labels would make
    each distinct time a class named by its nanoseconds)."""
    import pyarrow as pa

    if pa.types.is_temporal(arrow_type):
        raise DataError(f"{where}: the '{column}' column holds {arrow_type} values, not labels (a label is one "
                        f"integer or one string); name the label column with data.label_column (distsent-evaluate: "
                        f"--label-column)")


def missing_kept(where, present, keep: tuple[str, ...]) -> None:
    """DataError naming the first column to keep that the file lacks, or has more than once."""
    if absent := [c for c in keep if c not in present]:
        raise DataError(f"{where}: no '{absent[0]}' column to keep (columns: {', '.join(map(str, present))})")
    for col in keep:
        _named_once(where, present, col)


def _named_once(where, present, col: str) -> None:
    if (n := list(present).count(col)) > 1:
        raise DataError(f"{where}: {n} columns are named '{col}'; rename all but one")


def label_array(values: list, path: Path, lines: list[int] | None = None) -> np.ndarray:
    """Labels as one numpy array: int64 when every label is an integer (whole numbers written as floats, 3.0, are
    integers: pandas writes an integer column with a gap that way), else objects (strings, or values that
    checked_split refuses)."""
    values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return _int64(values, path, lines)
    return np.fromiter(values, object, len(values))  # a list label stays one value (asarray would make a 2-D array)


def as_numbers(values: list[str], path: Path, lines: list[int]) -> np.ndarray:
    """CSV labels are text: integers when every one reads as an integer (3 or 3.0), strings otherwise (checked_split
    strips them; an empty one is no label). A leading zero makes a code, not a number: "01" and "1" stay two
    classes (a column of codes "001".."120" keeps its names)."""
    numbers = [re.fullmatch(r"\s*(-?(?:0|[1-9]\d*))(?:\.0*)?\s*", v) for v in values]
    if values and all(numbers):
        return _int64([int(m[1]) for m in numbers], path, lines)
    return np.asarray(values, dtype=object)


def _int64(values: list[int], path: Path, lines: list[int] | None) -> np.ndarray:
    big = next((i for i, v in enumerate(values) if not INT64.min <= v <= INT64.max), None)
    if big is not None:
        at = f"line {lines[big]}" if lines is not None else f"row {big}"
        raise DataError(f"{path}: {at} has label {values[big]}, too large for an integer label; name the classes "
                        f"with strings or small integers")
    return np.asarray(values, np.int64)
