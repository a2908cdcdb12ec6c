"""Users' own data: train / validation / test files in CSV, JSONL or parquet, integer or string labels, class names
and their order, and a clear error naming file and row for each kind of bad data."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pytest

from distsent.config import DataConfig
from distsent.data import prepare
from distsent.readers import read_file
from distsent.records import DataError
from distsent.sources import find_source, load_splits

# texts with the characters that break naive CSV handling: commas, quotes, newlines
TEXTS = ['i feel "great", really', "so angry,\nso tired", "plain", "what a day, she said \"no\"", "scared\r\nstill",
         "joy joy", "fine, i guess", "a\ttab", "\"quoted\" start", "last one"]
LABELS = ["joy", "anger", "sadness", "joy", "fear", "joy", "sadness", "anger", "fear", "sadness"]


def write(folder, name, fmt, texts, labels, text_col="text", label_col="label"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([label_col, "id", text_col])
            w.writerows([y, i, t] for i, (t, y) in enumerate(zip(texts, labels)))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({text_col: t, label_col: y}) + "\n" for t, y in zip(texts, labels)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({text_col: texts, label_col: labels}), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_each_format_reads_every_text_exactly_with_string_labels(tmp_path, fmt):
    write(tmp_path, "train", fmt, TEXTS, LABELS)
    write(tmp_path, "dev", fmt, TEXTS[:4], LABELS[:4])  # "dev" is a validation name
    write(tmp_path, "test", fmt, TEXTS[4:], LABELS[4:])
    splits, names = load_splits(DataConfig(path=str(tmp_path)))
    assert names == ["anger", "fear", "joy", "sadness"]  # sorted
    assert splits["train"].texts.to_pylist() == TEXTS  # a validation file: nothing carved from train
    assert splits["val"].texts.to_pylist() == TEXTS[:4] and splits["test"].texts.to_pylist() == TEXTS[4:]
    assert [names[i] for i in splits["train"].labels] == LABELS


def test_integer_labels_label_names_order_and_columns(tmp_path):
    ints = [2, 0, 1, 2, 3, 2, 1, 0, 3, 1]
    write(tmp_path, "train", "jsonl", TEXTS, ints, text_col="tweet", label_col="emotion")
    write(tmp_path, "test", "jsonl", TEXTS[:3], ints[:3], text_col="tweet", label_col="emotion")
    cfg = DataConfig(path=str(tmp_path), text_column="tweet", label_column="emotion", val_fraction=0.2)
    splits, names = load_splits(cfg)
    assert names == ["0", "1", "2", "3"]
    named = DataConfig(path=str(tmp_path), text_column="tweet", label_column="emotion", val_fraction=0.2,
                       label_names=["sadness", "joy", "love", "anger"])
    splits, names = load_splits(named)
    assert names == ["sadness", "joy", "love", "anger"]  # integer labels index label_names
    assert splits["test"].labels.tolist() == ints[:3]
    # string labels in a fixed order: indices follow label_names, not the sorted order
    write(tmp_path / "s", "train", "csv", TEXTS, LABELS)
    write(tmp_path / "s", "test", "csv", TEXTS, LABELS)
    splits, names = load_splits(DataConfig(path=str(tmp_path / "s"), label_names=["sadness", "joy", "fear", "anger"]))
    assert names == ["sadness", "joy", "fear", "anger"]
    assert [names[i] for i in splits["test"].labels] == LABELS
    # a name with spaces around it names no string label (they are read without): refused; integer labels name
    # their classes by position, so there it is only a name (models of earlier versions have such names)
    with pytest.raises(DataError, match=r"'joy ' has spaces around it, and labels are read without them"):
        load_splits(DataConfig(path=str(tmp_path / "s"), label_names=["sadness", "joy ", "fear", "anger"]))
    assert load_splits(dataclasses.replace(named, label_names=["sadness ", "joy", "love", "anger"]))[1][0] == "sadness "


def test_a_stratified_carve_keeps_each_class_in_its_share(tmp_path):
    """600 texts: 480 joy, 90 anger, 30 love (the row's number in each text). data.stratify: validation (10%) holds
    48 / 9 / 3, and data.limit=300 keeps 240 / 45 / 15; the parts are disjoint and cover the file; the same seed
    carves the same texts. Without it, one random cut (the carve earlier runs made)."""
    labels = ["joy"] * 480 + ["anger"] * 90 + ["love"] * 30
    write(tmp_path / "d", "train", "csv", [f"text {i}" for i in range(600)], labels)
    write(tmp_path / "d", "test", "csv", ["a", "b"], ["joy", "love"])

    def carved(**settings):
        splits, names = load_splits(DataConfig(path=str(tmp_path / "d"), val_fraction=0.1, **settings))
        counts = {part: np.bincount(splits[part].labels, minlength=3).tolist() for part in ("train", "val")}
        texts = {part: [t.as_py() for t in splits[part].texts] for part in ("train", "val")}
        return names, counts, texts

    names, counts, texts = carved(stratify=True)
    assert names == ["anger", "joy", "love"]
    assert counts == {"train": [81, 432, 27], "val": [9, 48, 3]}
    assert sorted(texts["train"] + texts["val"], key=lambda t: int(t.split()[1])) == [f"text {i}" for i in range(600)]
    assert carved(stratify=True)[2] == texts and carved(stratify=True, split_seed=1)[2] != texts
    assert carved(stratify=True, limit=300)[1] == {"train": [41, 216, 13], "val": [4, 24, 2]}
    plain = carved(stratify=False)
    assert plain[1] != counts and sum(plain[1]["val"]) == 60
    assert plain[2] == carved()[2]  # off by default: the carve is the one earlier versions made


def test_files_named_one_by_one_and_numbers_in_csv(tmp_path):
    train = write(tmp_path / "a", "mine", "csv", TEXTS, [1, 0, 1, 1, 0, 1, 0, 0, 1, 0])
    test = write(tmp_path / "b", "held_out", "parquet", TEXTS[:2], [1, 0])
    splits, names = load_splits(DataConfig(train_file=str(train), test_file=str(test), val_fraction=0.2))
    assert names == ["negative", "positive"]  # integers 0/1 in a CSV: the sentiment convention
    assert len(splits["train"].labels) + len(splits["val"].labels) == 10 and splits["test"].labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="data.test_file is not set"):
        find_source(DataConfig(train_file=str(train)))
    with pytest.raises(DataError, match="data.path and data.validation_file are set: they are two ways"):
        find_source(DataConfig(path=str(tmp_path / "a"), validation_file=str(train)))
    with pytest.raises(DataError, match="data.path and data.train_file, data.test_file are set: they are two ways"):
        find_source(DataConfig(path=str(tmp_path / "a"), train_file=str(train), test_file=str(test)))  # not ignored
    with pytest.raises(DataError, match=r"data.train_file .*a: a folder, not a file \(data.path names a folder"):
        find_source(DataConfig(train_file=str(tmp_path / "a"), test_file=str(test)))


def test_warnings_for_a_test_file_trained_on_and_classes_that_differ_in_case(tmp_path, caplog):
    train = write(tmp_path, "train", "csv", TEXTS, [y.capitalize() if i < 2 else y for i, y in enumerate(LABELS)])
    _, names = load_splits(DataConfig(train_file=str(train), test_file=str(tmp_path / "." / "train.csv")))
    assert names == ["Anger", "Joy", "anger", "fear", "joy", "sadness"]
    assert "classes whose names differ only in case are separate classes: ['Anger', 'anger']; ['Joy', 'joy']" \
        in caplog.text
    assert f"data.test_file ({tmp_path / '.' / 'train.csv'}) is also the training data" in caplog.text
    caplog.clear()
    load_splits(DataConfig(train_file=str(train), validation_file=str(train), test_file=str(train)))
    assert "data.validation_file" in caplog.text and "is also the training data" in caplog.text
    assert "is also the test data" in caplog.text
    caplog.clear()  # a folder whose files are links to one, and hub splits named twice
    (tmp_path / "linked").mkdir()
    for name in ("train.csv", "validation.csv", "test.csv"):
        (tmp_path / "linked" / name).symlink_to(train)
    find_source(DataConfig(path=str(tmp_path / "linked")))
    assert f"the test file ({tmp_path / 'linked' / 'test.csv'}) is also the training data" in caplog.text
    assert "the validation file" in caplog.text and "is also the test data" in caplog.text
    find_source(DataConfig(hub_name="someone/tweets", hub_test_split="train"))
    assert "data.hub_test_split (train) is also the training data" in caplog.text


def test_texts_to_classify_need_no_label_and_keep_their_empty_records(tmp_path):
    """Unlabeled reading (what distsent-predict --file uses): no label column, and an empty or null text is kept for
    prediction to answer on its own instead of refusing the file; JSONL lines may end in \\r alone (old Mac files)."""
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n{"text": null}\n')
    assert read_file(tmp_path / "nulls.jsonl", DataConfig(), labeled=False).texts.to_pylist() == [None, None]
    (tmp_path / "mac.jsonl").write_bytes(b'{"text": "a", "label": "joy"}\r{"text": "", "label": "joy"}\r')
    split = read_file(tmp_path / "mac.jsonl", DataConfig(), labeled=False)
    assert split.texts.to_pylist() == ["a", ""] and split.lines.tolist() == [1, 2] and len(split.labels) == 0
    with pytest.raises(DataError, match="mac.jsonl: line 2 has an empty text"):  # training still refuses it
        read_file(tmp_path / "mac.jsonl", DataConfig())
    # records the reader cannot take are each answered, not the file refused (training still refuses the file)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n[1]\n{"id": 3}\n{"text": 42}\n{"text": "\\ud83d"}\n')
    split = read_file(tmp_path / "bad.jsonl", DataConfig(), labeled=False)
    assert split.texts.to_pylist() == ["a"] + [None] * 5 and split.lines.tolist() == [1, 2, 3, 4, 5, 6]
    assert [split.problems[i].split(" (")[0] for i in range(1, 6)] == [
        "line 2 is not JSON", "line 3 is not a JSON object", "line 4 has no 'text' key", "line 5: the text is int, "
        "expected a string", "line 6: the text holds a lone surrogate escape"]
    (tmp_path / "bad.csv").write_text('text,id\na,1\nb,2,3\ntext,id\n')
    split = read_file(tmp_path / "bad.csv", DataConfig(), labeled=False)
    assert split.texts.to_pylist() == ["a", None, None] and split.problems[1].startswith("line 3 has 3 fields")
    assert split.problems[2].startswith("line 4 repeats the header row")
    with pytest.raises(DataError, match="bad.csv: line 3 has 3 fields"):
        read_file(tmp_path / "bad.csv", DataConfig(label_column="id"))
    # a record with bytes that are not UTF-8: that record's error, the others classified (training refuses the file)
    (tmp_path / "bytes.jsonl").write_bytes(b'{"text": "great"}\n{"text": "caf\xe9"}\n{"text": "ok"}\n')
    (tmp_path / "bytes.csv").write_bytes(b'text\ngreat\ncaf\xe9\nok\n')
    for name, line in (("bytes.jsonl", 2), ("bytes.csv", 3)):  # the CSV's header is its line 1
        split = read_file(tmp_path / name, DataConfig(), labeled=False)
        assert split.texts.to_pylist() == ["great", None, "ok"]
        assert split.problems == {1: f"line {line} is not valid UTF-8"}
        with pytest.raises(DataError, match=f"{name}: line {line} is not valid UTF-8"):
            read_file(tmp_path / name, DataConfig())
    (tmp_path / "bytes.csv").write_bytes(b'te\xefxt\ngreat\n')  # in the header: the file, not a missing column
    with pytest.raises(DataError, match="bytes.csv: line 1 .the header. is not valid UTF-8; save the file as UTF-8"):
        read_file(tmp_path / "bytes.csv", DataConfig(), labeled=False)
    (tmp_path / "bytes.csv").write_bytes(b'text,caf\xe9\ngreat,x\n')  # in a column not read: read as before
    assert read_file(tmp_path / "bytes.csv", DataConfig(), labeled=False).texts.to_pylist() == ["great"]


def test_joined_files_blank_lines_repeated_keys_and_half_characters(tmp_path):
    """CSV files joined with their headers are refused at the repeated header even where each file starts with a
    byte-order mark (else the header would become a record, its label a class); blank lines before a header are
    skipped; a JSONL key given twice, a label holding half a character (no output could print that class) and a
    list for a label are named; a JSONL file without the text column, or without objects, is refused as a file
    when classifying (not one error per record)."""
    plain = ["good film", "bad film", "fine"]
    part = "\ufefftext,label\r\n" + "".join(f"{t},{y}\r\n" for t, y in zip(plain, LABELS))
    (tmp_path / "joined.csv").write_text(part + part, encoding="utf-8")
    with pytest.raises(DataError, match="joined.csv: line 5 repeats the header row"):
        read_file(tmp_path / "joined.csv", DataConfig())
    split = read_file(tmp_path / "joined.csv", DataConfig(), labeled=False)  # to classify: that record's error
    assert split.texts.to_pylist() == plain + [None] + plain and split.problems[3].startswith(
        "line 5 repeats the header row")
    (tmp_path / "blank.csv").write_text("\n \t\ntext,label\nhi,joy\n", encoding="utf-8")
    split = read_file(tmp_path / "blank.csv", DataConfig())
    assert split.texts.to_pylist() == ["hi"] and split.labels.tolist() == ["joy"] and split.lines.tolist() == [4]
    cases = {'{"text": "a", "label": "joy", "text": "b"}': "line 1 has the key 'text' twice",
             '{"text": "a", "label": "joy\\ud83d"}': "line 1: the label holds a lone surrogate escape (\\ud83d)",
             '{"text": "a", "label": ["joy"]}': "line 1 has label ['joy'] (a label is one integer or one string)"}
    for line, message in cases.items():
        (tmp_path / "one.jsonl").write_text(line + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=re.escape(f"one.jsonl: {message}")):
            read_file(tmp_path / "one.jsonl", DataConfig())
    (tmp_path / "one.jsonl").write_text('{"text": "a", "label": "joy", "meta": {"k": 1, "k": 2}}\n')
    assert read_file(tmp_path / "one.jsonl", DataConfig()).texts.to_pylist() == ["a"]  # a nested object's own keys
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        read_file(tmp_path / "empty.jsonl", DataConfig(), labeled=False)
    (tmp_path / "latin1.jsonl").write_bytes('{"t\u00e9xt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.jsonl: its keys are not all valid UTF-8; save the file as UTF-8"):
        read_file(tmp_path / "latin1.jsonl", DataConfig(), labeled=False)
    # a record without a key the ones before it have: that record's fault, not the column's name
    (tmp_path / "gap.jsonl").write_text('{"text": "a", "label": "joy"}\n{"tweet": "b", "label": "joy"}\n')
    with pytest.raises(DataError, match=re.escape("gap.jsonl: line 2 has no 'text' key (its keys: tweet, label)")):
        read_file(tmp_path / "gap.jsonl", DataConfig())
    (tmp_path / "tweets.jsonl").write_text('{"tweet": "a", "id": 1}\n{"tweet": "b", "id": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape("tweets.jsonl: no 'text' column (columns: tweet, id); name the "
                                                  "column with --text-column")):
        read_file(tmp_path / "tweets.jsonl", DataConfig(), labeled=False)
    (tmp_path / "array.jsonl").write_text('[{"text": "a"},\n {"text": "b"}]\n', encoding="utf-8")
    with pytest.raises(DataError, match="array.jsonl: no line is a JSON object .JSONL holds one object per line."):
        read_file(tmp_path / "array.jsonl", DataConfig(), labeled=False, keep=("id",))
    err = error_of(tmp_path, (TEXTS, LABELS), (["x", "y"], [0, 1]))  # words to train, integers to test
    assert "test.csv: line 2 has label 0, which is not one of the classes" in err
    assert "integers beside class names are read as positions only in the order data.label_names gives" in err


def test_hub_class_label_names_and_order(tmp_path, monkeypatch):
    """A hub data set whose labels are a ClassLabel (as dair-ai/emotion's: integers, names in its own order, not
    sorted). The hub cannot be reached from here, so data.hub_name names a local folder in the hub's layout
    (data/{split}-00000-of-00001.parquet, features in the parquet metadata): the real datasets.load_dataset reads
    it, nothing is replaced."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("DISTSENT_DATA_PATH", raising=False)
    names = ["sadness", "joy", "love", "anger", "fear", "surprise"]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    labels = {"train": [0, 1, 2, 3, 4, 5, 1, 0, 3, 1, 4, 5], "validation": [5, 4, 3, 2, 1, 0], "test": [2, 2, 0]}
    for split, ys in labels.items():
        texts = [f"{split} tweet {i} about {names[y]}" for i, y in enumerate(ys)]
        ds = datasets.Dataset.from_dict({"text": texts, "label": ys}, features=features)
        ds.to_parquet(tmp_path / "emotion" / "data" / f"{split}-00000-of-00001.parquet")

    cfg = DataConfig(hub_name=str(tmp_path / "emotion"), hub_validation_split="validation")
    assert find_source(cfg).kind == "hub"
    before = find_source(cfg).fingerprint()  # a local folder's files are part of the cache key, as for data.path
    ds.to_parquet(tmp_path / "emotion" / "data" / "test-00000-of-00001.parquet")  # the same bytes again
    assert find_source(cfg).fingerprint() == before
    (tmp_path / "emotion" / ".git").mkdir()  # a clone's history is no data
    (tmp_path / "emotion" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert find_source(cfg).fingerprint() == before
    ds.map(lambda r: {"text": r["text"] + " edited"}).to_parquet(tmp_path / "emotion" / "data" /
                                                                  "test-00000-of-00001.parquet")
    assert find_source(cfg).fingerprint() != before
    splits, got = load_splits(cfg)
    assert got == names  # the ClassLabel's order, not sorted
    # data.label_names orders the classes otherwise; the ClassLabel still names each integer, as in a parquet folder
    again, got = load_splits(DataConfig(hub_name=str(tmp_path / "emotion"), hub_validation_split="validation",
                                        label_names=sorted(names)))
    assert got == sorted(names) and [got[i] for i in again["test"].labels] == [names[y] for y in labels["test"]]
    # a hub ClassLabel's classes are all of its names (evaluate reads the hub's integers in a CSV as positions in
    # them): one without training examples is refused; a null label is named by its row
    abc = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    for split, ys in (("train", [0, 1, 0, 1]), ("test", [0, 1]), ("test", [0, None, 1])):
        part = datasets.Dataset.from_dict({"text": list("abcd"[:len(ys)]), "label": ys}, features=abc)
        part.to_parquet(tmp_path / "abc" / "data" / f"{split}-00000-of-00001.parquet")
        if split == "test":
            with pytest.raises(DataError) as info:
                load_splits(DataConfig(hub_name=str(tmp_path / "abc"), val_fraction=0.25))
            assert ("[test]: row 1 has no label" if None in ys else
                    "no training example of class 'c' (classes ['a', 'b', 'c']); list the classes to train in "
                    "data.label_names (the data's ClassLabel names it)") in str(info.value)
    floats = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("float32")})
    datasets.Dataset.from_dict({"text": list("abcd"), "label": [0.0, 1.0, 1.0, None]}, features=floats).to_parquet(
        tmp_path / "abc" / "data" / "train-00000-of-00001.parquet")  # pandas writes integers with a gap as floats
    with pytest.raises(DataError, match=r"\[train\]: row 3 has no label"):
        load_splits(DataConfig(hub_name=str(tmp_path / "abc"), val_fraction=0.25))
    # a ClassLabel's values are indices even where its names are digits (yelp_polarity's "1" and "2")
    digits = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["2", "1", "0"])})
    for split, n in (("train", 6), ("test", 3)):
        part = datasets.Dataset.from_dict({"text": list("abcdef"[:n]), "label": [0, 1, 2, 0, 1, 2][:n]}, features=digits)
        part.to_parquet(tmp_path / "digits" / "data" / f"{split}-00000-of-00001.parquet")
    loaded, got = load_splits(DataConfig(hub_name=str(tmp_path / "digits"), val_fraction=0.1))
    assert got == ["2", "1", "0"] and loaded["test"].labels.tolist() == [0, 1, 2]
    # integer labels without a ClassLabel (a hub data set of CSV files) name their classes by value, as in a folder
    for split, ys in (("train", [1, 5, 3, 1, 5, 3]), ("test", [5, 3])):
        write(tmp_path / "stars" / "data", split, "csv", TEXTS[:len(ys)], ys)
    loaded, got = load_splits(DataConfig(hub_name=str(tmp_path / "stars"), val_fraction=0.1))
    assert got == ["1", "3", "5"] and [got[i] for i in loaded["test"].labels] == ["5", "3"]
    assert splits["val"].labels.tolist() == labels["validation"] and splits["test"].labels.tolist() == labels["test"]
    assert sorted(splits["train"].labels.tolist()) == sorted(labels["train"])
    assert splits["val"].texts.to_pylist()[0] == "validation tweet 0 about surprise"
    # a split or configuration the data set lacks is named, with what it has, and not blamed on the network
    for bad, named in ((dict(hub_test_split="dev"), ("data.hub_test_split='dev'", "'train', 'validation', 'test'")),
                       (dict(hub_config="tweets"), ("data.hub_config='tweets'", "['default']"))):
        with pytest.raises(DataError) as info:
            load_splits(DataConfig(hub_name=str(tmp_path / "emotion"), **bad))
        assert all(n in str(info.value) for n in named) and "without internet" not in str(info.value), info.value
    # bad data in such a folder is the folder's, not the network's: the reader's own words are kept
    (tmp_path / "stars" / "data" / "train.csv").write_text("text,label\na,1\nb,5,extra\nc,3\n")
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(hub_name=str(tmp_path / "stars"), val_fraction=0.1))
    assert "Expected 2 fields in line 3, saw 3" in str(info.value) and "internet" not in str(info.value), info.value


