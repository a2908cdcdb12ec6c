"""Data files: one CSV, JSONL or parquet file read into texts and raw labels, each checked, with the file and the
line (or row) named for anything wrong in it. Unlabeled reading (texts to classify) needs no label column."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import DataConfig
from .records import (SURROGATE, DataError, RawSplit, as_numbers, checked_split, first_invalid_utf8, label_array,
                      label_type_check, missing_columns, missing_kept)

FORMATS = (".csv", ".jsonl", ".parquet")


def check_format(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: unknown file type {path.suffix!r} (use .csv, .jsonl or .parquet)")


def _utf8(path: Path, labeled: bool = True) -> str:
    """The file's text. Texts to classify (not `labeled`) keep bytes that are not UTF-8 as lone surrogates, so that
    each such record gets an error of its own; labeled data stops at the first."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not labeled:
        return data.decode("utf-8-sig", errors="surrogateescape")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 ({exc.reason} at byte {exc.start}); save the "
                        f"file as UTF-8") from None


def _read_csv(path: Path, cfg: DataConfig, labeled: bool = True, keep: tuple[str, ...] = ()) -> RawSplit:
    # Python's csv refuses fields over 128 KiB by default: a long text is not an error (JSONL and parquet take it)
    csv.field_size_limit(2**31 - 1)  # the C long's limit on every platform
    # strict: a stray quote is an error naming its line, not a field that swallows the rest of the file
    # a byte-order mark starting a line: files joined with each one's kept (its label would be a class of its own)
    text = _utf8(path, labeled).replace("\n\ufeff", "\n").replace("\r\ufeff", "\r")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    texts, labels, lines, problems, kept = [], [], [], {}, []
    end = 0
    try:
        # blank lines (or lines of spaces) before the header are no header
        header = next((row for row in reader if any(field.strip() for field in row)), None)
        if not header:
            raise DataError(f"{path}: empty (expected a header row, e.g. text,label)")
        try:
            missing_columns(path, header, cfg, labeled)
        except DataError:  # texts to classify: a column missing because of bytes that were not UTF-8 (_utf8)?
            if any(SURROGATE.search(name) for name in header):
                raise DataError(f"{path}: line {reader.line_num} (the header) is not valid UTF-8; save the file as "
                                f"UTF-8") from None
            raise
        missing_kept(path, header, keep)
        ti, ki = header.index(cfg.text_column), [header.index(c) for c in keep]
        li = header.index(cfg.label_column) if labeled else None
        end = reader.line_num
        for record in reader:
            first, end = end + 1, reader.line_num  # a quoted text may run over several lines: name the first
            if not record or (len(header) > 1 and len(record) == 1 and not record[0].strip()):  # a blank line
                continue
            try:
                if not labeled and any(SURROGATE.search(f) for f in record):  # bytes that were not UTF-8 (_utf8)
                    raise DataError(f"{path}: line {first} is not valid UTF-8")
                if record == header:  # files joined with their headers: the header's words would be a class
                    raise DataError(f"{path}: line {first} repeats the header row (files joined with their headers?)")
                if len(record) != len(header):
                    why = "an unquoted comma in a text?" if len(record) > len(header) else \
                        "a missing field, or a line break (CR or LF) inside an unquoted text, which must be quoted?"
                    raise DataError(f"{path}: line {first} has {len(record)} fields, the header has "
                                    f"{len(header)} ({why})")
            except DataError as exc:
                if labeled:
                    raise
                problems[len(texts)] = str(exc).removeprefix(f"{path}: ")
                # no text to classify; the columns to keep stay where the fields line up with the header
                record = [None if i == ti else f for i, f in enumerate(record)] if len(record) == len(header) else \
                    [None] * len(header)
            texts.append(record[ti])
            if labeled:
                labels.append(record[li])
            lines.append(first)
            kept.append([record[i] for i in ki])
    except csv.Error as exc:
        raise DataError(f"{path}: line {end + 1}: {exc} (a quote left open, or followed by something other than a "
                        f"comma: distsent reads CSV separated by commas; inside a quoted text write a quote as "
                        f"\"\")") from None
    return replace(checked_split(texts, as_numbers(labels, path, lines), str(path), lines, labeled),
                   problems=problems, kept={c: _column([row[j] for row in kept]) for j, c in enumerate(keep)})


