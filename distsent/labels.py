"""Class names and labels: which classes a data set has and in which order (data.label_names, a datasets
ClassLabel, or the sorted training labels), and each label's class index, in any file of the data set."""

from __future__ import annotations

import re

import numpy as np

from .config import DataConfig
from .records import DataError, RawSplit, warn_once

BINARY_NAMES = ["negative", "positive"]  # integer labels 0/1 without names: the sentiment convention
INTEGER = re.compile(r"-?\d+")  # a class name that is an integer


def class_names(train: RawSplit, cfg: DataConfig, named: list[str] | None, where: str) -> list[str]:
    """The classes in their order: data.label_names; else the training data's ClassLabel names (`named`: a hub data
    set's, or a parquet file's saved by datasets); else the sorted training labels,
    integer labels 0/1 being named negative and positive (the sentiment convention) and other integers by
    themselves."""
    values = train.labels.tolist()
    strings = train.labels.dtype == object
    if strings and not all(isinstance(v, str) for v in values):
        number = next(i for i, v in enumerate(values) if not isinstance(v, str))
        string = next(i for i, v in enumerate(values) if isinstance(v, str))
        raise DataError(f"{where}: {train.where(number)} has the integer label {values[number]!r}, "
                        f"{train.where(string)} the string label {values[string]!r}; labels must be all integers or "
                        f"all strings")
    seen = sorted(set(values))
    if cfg.label_names or named is not None:
        names = [str(n) for n in (cfg.label_names or named)]
    elif not strings and set(seen) <= {0, 1}:
        names = list(BINARY_NAMES)
    else:
        names = [str(v) for v in seen]
    if len(set(names)) != len(names):
        raise DataError(f"data.label_names {names}: a name appears twice")
    if strings and cfg.label_names and (odd := next((n for n in names if n != n.strip() or not n), None)) is not None:
        # string labels are read without spaces around them: no label would name this class (integer labels name
        # their classes by position, whatever the names hold)
        raise DataError(f"data.label_names {names}: {odd!r} " + ("is empty" if not odd.strip() else "has spaces around "
                        "it, and labels are read without them: write it without"))
    if len(names) < 2:
        raise DataError(f"{where}: one class only ({names[0]!r}); a classifier needs two or more")
    if len(values) >= 20 and len(seen) > len(values) // 2:
        warn_once("%s: %d different labels among %d texts (%s): is data.label_column (%r) the label column?", where,
                  len(seen), len(values), shown([str(v) for v in seen], 5), cfg.label_column)
    by_case = {}
    for name in names:
        by_case.setdefault(name.casefold(), []).append(name)
    if clashes := [group for group in by_case.values() if len(group) > 1]:  # "Bug", "bug": likely one class
        warn_once("%s: classes whose names differ only in case are separate classes: %s (labels are compared "
                  "exactly; write each class one way if they are one)", where, "; ".join(map(str, clashes)))
    return names


def shown(names: list[str], most: int = 20) -> str:
    """Class names for a message: all of them, or the first `most` and their count (a text column taken for the
    label column makes a class of every text)."""
    return str(names) if len(names) <= most else f"{str(names[:most])[:-1]}, ... ({len(names)} classes)]"


def digit_names(names: list[str]) -> bool:
    """Whether every class is named by an integer ("1", "2"): classes named after integer labels."""
    return all(INTEGER.fullmatch(n) for n in names)


def integers_are_positions(names: list[str], label_names_given: bool, class_label: bool) -> bool:
    """Whether a bare integer label (not under a ClassLabel: read_class_labels names those) is a position in `names`
    or the class written like it. Positions: with `class_label`, a hub ClassLabel's values in another file (what
    distsent-evaluate --file gives a model trained on a hub data set), even where its names are digits (as
    yelp_polarity's "1" and "2"); and integers with data.label_names or the 0/1 sentiment convention, unless the
    names are integers themselves. Otherwise the classes are named after
    the training labels, and 3 is class "3" in any file, while an integer where the training labels were words is
    no class at all (not the class at that position)."""
    if class_label:
        return True
    if digit_names(names):
        return False
    return label_names_given or names == list(BINARY_NAMES)


def label_lookup(names: list[str], positions: bool) -> dict:
    """Label as written, in any file -> class index: a string by its name; an integer by position (`positions`, see
    integers_are_positions) or as the class named like it. With positions, an integer written as a string ("0" in
    test.jsonl beside 0 in train.csv) is read as the integer, unless a class has that name."""
    lookup = {n: i for i, n in enumerate(names)}
    if positions:
        lookup.update({i: i for i in range(len(names))})
        for i in range(len(names)):
            lookup.setdefault(str(i), i)
    else:
        # the integer 1 is class "1", never "01" (a code that a CSV column with leading zeros keeps)
        lookup.update({int(n): i for i, n in enumerate(names) if INTEGER.fullmatch(n) and n == str(int(n))})
    return lookup


def class_label_names(split: RawSplit, where: str) -> np.ndarray:
    """A ClassLabel column's integer labels (the readers set class_label on integer columns only) as the names they
    index; DataError naming the first one outside them (datasets writes -1 for a missing label)."""
    names = np.asarray(split.class_label, dtype=object)
    outside = np.flatnonzero((split.labels < 0) | (split.labels >= len(names)))
    if len(outside):
        i = int(outside[0])
        raise DataError(f"{where}: {split.where(i)} has label {split.labels[i]}, which is none of the ClassLabel's "
                        f"{len(names)} classes {split.class_label}")
    return names[split.labels]


def encode_labels(split: RawSplit, names: list[str], lookup: dict, where: str) -> np.ndarray:
    """Class indices of a split's labels; DataError naming the first label that is not one of the classes."""
    out = np.empty(len(split.labels), np.int64)
    for i, key in enumerate(split.labels.tolist()):
        index = lookup.get(key)
        if index is None:
            named = "; a datasets ClassLabel names these integers" if split.class_label is not None else ""
            if isinstance(key, int) and not digit_names(names):
                named += (f"; an integer label is a class's position there, 0 to {len(names) - 1}"
                          if all(lookup.get(c) == c for c in range(len(names))) else
                          "; integers beside class names are read as positions only in the order data.label_names "
                          "gives")
            raise DataError(f"{where}: {split.where(i)} has label {key!r}, which is not one of the classes "
                            f"{shown(names)} (they come from the training data, or data.label_names{named})")
        out[i] = index
    return out


def read_class_labels(raw: dict[str, RawSplit], where: dict[str, str]) -> list[str] | None:
    """A datasets ClassLabel (a hub data set's, a parquet file's saved by datasets) names its integers, in every
    split and whatever data.label_names says: they become those names here. Returns the training split's ClassLabel
    names, all of them in its order (the classes, unless data.label_names fixes them; a class without training
    examples is then refused, as any: dropping it would shift the positions of the integers after it), or None."""
    for split, data in raw.items():
        if data.class_label is not None:
            data.labels = class_label_names(data, where[split])
    return raw["train"].class_label