def test_a_parquet_folder_saved_by_datasets_brings_its_classlabel_names(tmp_path):
    """Dataset.to_parquet keeps a ClassLabel's names in the file: the classes are named after them, in their order
    (they were "0".."3"); a test file whose ClassLabel orders them otherwise, or a CSV naming them, is read by name;
    a label outside the ClassLabel (datasets writes -1 for none) is named by its row."""
    import datasets

    names = ["sadness", "joy", "love", "anger"]
    ys = [0, 1, 2, 3, 1, 0, 3, 1, 2, 0]

    def save(path, classes, labels):
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=classes)})
        datasets.Dataset.from_dict({"text": TEXTS[:len(labels)], "label": labels}, features=features).to_parquet(path)

    save(tmp_path / "d" / "train.parquet", names, ys)
    other = ["anger", "love", "joy", "sadness"]
    save(tmp_path / "d" / "test.parquet", other, [0, 3, 1])  # anger, sadness, love
    splits, got = load_splits(DataConfig(path=str(tmp_path / "d"), val_fraction=0.2))
    assert got == names and [got[i] for i in splits["test"].labels] == ["anger", "sadness", "love"]
    assert sorted(splits["train"].labels.tolist() + splits["val"].labels.tolist()) == sorted(ys)
    (tmp_path / "d" / "test.parquet").unlink()
    write(tmp_path / "d", "test", "csv", TEXTS[:2], ["love", "joy"])
    assert load_splits(DataConfig(path=str(tmp_path / "d"), val_fraction=0.2))[0]["test"].labels.tolist() == [2, 1]
    (tmp_path / "d" / "test.csv").unlink()
    save(tmp_path / "d" / "test.parquet", other, [1, -1])
    with pytest.raises(DataError, match=r"test.parquet: row 1 has label -1, which is none of the ClassLabel's 4 "
                                        r"classes \['anger', 'love', 'joy', 'sadness'\]"):
        load_splits(DataConfig(path=str(tmp_path / "d"), val_fraction=0.2))
    save(tmp_path / "d" / "test.parquet", ["fear", "joy"], [0])  # a class training never saw, named as such
    with pytest.raises(DataError, match=r"row 0 has label 'fear', which is not one of the classes .* \(they come "
                                        r"from the training data, or data.label_names; a datasets ClassLabel names "
                                        r"these integers\)"):
        load_splits(DataConfig(path=str(tmp_path / "d"), val_fraction=0.2))