def _read_jsonl(path: Path, cfg: DataConfig, labeled: bool = True, keep: tuple[str, ...] = ()) -> RawSplit:
    texts, labels, lines, problems, kept, columns, objects = [], [], [], {}, [], {}, 0
    # lines end at \n, \r\n or \r only (a JSON string holds those escaped); str.splitlines() would also split at
    # U+2028 and other characters a JSON string may hold raw
    for n, line in enumerate(_utf8(path, labeled).replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if not line.strip():
            continue
        record = None
        try:
            if not labeled and SURROGATE.search(line):  # bytes that were not UTF-8 (_utf8)
                raise DataError(f"{path}: line {n} is not valid UTF-8")
            record = _jsonl_object(path, n, line)
            text, label = _jsonl_fields(path, n, record, cfg, labeled, columns)
        except DataError as exc:
            if labeled:
                raise
            problems[len(texts)], text, label = str(exc).removeprefix(f"{path}: "), None, None
            if record is None:  # the record's columns (to keep, to check), where the line is a JSON object at all
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
        objects += isinstance(record, dict)
        record = record if isinstance(record, dict) else {}
        kept.append([record.get(c) for c in keep])
        columns.update(dict.fromkeys(record))  # every column any record has, in order
        texts.append(text)
        if labeled:
            labels.append(label)
        lines.append(n)
    if lines and not objects:  # a JSON array, or UTF-16 (a Windows shell's): every line's error would be the same
        raise DataError(f"{path}: no line is a JSON object (JSONL holds one object per line, in UTF-8)")
    if not labeled and lines and cfg.text_column not in columns:  # labeled reading stopped at the first record
        if any(SURROGATE.search(str(c)) for c in columns):  # a key in bytes that were not UTF-8 (_utf8)
            raise DataError(f"{path}: its keys are not all valid UTF-8; save the file as UTF-8")
        missing_columns(path, list(columns), cfg, labeled)
    missing_kept(path, list(columns), keep)  # an object may leave a column out; one no record has is a typo
    return replace(checked_split(texts, label_array(labels, path, lines), str(path), lines, labeled),
                   problems=problems, kept={c: [row[k] for row in kept] for k, c in enumerate(keep)})


def _jsonl_object(path: Path, n: int, line: str) -> dict:
    """JSONL line `n` as the object it must be; DataError naming what it is instead."""
    twice = []  # each object's keys given twice, the top level's last (it is completed last)

    def pairs(items: list[tuple[str, object]]) -> dict:
        seen = set()
        twice.append([k for k, _ in items if k in seen or seen.add(k)])
        return dict(items)

    try:
        record = json.loads(line, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {n} is not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {n} is not a JSON object")
    if twice[-1]:  # json.loads keeps the last of the two values without a word; a nested object's are its own
        raise DataError(f"{path}: line {n} has the key {twice[-1][0]!r} twice")
    return record


def _jsonl_fields(path: Path, n: int, record: dict, cfg: DataConfig, labeled: bool,
                  seen: dict) -> tuple[str | None, object]:
    """The text (and label) of the record on JSONL line `n`; DataError naming what is wrong with them. `seen`: the
    keys of the records before it."""
    wanted = (cfg.text_column, cfg.label_column) if labeled else (cfg.text_column,)
    if absent := [c for c in wanted if c not in record and c in seen]:  # others have it: no column is misnamed
        raise DataError(f"{path}: line {n} has no '{absent[0]}' key (its keys: {', '.join(map(str, record))})")
    missing_columns(f"{path}: line {n}", list(record), cfg, labeled)
    text = record[cfg.text_column]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{path}: line {n}: the text is {type(text).__name__}, expected a string")
    label = record[cfg.label_column] if labeled else None
    for what, value in (("text", text), ("label", label)):
        # "\ud83d" alone: half an emoji, from a tweet cut short; as a class name, no output could print it
        if half := SURROGATE.search(value) if isinstance(value, str) else None:
            raise DataError(f"{path}: line {n}: the {what} holds a lone surrogate escape "
                            f"({half.group().encode('unicode_escape').decode()}), which is not a character; remove "
                            f"it or write the whole character")
    return text, label


def _read_parquet(path: Path, cfg: DataConfig, labeled: bool = True, keep: tuple[str, ...] = ()) -> RawSplit:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        missing_columns(path, names, cfg, labeled)  # a column named twice, before reading it
        missing_kept(path, names, keep)
        columns = [cfg.text_column, cfg.label_column] if labeled else [cfg.text_column]
        table = pq.read_table(path, columns=list(dict.fromkeys(columns + list(keep))))
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot be read as parquet: {exc}") from exc
    kept = {c: _checked_column(table.column(c), path, c) for c in keep}
    if not labeled:
        return replace(checked_split(table.column(cfg.text_column), [], str(path), labeled=False), kept=kept)
    import pyarrow as pa

    labels = table.column(cfg.label_column).combine_chunks()
    label_type_check(path, cfg.label_column, labels.type)
    if pa.types.is_dictionary(labels.type) and pa.types.is_string(labels.type.value_type):
        labels = labels.cast(labels.type.value_type)  # a category column: checked (and read) as its strings
    if pa.types.is_string(labels.type) or pa.types.is_large_string(labels.type) or \
            pa.types.is_string_view(labels.type):
        if (bad := first_invalid_utf8(labels)) is not None:
            raise DataError(f"{path}: row {bad}: the label is not valid UTF-8")
    # through Python, where checked_split checks each: nulls, floats (3.0 is 3), lists, booleans (refused, as in
    # JSONL: true is no class number)
    as_read = labels.null_count or pa.types.is_floating(labels.type) or pa.types.is_nested(labels.type) or \
        pa.types.is_boolean(labels.type)
    split = checked_split(table.column(cfg.text_column), label_array(labels.to_pylist(), path) if as_read
                          else labels.to_numpy(zero_copy_only=False), str(path))
    if np.issubdtype(split.labels.dtype, np.integer):  # a ClassLabel names integers (strings name themselves)
        split.class_label = _class_label(table.schema.metadata, cfg.label_column)
    split.kept = kept
    return split


def _column(values: list):
    """A CSV column to keep as an Arrow array (far smaller than Python strings), or the list where a field holds
    bytes that were not UTF-8 (Arrow takes no lone surrogates)."""
    import pyarrow as pa

    try:
        return pa.array(values, pa.large_string())
    except (pa.ArrowInvalid, UnicodeEncodeError):
        return values


def _checked_column(column, path: Path, name: str):
    """A parquet column to keep, its strings checked (Arrow does not check them as it reads): a plain string column
    as the text column is, naming the row; strings inside lists or structs by Arrow's full validation."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):  # a category column: its strings
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.large_string()).combine_chunks()  # 64-bit offsets: over 2 GiB of text joins
        if (bad := first_invalid_utf8(column)) is not None:
            raise DataError(f"{path}: row {bad}: the '{name}' column is not valid UTF-8")
        return column
    try:
        column.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: the '{name}' column cannot be read: {exc}") from None
    if (pa.types.is_timestamp(column.type) or pa.types.is_date(column.type)) and column.null_count < len(column):
        import pyarrow.compute as pc

        try:  # a date Python cannot hold (year 33658, say) would stop the output midway: Arrow's text instead
            [v.as_py() for v in pc.min_max(column).values()]
        except (OverflowError, ValueError):
            return column.cast(pa.string())
    return column


def _class_label(metadata: dict | None, column: str) -> list[str] | None:
    """The class names of a label column saved by datasets (Dataset.to_parquet, a hub data set's files) as a
    ClassLabel: its integer labels are indices into them, as when the hub data set is loaded."""
    try:
        feature = json.loads((metadata or {})[b"huggingface"])["info"]["features"][column]
    except (KeyError, TypeError, ValueError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if isinstance(names, list) else None


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def read_file(path: Path, cfg: DataConfig, labeled: bool = True, keep: tuple[str, ...] = ()) -> RawSplit:
    """One file (.csv, .jsonl or .parquet) with the configured text column and, if labeled, label column (else the
    RawSplit's labels are empty); `keep`: other columns read with them (RawSplit.kept)."""
    path = Path(path)
    check_format(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return READERS[path.suffix.lower()](path, cfg, labeled, tuple(keep))
