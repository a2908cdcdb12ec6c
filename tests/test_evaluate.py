"""Evaluation metrics (metrics.py, one implementation for training and distsent-evaluate) against hand-computed
values and brute-force definitions, and the command writing its figures."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, binary_score, make_reviews, score, write_parquet


def test_roc_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1), 2)  # rounding makes ties
    pos, neg = p[y == 1], p[y == 0]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert abs(binary_score(p, y)["roc_auc"] - pairwise) < 1e-12  # in float64, not torchmetrics' default float32
    assert binary_score(np.where(y == 1, 0.9, 0.1) + 1e-3 * rng.random(300), y)["roc_auc"] == 1.0  # not 0.99999988
    assert torch.get_default_dtype() == torch.float32  # put back


def test_binary_metrics_follow_the_logits_at_their_extremes():
    """ROC-AUC depends on the logits' order alone: the sigmoid rounds every logit above about 37 to 1.0 (a tie), which
    scored 0.75 here. A logit just above 0 is positive, as training's accuracy and prediction call it, where its
    probability rounds to exactly 0.5 and torchmetrics' threshold called it negative; the same for each head."""
    from distsent.metrics import score_logits

    classes = ["negative", "positive"]
    assert score_logits(torch.tensor([36.0, 37.0, 38.0, 39.0]), torch.tensor([0, 0, 1, 1]), classes)["roc_auc"] == 1.0
    assert score_logits(torch.tensor([-40.0, -39.0, 50.0, 40.0]), torch.tensor([0, 0, 1, 1]), classes)["roc_auc"] == 1.0
    heads = torch.tensor([[1e-17, 2.0], [-1.0, -1.0]])
    m = score_logits(torch.tensor([1e-17, -1.0]), torch.tensor([1, 0]), classes, heads, ("rnn", "ngram"))
    assert (m["acc"], m["tp"], m["acc_rnn"], m["acc_ngram"]) == (1.0, 1, 1.0, 1.0)


def test_ece_small_when_calibrated_large_when_overconfident():
    rng = np.random.default_rng(1)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(int)  # labels drawn with probability p: calibrated
    assert binary_score(p, y)["ece"] < 0.01
    overconfident = np.where(p >= 0.5, 1.0, 0.0)
    assert binary_score(overconfident, y)["ece"] > 0.2
    m = binary_score(p, y)
    pred = p > 0.5
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum()),
                                                    int((~pred & (y == 0)).sum()), int((~pred & (y == 1)).sum()))
    assert abs(m["acc"] - ((p > 0.5) == y).mean()) < 1e-12


def test_multiclass_metrics_by_hand_and_a_class_absent_from_the_split():
    """Per-class precision / recall / F1, the confusion matrix and macro-F1 for four classes, worked by hand; a
    class that neither occurs nor is predicted (a small file without it) does not enter macro-F1 as a zero."""
    classes = ["anger", "joy", "love", "fear"]
    labels = np.array([0, 0, 0, 1, 1, 2])  # no "fear"
    predicted = np.array([0, 0, 1, 1, 1, 1])
    m = score(np.eye(4)[predicted] * 0.7 + 0.075, labels, classes)
    assert m["confusion"] == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert (m["precision/anger"], m["recall/anger"], m["f1/anger"]) == (1.0, 2 / 3, 0.8)
    assert (m["precision/joy"], m["recall/joy"]) == (0.5, 1.0) and abs(m["f1/joy"] - 2 / 3) < 1e-12
    assert m["f1/love"] == 0.0 and m["support/love"] == 1 and m["support/fear"] == 0
    assert abs(m["macro_f1"] - (0.8 + 2 / 3 + 0.0) / 3) < 1e-12 and abs(m["acc"] - 4 / 6) < 1e-12
    # distsent-evaluate's table counts each class's predictions and marks the class its macro-F1 leaves out
    from distsent.evaluate import report

    rows = {line.split()[0]: line for line in report(m, classes).splitlines()[1:5]}
    assert rows["joy"].split()[4:] == ["2", "4"] and rows["love"].split()[4:] == ["1", "0"]
    assert rows["fear"].endswith("0          0  (not in macro-F1: no texts, none predicted)")
    assert "not in macro-F1" not in rows["love"] + rows["anger"] + rows["joy"]