@pytest.mark.parametrize("case", ["digit names, integers in a CSV", "label_names over ClassLabel files",
                                  "label_names of digits over a ClassLabel file", "ClassLabels in two orders",
                                  "a ClassLabel class never trained", "int32 ClassLabel",
                                  "words in training, a ClassLabel file to test", "strings under a ClassLabel"])
def test_training_and_evaluate_read_every_labeled_file_alike(tmp_path, case):
    """distsent-evaluate --file reads a labeled file as training read the model's own test file, class for class
    (or both refuse it): a datasets ClassLabel file's integers by its names, whatever data.label_names says."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distsent.evaluate import file_labels

    def save(name, classes, labels, int32=False):
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=classes)})
        path = tmp_path / f"{name}.parquet"
        datasets.Dataset.from_dict({"text": TEXTS[:len(labels)], "label": labels}, features=features).to_parquet(path)
        if int32:  # the metadata kept, the column narrowed (a pyarrow cast)
            table = pq.read_table(path)
            pq.write_table(table.set_column(1, "label", table.column("label").cast(pa.int32())), path)

    ys, label_names = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0], []
    if case == "digit names, integers in a CSV":
        save("train", ["1", "2"], ys)
        write(tmp_path, "test", "csv", TEXTS[:3], [2, 1, 1])
    elif case == "label_names over ClassLabel files":
        save("train", ["pos", "neg"], ys)
        save("test", ["pos", "neg"], [1, 1, 0])  # neg, neg, pos
        label_names = ["neg", "pos"]
    elif case == "label_names of digits over a ClassLabel file":
        write(tmp_path, "train", "csv", TEXTS, [1, 2] * 5)
        save("test", ["1", "2"], [1, 1, 0])  # "2", "2", "1"; as integers, 1 would be class "1"
        label_names = ["1", "2"]
    elif case == "ClassLabels in two orders":
        save("train", ["neg", "pos"], ys)
        save("test", ["pos", "neg"], [1, 1, 0])
    elif case == "a ClassLabel class never trained":  # refused without data.label_names listing the others
        save("train", ["neg", "neutral", "pos"], [2 * y for y in ys])
        save("test", ["neg", "neutral", "pos"], [2, 0, 2])
        with pytest.raises(DataError, match="no training example of class 'neutral'"):
            load_splits(DataConfig(path=str(tmp_path), val_fraction=0.2))
        label_names = ["neg", "pos"]
    elif case == "int32 ClassLabel":
        save("train", ["neg", "pos"], ys)
        save("test", ["pos", "neg"], [1, 1, 0], int32=True)
    elif case == "words in training, a ClassLabel file to test":
        write(tmp_path, "train", "csv", TEXTS, ["neg", "pos"] * 5)
        save("test", ["pos", "neg"], [1, 1, 0])
    else:  # the metadata kept over a column of strings: they name themselves
        save("train", ["neg", "pos"], ys)
        table = pq.read_table(tmp_path / "train.parquet")
        pq.write_table(table.set_column(1, "label", pa.array(["good", "bad"] * 5)), tmp_path / "train.parquet")
        write(tmp_path, "test", "csv", TEXTS[:3], ["bad", "bad", "good"])
    cfg = DataConfig(path=str(tmp_path), val_fraction=0.2, label_names=label_names)
    splits, names = load_splits(cfg)
    test = next(tmp_path.glob("test.*"))
    assert file_labels(read_file(test, cfg), names, cfg, str(test)).tolist() == splits["test"].labels.tolist()
    expected = {"digit names, integers in a CSV": (["1", "2"], ["2", "1", "1"]),
                "label_names of digits over a ClassLabel file": (["1", "2"], ["2", "2", "1"]),
                "a ClassLabel class never trained": (["neg", "pos"], ["pos", "neg", "pos"]),
                "strings under a ClassLabel": (["bad", "good"], ["bad", "bad", "good"])}.get(
        case, (["neg", "pos"], ["neg", "neg", "pos"]))
    assert (names, [names[i] for i in splits["test"].labels]) == expected


def error_of(tmp_path, train, test, fmt="csv", raw_train: bytes | None = None, **cfg) -> str:
    folder = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
    write(folder, "train", fmt, *train)
    write(folder, "test", fmt, *test)
    if raw_train is not None:
        (folder / f"train.{fmt}").write_bytes(raw_train)
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(path=str(folder), **cfg))
    return str(info.value)


def test_bad_data_is_named_by_file_and_row(tmp_path):
    good = (TEXTS, LABELS)
    err = error_of(tmp_path, good, (["x", "y"], ["joy", "love"]))
    assert "test.csv: line 3 has label 'love', which is not one of the classes" in err
    err = error_of(tmp_path, good, good, label_names=["anger", "fear", "joy", "sadness", "love"])
    assert "train.csv: no training example of class 'love'" in err
    err = error_of(tmp_path, good, good, fmt="jsonl", text_column="tweet")
    assert "train.jsonl: line 1: no 'tweet' column (columns: text, label)" in err
    err = error_of(tmp_path, good, good, fmt="parquet", label_column="emotion")
    assert "train.parquet: no 'emotion' column (columns: text, label)" in err
    err = error_of(tmp_path, (TEXTS[:3] + ["   "] + TEXTS[4:], LABELS), good)
    assert "train.csv: line 6 has an empty text" in err  # the header, then a text of two lines before it
    err = error_of(tmp_path, good, good, fmt="jsonl",
                   raw_train=b'{"text": "a", "label": "joy"}\n{"text": null, "label": "fear"}\n')
    assert "train.jsonl: line 2 has no text (null)" in err
    err = error_of(tmp_path, good, good, raw_train=b'label,text\njoy,fine\nfear,one, too many\n')
    assert "train.csv: line 3 has 3 fields, the header has 2 (an unquoted comma in a text?)" in err
    # a carriage return inside an unquoted text ends its record (CSV's rule): the text's two halves are named; lines
    # of spaces alone (at a file's end, say) are blank lines
    err = error_of(tmp_path, good, good, raw_train=b'label,text\njoy,fine\nfear,one\rtwo\n  \n \t\n')
    assert "train.csv: line 4 has 1 fields, the header has 2 (a missing field, or a line break (CR or LF) inside" in err
    assert len(read_file(write(tmp_path / "sp", "train", "csv", TEXTS, LABELS), DataConfig()).texts) == 10
    (tmp_path / "sp" / "train.csv").write_text((tmp_path / "sp" / "train.csv").read_text() + "  \n\t\n")
    assert len(read_file(tmp_path / "sp" / "train.csv", DataConfig()).texts) == 10
    # a stray quote opens a field that would swallow the rest of the file: refused at the line it opens on
    err = error_of(tmp_path, good, good, raw_train=b'label,text\njoy,fine\nfear,"oops\njoy,more\nsadness,end\n')
    assert "train.csv: line 3: unexpected end of data" in err
    err = error_of(tmp_path, good, good, raw_train=b'label,text\njoy,fine\nfear,caf\xe9\n')
    assert "train.csv: line 3 is not valid UTF-8" in err
    # U+2028 (a line separator) may stand raw in a JSON string: it is part of the text, not a line break
    err = error_of(tmp_path, good, good, fmt="jsonl",
                   raw_train='{"text": "a\u2028b", "label": "joy"}\n{"text": "c", "label": null}\n'.encode())
    assert "train.jsonl: line 2 has no label" in err
    err = error_of(tmp_path, (["a", "b"], ["joy", "joy"]), good)
    assert "one class only ('joy')" in err
    # an empty label cell is no label (not a class named ""), in training and where another split has integers
    err = error_of(tmp_path, good, good, raw_train=b'label,text\njoy,fine\n,unlabeled\nfear,x\n')
    assert "train.csv: line 3 has no label" in err
    err = error_of(tmp_path, (TEXTS, [i % 3 for i in range(10)]), (["x", "y", "z"], [1, "", 2]))
    assert "test.csv: line 3 has no label" in err
    err = error_of(tmp_path, good, good, raw_train=b'label,text,label\njoy,fine,fear\n')
    assert "train.csv: 2 columns are named 'label'; rename all but one" in err
    err = error_of(tmp_path, good, good, raw_train=b'text;label\nfine;joy\n')
    assert "columns: text;label); the file reads as one column: distsent reads CSV separated by commas" in err
    with pytest.raises(DataError, match="train.csv is a file; data.path names a folder of train / test files"):
        find_source(DataConfig(path=str(write(tmp_path / "f", "train", "csv", TEXTS, LABELS))))
    err = error_of(tmp_path, good, good, raw_train=b'label,text\n1,fine\n99999999999999999999,big\n')
    assert "train.csv: line 3 has label 99999999999999999999, too large for an integer label" in err
    # a text of Unicode spaces only (no-break, ideographic) is as empty as prediction finds it
    err = error_of(tmp_path, good, good, raw_train='label,text\njoy,fine\nfear,\u00a0\u3000\x0b\n'.encode())
    assert "train.csv: line 3 has an empty text" in err
    err = error_of(tmp_path, good, good, fmt="jsonl",
                   raw_train=b'{"text": "a", "label": "joy"}\n{"text": "b", "label": 3}\n')
    assert "train.jsonl: line 2 has the integer label 3, line 1 the string label 'joy'; labels must be all" in err
    # a header the csv module cannot read (R's write.csv2, quoted and separated by semicolons): named, not a traceback
    err = error_of(tmp_path, good, good, raw_train=b'"label";"text"\n"joy";"fine"\n')
    assert "train.csv: line 1: ',' expected after '\"' (a quote left open, or followed by something other than" in err
    err = error_of(tmp_path, good, good, raw_train=b'text, label\nfine,joy\n')
    assert "no 'label' column (columns: text,  label); the column ' label' has spaces in its name: remove them" in err
    err = error_of(tmp_path, good, good, text_column="label")  # the model would read its answers
    assert "train.csv: the text column and the label column are both 'label'" in err
    import pyarrow as pa
    import pyarrow.parquet as pq

    write(tmp_path / "twice", "test", "parquet", *good)
    pq.write_table(pa.Table.from_arrays([pa.array(TEXTS), pa.array(TEXTS), pa.array(LABELS)],
                                        names=["text", "text", "label"]), tmp_path / "twice" / "train.parquet")
    with pytest.raises(DataError, match="train.parquet: 2 columns are named 'text'; rename all but one$"):
        load_splits(DataConfig(path=str(tmp_path / "twice")))
    # a text column taken for the label column: every text a class, the list cut short
    err = error_of(tmp_path, (TEXTS * 3, [f"t{i}" for i in range(30)]), (["x"], ["joy"]))
    assert "not one of the classes ['t0', 't1', 't10', 't11', " in err and ", ... (30 classes)] (they come" in err


def test_long_texts_padded_labels_category_columns_and_mixed_formats(tmp_path):
    """Valid data that reading used to refuse or misread: a CSV text over the csv module's 128 KiB field limit,
    labels written with spaces around them, a parquet text column stored as a category (dictionary), and integer
    labels in train.csv that test.jsonl writes as strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    long_text = "word " * 40_000
    write(tmp_path / "a", "train", "csv", [long_text] + TEXTS[1:], [" joy "] + LABELS[1:])
    splits = read_file(tmp_path / "a" / "train.csv", DataConfig())
    assert splits.texts[0].as_py() == long_text and splits.labels[0] == "joy"
    write(tmp_path / "j", "train", "jsonl", TEXTS, ["sadness\t"] + LABELS[1:])  # any format, not just CSV
    assert read_file(tmp_path / "j" / "train.jsonl", DataConfig()).labels[0] == "sadness"
    with pytest.raises(DataError, match="train.jsonl: line 1 has no label"):
        write(tmp_path / "j", "train", "jsonl", TEXTS, [" "] + LABELS[1:])
        read_file(tmp_path / "j" / "train.jsonl", DataConfig())
    write(tmp_path / "b", "train", "csv", TEXTS, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1])
    write(tmp_path / "b", "test", "jsonl", TEXTS[:3], ["3", "1", "2"])
    loaded, names = load_splits(DataConfig(path=str(tmp_path / "b")))
    assert names == ["1", "2", "3"] and loaded["test"].labels.tolist() == [2, 0, 1]
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"text": pa.array(TEXTS).dictionary_encode(), "label": LABELS}),
                   tmp_path / "c" / "train.parquet")
    assert read_file(tmp_path / "c" / "train.parquet", DataConfig()).texts.to_pylist() == TEXTS


