"""Evaluation metrics (metrics.py, one implementation for training and distsent-evaluate) against hand-computed
values and brute-force definitions, and the command writing its figures."""

import json
import subprocess
import sys

import numpy as np

from conftest import REPO, binary_score, make_reviews


def test_roc_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1), 2)  # rounding makes ties
    pos, neg = p[y == 1], p[y == 0]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert abs(binary_score(p, y)["roc_auc"] - pairwise) < 1e-8  # torchmetrics sums in float32 in places


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
    from distsent.metrics import score

    classes = ["anger", "joy", "love", "fear"]
    labels = np.array([0, 0, 0, 1, 1, 2])  # no "fear"
    predicted = np.array([0, 0, 1, 1, 1, 1])
    m = score(np.eye(4)[predicted] * 0.7 + 0.075, labels, classes)
    assert m["confusion"] == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert (m["precision/anger"], m["recall/anger"], m["f1/anger"]) == (1.0, 2 / 3, 0.8)
    assert (m["precision/joy"], m["recall/joy"]) == (0.5, 1.0) and abs(m["f1/joy"] - 2 / 3) < 1e-12
    assert m["f1/love"] == 0.0 and m["support/love"] == 1 and m["support/fear"] == 0
    assert abs(m["macro_f1"] - (0.8 + 2 / 3 + 0.0) / 3) < 1e-12 and abs(m["acc"] - 4 / 6) < 1e-12


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
    assert main(["--model", str(model), "--split", "validation", "--data-path", str(data)]) == 0  # alias of val
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 6  # data.val_fraction 0.1 of 60


def test_evaluate_a_model_folder_whose_weights_do_not_fit_its_config_is_one_line(tmp_path, capsys):
    from distsent.evaluate import main

    model = export_tiny_model(tmp_path / "best", ["model.hidden_dim=32"], built_with=["model.hidden_dim=16"])
    texts, labels = make_reviews(10, 3)
    f = tmp_path / "labeled.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    assert main(["--model", str(model), "--file", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distsent-evaluate: ") and "size mismatch" in err, err