def test_evaluate_command_on_a_labeled_file(model_dir, tmp_path):
    texts, labels = make_reviews(40, 7)
    f = tmp_path / "labeled.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "distsent.evaluate", "--model", str(model_dir), "--file", str(f),
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[0])
    assert summary["n"] == 40 and {"acc", "f1", "roc_auc", "ece"} <= set(summary)
    for png in ("confusion.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "metrics.json").read_text())  # the metrics, with what was scored by which model
    assert (written["model"], written["file"], written["n"]) == (str(model_dir.resolve()), str(f.resolve()), 40)
    # the same records under other column names, named on the command line: the same metrics
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"review": t, "stars": y}) + "\n" for t, y in zip(texts, labels)))
    proc = subprocess.run([sys.executable, "-m", "distsent.evaluate", "--model", str(model_dir), "--file", str(other),
                           "--text-column", "review", "--label-column", "stars"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0]) == summary
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": 3}\n')
    proc = subprocess.run([sys.executable, "-m", "distsent.evaluate", "--model", str(model_dir), "--file", str(bad)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "bad.jsonl: line 1 has label 3, which is not one of the classes" in proc.stderr


def test_evaluate_without_matplotlib_writes_the_metrics_and_says_so_in_one_line(model_dir, tmp_path):
    texts, labels = make_reviews(20, 8)
    f = tmp_path / "labeled.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    out = tmp_path / "eval"
    code = ("import sys, torchmetrics  # loaded first: it looks for matplotlib itself\n"
            "sys.modules['matplotlib'] = None  # as on an install without it\n"
            "from distsent.evaluate import main\n"
            f"sys.exit(main(['--model', {str(model_dir)!r}, '--file', {str(f)!r}, '--out', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["n"] == 20
    assert "no figures: the figures need matplotlib" in proc.stderr and "Traceback" not in proc.stderr


def export_tiny_model(folder, overrides, built_with=None):
    """A model folder with random weights from `overrides`; built_with: the model's own overrides, where its weights
    should not fit the config the folder records."""
    import torch

    from distsent.checkpoint import export_model
    from distsent.config import DataConfig
    from distsent.configfile import load_config
    from distsent.model import build_model
    from distsent.tokenizer import train_tokenizer

    small = ["model.embedding_dim=16", "model.hidden_dim=16", "data.max_len=20", "data.min_freq=1"]
    cfg = load_config(None, small + overrides)
    tok = train_tokenizer(make_reviews(50, 0)[0], DataConfig(min_freq=1))
    torch.manual_seed(0)
    model = build_model(tok.get_vocab_size(), load_config(None, small + (built_with or overrides)).model)
    export_model(folder, model, tok, cfg, {"step": 0})
    return folder


def test_evaluate_data_path_replaces_the_files_the_config_names(tmp_path, capsys):
    """A model trained on files named one by one (data.train_file, ...) is evaluated on a folder given with
    --data-path: the folder replaces them (they were preferred over it, and did not exist here)."""
    from conftest import write_parquet
    from distsent.evaluate import main

    gone = tmp_path / "elsewhere"
    model = export_tiny_model(tmp_path / "run" / "best", [f"data.train_file={gone}/train.csv",
                                                          f"data.test_file={gone}/test.csv"])
    data = write_parquet(tmp_path / "data", {"train": make_reviews(60, 1), "test": make_reviews(30, 2)})
    assert main(["--model", str(model), "--split", "test"]) == 2
    assert "--data-path DIR reads the splits from a folder" in capsys.readouterr().err
    assert main(["--model", str(model), "--split", "test", "--data-path", str(data)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 30
    for alias in ("validation", "dev"):  # the names a validation file may have
        assert main(["--model", str(model), "--split", alias, "--data-path", str(data)]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 6  # data.val_fraction 0.1 of 60
    # a copy whose columns have other names: named as for a --file
    import pyarrow.parquet as pq

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in data.glob("*.parquet"):
        pq.write_table(pq.read_table(f).rename_columns(["review", "sentiment"]), renamed / f.name)
    assert main(["--model", str(model), "--split", "test", "--data-path", str(renamed)]) == 2
    assert "no 'text' column (columns: review, sentiment)" in capsys.readouterr().err
    assert main(["--model", str(model), "--split", "test", "--data-path", str(renamed), "--text-column", "review",
                 "--label-column", "sentiment"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 30


def test_evaluate_a_model_folder_whose_weights_do_not_fit_its_config_is_one_line(tmp_path, capsys):
    from distsent.evaluate import main

    model = export_tiny_model(tmp_path / "best", ["model.hidden_dim=32"], built_with=["model.hidden_dim=16"])
    texts, labels = make_reviews(10, 3)
    f = tmp_path / "labeled.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    assert main(["--model", str(model), "--file", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distsent-evaluate: ") and "size mismatch" in err, err


def test_the_same_classes_in_another_order_or_as_classlabel_indices_are_matched_by_name(tmp_path, capsys):
    """A model whose classes came from a hub ClassLabel (joy, anger, fear: not sorted) is evaluated on a CSV copy
    (string labels, classes sorted) with --split --data-path and --file, and on a datasets parquet file whose
    ClassLabel orders the classes a third way: each label is matched by its class name, so all three agree."""
    import torch

    from distsent.checkpoint import export_model
    from distsent.configfile import load_config
    from distsent.evaluate import main
    from distsent.model import build_model
    from distsent.tokenizer import train_tokenizer

    names = ["joy", "anger", "fear"]
    texts = [f"{w} word{i % 7}" for i, w in enumerate(["happy", "mad", "scared"] * 12)]
    labels = [["joy", "anger", "fear"][i % 3] if i % 4 else "fear" for i in range(len(texts))]
    folder = tmp_path / "csv"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    cfg = load_config(None, ["model.embedding_dim=16", "model.hidden_dim=16", "data.min_freq=1"])
    tok = train_tokenizer(texts, cfg.data)
    torch.manual_seed(0)
    model = tmp_path / "best"
    export_model(model, build_model(tok.get_vocab_size(), cfg.model, 3), tok, cfg, {"step": 0, "label_names": names})

    def result(*args):
        assert main(["--model", str(model), *args]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out.splitlines()[0])

    by_split = result("--split", "test", "--data-path", str(folder))
    by_file = result("--file", str(folder / "test.csv"))
    order = ["fear", "joy", "anger"]
    save_classlabel(tmp_path / "classlabel.parquet", order, [order.index(y) for y in labels], texts)
    by_classlabel = result("--file", str(tmp_path / "classlabel.parquet"))
    assert by_split["confusion"] == by_file["confusion"] == by_classlabel["confusion"]
    assert sum(map(sum, by_file["confusion"])) == len(texts) and by_file["support/fear"] == labels.count("fear")


def save_classlabel(path, names, ys, texts=None):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    texts = texts or [f"text {i}" for i in range(len(ys))]
    datasets.Dataset.from_dict({"text": texts, "label": ys}, features=features).to_parquet(path)


def test_integer_labels_mean_one_class_in_every_file_with_classlabel_files_about(tmp_path, capsys):
    """Training names the classes of a datasets parquet folder after its ClassLabel, in its order, and refuses bare
    integers in a CSV beside it (evaluate --file could not tell them from the classes named like them); with
    data.label_names, bare integers are positions in it, a ClassLabel's still its names. evaluate --file reads a
    ClassLabel file of the model's classes (a hub data set's own parquet, digits as names) by its names, and integers
    in a CSV for a hub-trained model as the hub's positions."""
    import torch

    from distsent.checkpoint import export_model
    from distsent.config import DataConfig
    from distsent.configfile import load_config
    from distsent.evaluate import main
    from distsent.model import build_model
    from distsent.records import DataError
    from distsent.sources import load_splits
    from distsent.tokenizer import train_tokenizer

    texts, labels = make_reviews(40, 3)
    folder = tmp_path / "parquet"
    folder.mkdir()
    save_classlabel(folder / "train.parquet", ["neg", "pos"], labels, texts)
    (folder / "test.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    with pytest.raises(DataError, match=rf"test.csv: line 2 has label {labels[0]}, which is not one of the classes "
                                        r"\['neg', 'pos'\]"):
        load_splits(DataConfig(path=str(folder), val_fraction=0.1))
    splits, names = load_splits(DataConfig(path=str(folder), val_fraction=0.1, label_names=["pos", "neg"]))
    assert names == ["pos", "neg"] and splits["test"].labels.tolist() == labels  # positions
    assert sorted(np.concatenate([splits["train"].labels, splits["val"].labels]).tolist()) == sorted(
        1 - y for y in labels)  # by name: the ClassLabel's 0 is neg, class 1 here
    cfg = load_config(None, ["model.embedding_dim=16", "model.hidden_dim=16", "data.min_freq=1"])  # the hub's data
    tok = train_tokenizer(texts, cfg.data)
    torch.manual_seed(0)
    for classes in (["1", "2"], ["neg", "pos"]):  # yelp_polarity's ClassLabel, IMDB's
        model = tmp_path / f"best-{classes[0]}"
        export_model(model, build_model(tok.get_vocab_size(), cfg.model, 2), tok, cfg,
                     {"step": 0, "label_names": classes})
        save_classlabel(tmp_path / "hub.parquet", classes, labels, texts)
        (tmp_path / "named.csv").write_text("text,label\n" + "".join(f"{t},{classes[y]}\n"
                                                                     for t, y in zip(texts, labels)))
        results = []
        for f in ("hub.parquet", "named.csv", "parquet/test.csv"):
            code = main(["--model", str(model), "--file", str(tmp_path / f)])
            out, err = capsys.readouterr()
            results.append(json.loads(out.splitlines()[0])["confusion"] if code == 0 else err)
        assert results[0] == results[1], classes
        if classes == ["neg", "pos"]:  # 0/1 in a CSV: the hub's positions
            assert results[2] == results[1]
        else:  # digits as class names are read as written: 0 is none of "1", "2"
            assert "test.csv: line 3 has label 0, which is not one of the classes ['1', '2']" in results[2]


def test_data_path_reads_the_splits_file_whole_with_the_models_classes(tmp_path, capsys):
    """--split test --data-path DIR reads DIR's test file as a --file is read: whole (the model's data.test_limit was
    its run's), with the model's classes (a hub model's neg / pos for a copy's 0 / 1; a class its train file lacks),
    and with no train file beside it. A validation carved from a train file still needs the train file."""
    import torch

    from conftest import write_parquet
    from distsent.checkpoint import export_model
    from distsent.configfile import load_config
    from distsent.evaluate import main
    from distsent.model import build_model
    from distsent.tokenizer import train_tokenizer

    texts, labels = make_reviews(40, 3)
    cfg = load_config(None, ["model.embedding_dim=16", "model.hidden_dim=16", "data.min_freq=1",
                             "data.test_limit=10"])  # the hub's data: IMDB's classes are neg, pos there
    torch.manual_seed(0)
    tok = train_tokenizer(texts, cfg.data)
    export_model(model := tmp_path / "best", build_model(tok.get_vocab_size(), cfg.model, 2), tok, cfg,
                 {"step": 0, "label_names": ["neg", "pos"]})
    data = write_parquet(tmp_path / "copy", {"train": ([texts[0]] * 5, [0] * 5), "test": (texts, labels)})

    def scored(*args):
        assert main(["--model", str(model), *args]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out.splitlines()[0])

    by_split = scored("--split", "test", "--data-path", str(data))
    assert by_split == scored("--file", str(data / "test.parquet")) and by_split["n"] == 40
    assert by_split["support/pos"] == sum(labels)
    (data / "train.parquet").unlink()
    assert scored("--split", "test", "--data-path", str(data)) == by_split
    assert main(["--model", str(model), "--split", "val", "--data-path", str(data)]) == 2
    assert "no train file" in capsys.readouterr().err


def test_evaluate_output_on_a_full_disk_is_one_line(model_dir, tmp_path):
    texts, labels = make_reviews(10, 3)
    f = tmp_path / "labeled.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "distsent.evaluate", "--model", str(model_dir), "--file",
                               str(f)], stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 74 and "cannot write the metrics: No space left on device" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_out_naming_a_file_is_refused_before_scoring(model_dir, tmp_path, capsys):
    from distsent.evaluate import main

    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(model_dir), "--file", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "afile")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--out" in err and "a file; --out names a folder" in err
    assert "none.jsonl" not in err  # refused before the (missing) file was read


def test_a_model_folder_names_where_its_data_was(tmp_path, monkeypatch):
    """best/config.yaml keeps absolute paths, and $DISTSENT_DATA_PATH as data.path, so that --split reads the same
    data from any directory and environment."""
    from distsent.config import DataConfig
    from distsent.sources import located

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTSENT_DATA_PATH", raising=False)
    assert located(DataConfig(path="data")).path == str(tmp_path / "data")
    assert located(DataConfig(train_file="a/train.csv")).train_file == str(tmp_path / "a" / "train.csv")
    assert located(DataConfig()) == DataConfig()  # the hub: nothing to locate
    monkeypatch.setenv("DISTSENT_DATA_PATH", "imdb")
    assert located(DataConfig()).path == str(tmp_path / "imdb")


def test_a_model_folder_of_an_earlier_version_with_a_folder_beside_its_files_still_evaluates(tmp_path, capsys):
    """Earlier versions wrote $DISTSENT_DATA_PATH into best/config.yaml as data.path beside the files the run named
    one by one (which it trained on); a config giving both is refused now, but such a folder still reads its files."""
    from dataclasses import replace

    from distsent.checkpoint import export_model
    from distsent.evaluate import main
    from distsent.predict import Predictor

    texts, labels = make_reviews(40, 3)
    for name in ("mine", "held_out"):
        write_parquet(tmp_path / name, {"train": (texts, labels)})
    model = Predictor.load(export_tiny_model(tmp_path / "best", []))
    data = replace(model.cfg.data, path=str(tmp_path / "elsewhere"),
                   train_file=str(tmp_path / "mine" / "train.parquet"),
                   test_file=str(tmp_path / "held_out" / "train.parquet"))
    export_model(tmp_path / "old", model.model, model.tokenizer, replace(model.cfg, data=data), {"step": 0})
    assert main(["--model", str(tmp_path / "old"), "--split", "test"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 40


def test_evaluate_loss_comes_from_the_logits_of_a_confident_model(tmp_path, capsys):
    """Logits beyond about +-28 round their probabilities to 0 or 1: the loss is computed from the logits, as in
    training, not rebuilt from clamped probabilities (which gave 2.3 for a loss of 5.6)."""
    import torch
    import torch.nn.functional as F
    from distsent.checkpoint import export_model
    from distsent.evaluate import main
    from distsent.predict import Predictor

    model = export_tiny_model(tmp_path / "best", [])
    loud = Predictor.load(model)
    with torch.no_grad():
        loud.model.fc.weight.mul_(400)
        loud.model.fc.bias.mul_(400)
    export_model(tmp_path / "loud", loud.model, loud.tokenizer, loud.cfg, {"step": 0})
    texts, labels = make_reviews(40, 3)
    f = tmp_path / "labeled.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    assert main(["--model", str(tmp_path / "loud"), "--file", str(f)]) == 0
    loss = json.loads(capsys.readouterr().out.splitlines()[0])["loss"]
    logits = torch.from_numpy(Predictor.load(tmp_path / "loud").logits(texts)[0]).double()
    assert logits.abs().max() > 40
    expected = F.binary_cross_entropy_with_logits(logits, torch.tensor(labels, dtype=torch.float64)).item()
    assert loss == pytest.approx(expected, rel=1e-6)


def test_a_classlabel_file_is_read_by_evaluate_as_training_read_it(tmp_path, capsys):
    """A folder of datasets parquet files whose ClassLabel orders the classes positive, negative: training names
    the classes after it, in its order (0 is positive; before, they were named after the integers, 0 negative), and
    evaluate --file reads the model's own test file as training read it: it scores what the same labels written as
    names in a CSV score. With data.label_names ordering the classes otherwise, too."""
    import torch

    from distsent.checkpoint import export_model
    from distsent.configfile import load_config
    from distsent.evaluate import main
    from distsent.model import build_model
    from distsent.sources import load_splits
    from distsent.tokenizer import train_tokenizer

    texts, labels = make_reviews(40, 3)
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "test"):
        save_classlabel(folder / f"{split}.parquet", ["positive", "negative"], labels, texts)
    for extra, expected in (([], ["positive", "negative"]), (["data.label_names=[negative, positive]"],
                                                              ["negative", "positive"])):
        cfg = load_config(None, ["model.embedding_dim=16", "model.hidden_dim=16", "data.min_freq=1",
                                 f"data.path={folder}", *extra])
        splits, names = load_splits(cfg.data)
        named = [["positive", "negative"][y] for y in labels]  # what the file's ClassLabel says
        assert names == expected and [names[y] for y in splits["test"].labels] == named
        (tmp_path / "test.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, named)))
        tok = train_tokenizer(texts, cfg.data)
        torch.manual_seed(0)
        model = tmp_path / f"best-{names[0]}"
        export_model(model, build_model(tok.get_vocab_size(), cfg.model, 2), tok, cfg,
                     {"step": 0, "label_names": names})
        results = []
        for f in (folder / "test.parquet", tmp_path / "test.csv"):
            assert main(["--model", str(model), "--file", str(f)]) == 0, capsys.readouterr().err
            results.append(json.loads(capsys.readouterr().out.splitlines()[0])["confusion"])
        assert results[0] == results[1], names


def test_evaluate_refuses_a_validation_split_the_model_was_not_chosen_on(tmp_path, cache_env):
    """--split val carves validation from the training file again: after rows were added to that file, the carve
    holds other texts, some of which the model trained on. Refused, since the model folder keeps which records its
    validation held (from a real training run); the test split still scores."""
    from conftest import direct_cmd, make_emotions, run, tiny_overrides, write_csv

    data, run_dir = tmp_path / "data", tmp_path / "run"
    texts, labels = make_emotions(200, 0)
    # letters newer than Python's Unicode tables (16.0): the tokenizers library splits them otherwise
    texts = [f"{t} nice\U00010d50word \u1c89ok" if i % 2 else t for i, t in enumerate(texts)]
    write_csv(data, {"train": (texts, labels), "test": make_emotions(40, 1)})
    assert run(direct_cmd(tiny_overrides(run_dir, data, **{"train.max_steps": 4}))).returncode == 0
    evaluate = [sys.executable, "-m", "distsent.evaluate", "--model", str(run_dir / "best"), "--split"]
    proc = subprocess.run([*evaluate, "val"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[0])["n"] == 20, proc.stderr[-2000:]
    # the same rows exported again in another order within each class: every row keeps its class, not its text
    original = (data / "train.csv").read_text(encoding="utf-8")
    rotated = list(texts)
    for label in set(labels):
        rows = [i for i, y in enumerate(labels) if y == label]
        for i, j in zip(rows, rows[1:] + rows[:1]):
            rotated[i] = texts[j]
    write_csv(data, {"train": (rotated, labels)})
    proc = subprocess.run([*evaluate, "val"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--split val: the validation texts read now are not those" in proc.stderr
    (data / "train.csv").write_text(original, encoding="utf-8")
    texts, labels = make_emotions(30, 2)
    with open(data / "train.csv", "a", encoding="utf-8") as f:
        f.writelines(f"{t},{y}\n" for t, y in zip(texts, labels))
    proc = subprocess.run([*evaluate, "val"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--split val: the validation texts read now are not those" in proc.stderr
    proc = subprocess.run([*evaluate, "test"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[0])["n"] == 40