@pytest.mark.slow
def test_a_text_column_over_two_gib_is_read(tmp_path):
    """Parquet row groups (and the hub's Arrow tables) arrive in chunks; joined with 32-bit offsets, more than 2 GiB
    of text overflows. About 3.5 GB of memory for a few seconds."""
    import pyarrow as pa

    from distsent.records import checked_split

    n, size = 1100, 1 << 20  # 1.1 GiB of text per chunk, built from its buffers (pa.array of strings is slower)
    offsets = np.arange(0, (n + 1) * size, size, dtype=np.int32)
    chunk = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(b"x" * (n * size)))
    split = checked_split(pa.chunked_array([chunk, chunk]), np.zeros(2200, np.int64), "big")
    assert len(split.texts) == 2200 and split.texts.type == pa.large_string()
    assert len(split.texts[2199].as_py()) == 1 << 20


def test_texts_of_symbols_alone_and_a_mistyped_class_are_warned_about(tmp_path, capsys):
    """Tweets of emoji alone are no empty texts, but without data.symbols they keep no token: the model reads them
    as empty, which the run says (with the option that keeps them); --check warns of a class seen once."""
    from distsent.train import main

    write(tmp_path / "d", "train", "csv", TEXTS + ["😡😡", "!!!"], LABELS + ["anger", "sadnes"])
    write(tmp_path / "d", "test", "csv", TEXTS + ["😂"], LABELS + ["joy"])
    cfg = DataConfig(path=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"), min_freq=1, val_fraction=0.25)
    assert prepare(cfg).wordless_warning(symbols=False).startswith(
        "2 of the 9 train, 1 of the 11 test texts keep no token (they hold nothing but symbols, spaces or marks): the "
        "model reads them as empty; data.symbols=true keeps punctuation and emoji as tokens")
    assert prepare(dataclasses.replace(cfg, symbols=True)).wordless_warning(symbols=True) is None
    assert main(["--check", f"data.path={tmp_path / 'd'}", f"output_dir={tmp_path / 'run'}", "data.min_freq=1"]) == 0
    assert "distsent-train: warning: class 'sadnes' (1 training text) appears nowhere in validation or test and " \
           "is named like 'sadness': a mistyped label?" in capsys.readouterr().err


def test_nothing_is_cached_when_the_data_is_bad(tmp_path):
    write(tmp_path / "d", "train", "csv", TEXTS, LABELS)
    write(tmp_path / "d", "test", "csv", ["x"], ["love"])
    cache = tmp_path / "cache"
    with pytest.raises(DataError):
        prepare(DataConfig(path=str(tmp_path / "d"), cache_dir=str(cache), min_freq=1))
    assert not any(cache.rglob("*.npy")) and not any(p.name.startswith("tok-") for p in cache.rglob("*"))
    # a vocabulary of <pad> and <unk> alone: the model would read nothing but the texts' lengths
    write(tmp_path / "d", "test", "csv", TEXTS, LABELS)
    with pytest.raises(DataError, match="data.min_freq=1000: no word of the training split occurs that often .the "
                                        "commonest: 2 times., so the vocabulary would be empty; lower data.min_freq"):
        prepare(DataConfig(path=str(tmp_path / "d"), cache_dir=str(cache), min_freq=1000))
    assert not any(cache.rglob("*.npy")) and not any(p.name.startswith("tok-") for p in cache.rglob("*"))


def test_multiclass_cache_keeps_the_class_names_and_memory_maps(tmp_path):
    write(tmp_path / "d", "train", "csv", TEXTS * 3, LABELS * 3)
    write(tmp_path / "d", "test", "csv", TEXTS, LABELS)
    cfg = DataConfig(path=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"), min_freq=1)
    first, again = prepare(cfg), prepare(cfg)
    assert not first.cache_hit and again.cache_hit
    assert first.label_names == again.label_names == ["anger", "fear", "joy", "sadness"]
    assert isinstance(again.train.tokens, np.memmap)  # every process maps the same file
    assert (first.train.tokens == again.train.tokens).all() and (first.test.labels == again.test.labels).all()


def test_labels_are_read_as_the_classes_they_name_in_every_file(tmp_path):
    """Integer labels beside string ones are never read as positions among classes named after words: "1" and 1
    are the same class in any file, an integer where training had words is refused; 0/1 written as strings in
    another file are still the sentiment pair; CSV and parquet whole numbers written as floats are integers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = TEXTS[:9]
    write(tmp_path / "a", "train", "csv", texts, ["1", "2", "neutral"] * 3)  # not all integers: strings
    write(tmp_path / "a", "test", "csv", texts[:3], [2, 1, 2])  # all integers: int64
    splits, names = load_splits(DataConfig(path=str(tmp_path / "a"), val_fraction=0.2))
    assert names == ["1", "2", "neutral"] and [names[i] for i in splits["test"].labels] == ["2", "1", "2"]
    err = error_of(tmp_path, (TEXTS, LABELS), (["x", "y"], [0, 1]))
    assert "test.csv: line 2 has label 0, which is not one of the classes ['anger', 'fear', 'joy', 'sadness']" in err
    write(tmp_path / "b", "train", "csv", texts, [0, 1, 1] * 3)
    write(tmp_path / "b", "test", "jsonl", texts[:2], ["1", "0"])
    splits, names = load_splits(DataConfig(path=str(tmp_path / "b"), val_fraction=0.2))
    assert names == ["negative", "positive"] and splits["test"].labels.tolist() == [1, 0]
    write(tmp_path / "c", "train", "csv", texts, ["1.0", "2", "3.0"] * 3)
    (tmp_path / "c" / "test.parquet").unlink(missing_ok=True)
    pq.write_table(pa.table({"text": texts[:3], "label": [3.0, 1.0, 2.0]}), tmp_path / "c" / "test.parquet")
    splits, names = load_splits(DataConfig(path=str(tmp_path / "c"), val_fraction=0.2))
    assert names == ["1", "2", "3"] and splits["test"].labels.tolist() == [2, 0, 1]
    # codes with leading zeros stay codes: "01" is not class 1, and the integer 1 is not class "01"
    write(tmp_path / "d", "train", "csv", texts, ["01", "002", "10"] * 3)
    write(tmp_path / "d", "test", "csv", texts[:3], ["10", "002", "01"])
    splits, names = load_splits(DataConfig(path=str(tmp_path / "d"), val_fraction=0.2))
    assert names == ["002", "01", "10"] and splits["test"].labels.tolist() == [2, 0, 1]
    write(tmp_path / "d", "test", "csv", texts[:2], ["10", "10"])  # all integers: 10 is class "10"
    assert load_splits(DataConfig(path=str(tmp_path / "d"), val_fraction=0.2))[0]["test"].labels.tolist() == [2, 2]
    err = error_of(tmp_path, (texts, ["01", "002", "10"] * 3), (["x", "y"], [10, 1]), fmt="jsonl")
    assert "test.jsonl: line 2 has label 1, which is not one of the classes ['002', '01', '10']" in err


def test_labels_that_name_no_class_and_texts_that_are_no_text_are_refused(tmp_path):
    """Each names its file and line (or row) instead of ending in a traceback or a wrong class."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = (TEXTS, LABELS)
    # two files joined with their headers: "label" would become a class, shifting the others
    err = error_of(tmp_path, good, good, raw_train=b"label,text\njoy,fine\nlabel,text\nfear,scared\n")
    assert "train.csv: line 3 repeats the header row (files joined with their headers?)" in err
    err = error_of(tmp_path, good, good, fmt="jsonl", raw_train=b'{"text": "a", "label": "joy"}\n'
                                                                  b'{"text": "b", "label": ["joy", "fear"]}\n')
    assert "train.jsonl: line 2 has label ['joy', 'fear'] (a label is one integer or one string)" in err
    folder = tmp_path / "nested"
    write(folder, "train", "jsonl", *good)
    (folder / "test.jsonl").write_text('{"text": "a", "label": "joy"}\n{"text": "b", "label": {"x": 1}}\n')
    with pytest.raises(DataError, match=r"test.jsonl: line 2 has label \{'x': 1\} \(a label is one integer"):
        load_splits(DataConfig(path=str(folder)))
    (folder / "test.jsonl").unlink()
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [1.0, 2.0, 2.5]}), folder / "test.parquet")
    with pytest.raises(DataError, match=r"test.parquet: row 2 has label 2.5 \(a label is one integer or one string\)"):
        load_splits(DataConfig(path=str(folder)))
    # half of an emoji's surrogate pair, as a tweet cut short leaves it: not a character, not UTF-8
    err = error_of(tmp_path, good, good, fmt="jsonl", raw_train=b'{"text": "a", "label": "joy"}\n'
                                                                  b'{"text": "so happy \\ud83d", "label": "joy"}\n')
    assert "train.jsonl: line 2: the text holds a lone surrogate escape (\\ud83d)" in err


def not_utf8(texts: list[bytes]):
    """A string array whose bytes are not all UTF-8, as a parquet writer that does not check can leave one."""
    import pyarrow as pa

    offsets = np.cumsum([0] + [len(t) for t in texts]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(texts), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(texts))])


def test_parquet_texts_and_labels_as_writers_leave_them(tmp_path):
    """Parquet is not checked for UTF-8 on reading: a text or label that is not UTF-8 is named by its row (not a
    tokenizer's traceback, from training and --check; prediction answers each such text with that error, as it
    does CSV and JSONL records). Text columns of view strings (as Polars writes them) are read; boolean labels are
    refused, as in JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    write(folder, "test", "parquet", TEXTS, LABELS)
    texts = [t.encode() for t in TEXTS]
    pq.write_table(pa.table({"text": not_utf8(texts[:2] + [b"\xff"] + texts[3:7] + [b"caf\xe9 ok"] + texts[8:]),
                             "label": LABELS}), folder / "train.parquet")
    with pytest.raises(DataError, match=r"train.parquet: row 2: the text is not valid UTF-8"):
        load_splits(DataConfig(path=str(folder)))
    # texts to classify: each such record's error, the others classified
    split = read_file(folder / "train.parquet", DataConfig(), labeled=False)
    assert split.texts.to_pylist() == TEXTS[:2] + [None] + TEXTS[3:7] + [None] + TEXTS[8:]
    assert split.problems == {2: "row 2: the text is not valid UTF-8", 7: "row 7: the text is not valid UTF-8"}
    pq.write_table(pa.table({"text": TEXTS, "label": not_utf8([y.encode() for y in LABELS[:2]] + [b"\xffjoy"] + [
        y.encode() for y in LABELS[3:]])}), folder / "train.parquet")
    with pytest.raises(DataError, match=r"train.parquet: row 2: the label is not valid UTF-8"):
        load_splits(DataConfig(path=str(folder)))
    codes = pa.array([0, 1, 2, 1, 0, 1, 0, 1, 0, 1], pa.int32())  # a category column (pandas), its second name bad
    pq.write_table(pa.table({"text": TEXTS, "label": pa.DictionaryArray.from_arrays(codes, not_utf8(
        [b"joy", b"f\xffar", b"anger"]))}), folder / "train.parquet")
    with pytest.raises(DataError, match=r"train.parquet: row 1: the label is not valid UTF-8"):
        load_splits(DataConfig(path=str(folder)))
    pq.write_table(pa.table({"text": pa.array(TEXTS, pa.string_view()), "label": LABELS}), folder / "train.parquet")
    assert read_file(folder / "train.parquet", DataConfig()).texts.to_pylist() == TEXTS
    assert load_splits(DataConfig(path=str(folder)))[1] == sorted(set(LABELS))
    for labels in ([True, False] * 5, [True] * 8 + [None, False]):
        pq.write_table(pa.table({"text": TEXTS, "label": labels}), folder / "train.parquet")
        with pytest.raises(DataError, match=r"train.parquet: 10 records cannot be used: row 0 has label True \(a "
                                            r"label is one integer or one string\); row 1 has label (True|False) .*; "
                                            r"and 5 more$"):
            load_splits(DataConfig(path=str(folder)))


def test_a_folders_file_names_are_read_in_any_case(tmp_path):
    folder = tmp_path / "upper"
    write(folder, "Train", "csv", TEXTS, LABELS).rename(folder / "Train.CSV")
    write(folder, "TEST", "jsonl", TEXTS, LABELS)
    source = find_source(DataConfig(path=str(folder)))
    assert {k: p.name for k, p in source.files.items()} == {"train": "Train.CSV", "test": "TEST.jsonl"}
    write(folder, "train", "csv", TEXTS, LABELS)
    with pytest.raises(DataError, match=r"several train files \(Train.CSV, train.csv\)"):
        find_source(DataConfig(path=str(folder)))


def test_a_folder_or_a_broken_link_named_as_a_split_file_is_named(tmp_path):
    """A train.parquet/ folder (a data set written in parts) or a link to nothing was "no train file"."""
    folder = tmp_path / "parts"
    write(folder, "test", "csv", TEXTS, LABELS)
    (folder / "train.parquet").mkdir()
    with pytest.raises(DataError, match=r"train.parquet: a folder, not a file \(data written in parts"):
        find_source(DataConfig(path=str(folder)))
    (folder / "train.parquet").rmdir()
    (folder / "train.csv").symlink_to(tmp_path / "gone.csv")
    with pytest.raises(DataError, match=r"train.csv: a broken symbolic link \(to .*gone.csv\)"):
        find_source(DataConfig(path=str(folder)))
    write(folder, "train", "jsonl", TEXTS, LABELS)  # a file of the split beside it: that one is read
    assert find_source(DataConfig(path=str(folder))).files["train"].name == "train.jsonl"


def test_a_byte_order_mark_inside_a_file_a_date_label_and_a_column_in_other_case(tmp_path):
    """A file appended with its byte-order mark (no header) made '\ufeff1' a class of its own; a date column taken
    for the labels made each time a class; a header `Text,Label` is named as a case difference."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    body = "".join(f"text {i},{i % 2}\n" for i in range(10))
    (tmp_path / "bom.csv").write_text("text,label\n" + body + "\ufeffgood one,1\n\ufeff\"a, b\",0\n", encoding="utf-8")
    split = read_file(tmp_path / "bom.csv", DataConfig())
    assert split.labels.tolist()[-2:] == [1, 0] and split.texts.to_pylist()[-2:] == ["good one", "a, b"]
    assert split.labels.dtype.kind == "i"  # integers still: no string label '\ufeff1'
    times = pa.array([0, 10**18], pa.timestamp("ns"))
    pq.write_table(pa.table({"text": ["a", "b"], "label": times}), tmp_path / "dates.parquet")
    with pytest.raises(DataError, match=r"dates.parquet: the 'label' column holds timestamp\[ns\] values, not labels"):
        read_file(tmp_path / "dates.parquet", DataConfig())
    (tmp_path / "cased.csv").write_text("Text,Label\na,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="no 'text' column .columns: Text, Label.; the column 'Text' differs in case"):
        read_file(tmp_path / "cased.csv", DataConfig())


def test_a_carve_that_leaves_nothing_to_train_names_the_limit(tmp_path):
    folder = write(tmp_path / "d", "train", "csv", TEXTS, LABELS).parent
    write(folder, "test", "csv", TEXTS, LABELS)
    with pytest.raises(DataError, match=r"holding out data.val_fraction=0.1 of the 1 kept by data.limit=1 for "
                                        "validation leaves none to train on; raise data.limit"):
        load_splits(DataConfig(path=str(folder), limit=1))
    with pytest.raises(DataError, match=r"val_fraction=0.99 of its 10 for validation leaves none to train on; give "
                                        "more texts"):  # the limit cut nothing
        load_splits(DataConfig(path=str(folder), limit=50, val_fraction=0.99))


def test_a_folder_that_cannot_be_listed_is_read_by_its_files_names(tmp_path, monkeypatch):
    """A folder that may be entered but not listed (mode 0o111): its files are found by their exact names. The
    refusal to list is simulated (root, which runs these tests, may list any folder)."""
    folder = tmp_path / "unlisted"
    write(folder, "train", "csv", TEXTS, LABELS)
    write(folder, "test", "jsonl", TEXTS, LABELS)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(folder), "iterdir", denied)
    assert {k: p.name for k, p in find_source(DataConfig(path=str(folder))).files.items()} == {
        "train": "train.csv", "test": "test.jsonl"}


def test_a_class_whose_only_examples_go_to_validation_is_refused(tmp_path):
    """Classes are counted in the training part that is kept, after data.limit and the validation carve: a class
    left only in validation would be one the model never sees."""
    write(tmp_path, "train", "csv", TEXTS * 3 + ["the one rare text"], LABELS * 3 + ["rare"])
    write(tmp_path, "test", "csv", TEXTS, LABELS)
    outcomes = []
    for seed in range(12):
        try:
            splits, names = load_splits(DataConfig(path=str(tmp_path), val_fraction=0.3, split_seed=seed))
            outcomes.append(names.index("rare") in splits["train"].labels)
        except DataError as exc:
            assert "no training example of class 'rare' is left after the validation carve " \
                   f"(data.val_fraction=0.3), with data.split_seed={seed}" in str(exc)
            assert "data.stratify=true keeps each class in its share" in str(exc)
            outcomes.append("refused")
    assert "refused" in outcomes and True in outcomes and False not in outcomes, outcomes
    # stratified, the one rare text stays in training at every seed
    assert all(names.index("rare") in splits["train"].labels for splits, names in (
        load_splits(DataConfig(path=str(tmp_path), val_fraction=0.3, split_seed=s, stratify=True)) for s in range(12)))
    # with a validation file nothing is carved: data.limit alone leaves the class out
    write(tmp_path, "validation", "csv", TEXTS, LABELS)
    with pytest.raises(DataError, match=r"no training example of class .*'rare' is left after data.limit=5, "
                                        r"with data.split_seed=0; add examples"):
        load_splits(DataConfig(path=str(tmp_path), limit=5))


def test_integer_labels_past_the_named_classes_say_they_are_positions(tmp_path):
    """Star ratings 1-5 named by data.label_names: integers are positions in that list (0-4), so 5 is none; the
    error says how integers are read, not only that 5 is not a class."""
    write(tmp_path, "train", "csv", TEXTS, [1, 2, 3, 4, 5] * 2)
    write(tmp_path, "test", "csv", TEXTS[:2], [1, 2])
    stars = ["one star", "two stars", "three stars", "four stars", "five stars"]
    with pytest.raises(DataError, match=r"line 7 has label 5, which is not one of the classes .*an integer label is "
                                        r"a class's position there, 0 to 4"):
        load_splits(DataConfig(path=str(tmp_path), label_names=stars))


def test_every_record_without_a_text_or_label_is_counted_in_one_error(tmp_path):
    """An export with several bad records: one run names how many there are and the first five, not one per run."""
    texts, labels = list(TEXTS), list(LABELS)
    for row in (1, 4, 8):
        texts[row] = "  "
    for row in (2, 6, 9):
        labels[row] = ""
    write(tmp_path, "train", "csv", texts, labels)
    write(tmp_path, "test", "csv", TEXTS[:2], LABELS[:2])
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(path=str(tmp_path)))
    message = str(err.value)
    assert message.endswith("train.csv: 6 records cannot be used: line 3 has an empty text; line 4 has no label; "
                            "line 6 has an empty text; line 8 has no label; line 10 has an empty text; and 1 more")
