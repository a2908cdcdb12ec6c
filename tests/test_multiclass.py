"""More than two classes end to end: real 2-process runs on generated 4-class CSV data (DDP over gloo), a stop by
signal and a bitwise resume, the label set as part of the run's identity, prediction, the n-gram head's per-class
ratios, and a short run on the real six-class emotion tweets when a copy is there."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (EMOTIONS, NEUTRAL, REAL_EMOTION, REPO, direct_cmd, launch_cmd, make_emotions, member_alone,
                      read_jsonl, run, tiny_overrides, train_rows, write_csv)
from test_resume import start, stop_at

@pytest.fixture(scope="module")
def emotions_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("emotions"), {"train": make_emotions(1600, 0),
                                                           "test": make_emotions(400, 1)})


def overrides(run_dir, data, **extra):
    """An ensemble of two models beside one shared n-gram head (a regression per class), label smoothing and a
    moving average of the weights (evaluated, exported and restored on resume)."""
    return tiny_overrides(run_dir, data, **{"train.debug_records": "true", "train.select_metric": "macro_f1",
                                            "model.members": 2, "model.ngram_max_n": 2, "model.ngram_buckets": 4096,
                                            "train.label_smoothing": 0.1, "train.ema_decay": 0.95, **extra})


def val_rows(run_dir):
    return [(r["step"], r["val/loss"], r["val/macro_f1"]) for r in read_jsonl(run_dir / "metrics.jsonl")
            if "val/loss" in r]


def digests(run_dir):
    return [read_jsonl(run_dir / "debug" / f"weights-rank{r}.jsonl")[-1]["sha256"] for r in (0, 1)]


@pytest.mark.slow
def test_four_classes_in_two_processes_learn_stop_resume_bitwise_and_predict(tmp_path, emotions_csv, cache_env):
    ref = tmp_path / "ref"
    proc = run(launch_cmd(2, overrides(ref, emotions_csv)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = digests(ref)
    assert d[0] == d[1], "DDP ranks ended with different parameters"
    rows = read_jsonl(ref / "metrics.jsonl")
    val = [r for r in rows if "val/acc" in r][-1]
    test = [r for r in rows if "test/acc" in r][0]
    assert val["val/n"] == 160 and test["test/n"] == 400  # every review counted once over the two processes
    assert test["test/acc"] > 0.8 and test["test/macro_f1"] > 0.8  # chance: 0.25
    for head in ("rnn0", "rnn1", "ngram"):  # each member's recurrent head and the shared n-gram head, alone
        assert test[f"test/acc_{head}"] > 0.5
    confusion = test["test/confusion"]
    assert len(confusion) == 4 and sum(map(sum, confusion)) == 400
    assert [sum(row) for row in confusion] == [test[f"test/support/{c}"] for c in EMOTIONS]
    # the two ranks trained on disjoint halves that together cover each epoch
    seen = [read_jsonl(ref / "debug" / f"samples-rank{r}.jsonl") for r in (0, 1)]
    for epoch in (0, 1):
        ids = [[i for row in rank if row["epoch"] == epoch for i in row["ids"]] for rank in seen]
        assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == 1440
    # the 2-process test figures are those of one process scoring the whole test file with the exported model
    alone = subprocess.run([sys.executable, "-m", "distsent.evaluate", "--model", str(ref / "best"), "--split",
                            "test"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert json.loads(alone.stdout.splitlines()[0])["confusion"] == confusion
    assert "anger" in alone.stderr and "macro-F1" in alone.stderr  # the per-class report
    # classes named by words: an integer label is no class (it used to be read as the class at that position)
    (tmp_path / "ints.csv").write_text("text,label\nfear1 fear2,1\njoy4 joy5,2\n")
    ints = subprocess.run([sys.executable, "-m", "distsent.evaluate", "--model", str(ref / "best"), "--file",
                           str(tmp_path / "ints.csv")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ints.returncode == 2 and "ints.csv: line 2 has label 1, which is not one of the classes" in ints.stderr

    # stopped by a signal mid-epoch, then resumed: the same weights and losses, bit for bit
    run_dir = tmp_path / "run"
    stop_at(run_dir, 50, start(2, overrides(run_dir, emotions_csv)))
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    proc = run(launch_cmd(2, overrides(run_dir, emotions_csv)))
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert digests(run_dir) == d
    assert [(r["step"], r["train/loss"]) for r in train_rows(run_dir)] == [
        (r["step"], r["train/loss"]) for r in train_rows(ref)]
    # validation scores the moving average, which the checkpoint carried over the stop
    assert val_rows(run_dir) == val_rows(ref) and len(val_rows(ref)) == 2
    assert ((run_dir / "best" / "model.safetensors").read_bytes() == (ref / "best" / "model.safetensors").read_bytes())

    # the classes are part of the run's identity: another label order cannot resume it
    proc = run(direct_cmd(overrides(run_dir, emotions_csv, **{
        "data.label_names": "[joy, anger, fear, sadness]", "train.epochs": 3})))
    assert proc.returncode == 2
    assert ("label_names: checkpoint ['anger', 'fear', 'joy', 'sadness'], config ['joy', 'anger', 'fear', "
            "'sadness']") in proc.stderr
    proc = run(direct_cmd(overrides(run_dir, emotions_csv, **{"model.members": 3, "train.epochs": 3})))
    assert proc.returncode == 2 and "model.members: checkpoint 2, config 3" in proc.stderr

    from distsent.predict import Predictor

    predictor = Predictor.load(ref / "best")
    assert predictor.label_names == EMOTIONS
    out = predictor.predict(["fear1 fear2 fear7 word3", "joy4 joy5 the movie"])
    assert [r["label"] for r in out] == ["fear", "joy"]
    for r in out:
        assert set(r["probabilities"]) == set(EMOTIONS) and "p_positive" not in r
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["probability"] == max(r["probabilities"].values())
    # the folder holds both members: their probabilities, each member (with the shared n-gram head) loaded as a
    # single model, average to the prediction
    from safetensors.torch import load_file

    texts = ["fear1 fear2 word3", "joy4 anger2 the movie", "sadness1"]
    weights = load_file(ref / "best" / "model.safetensors")
    vocab = predictor.tokenizer.get_vocab_size()
    alone = [Predictor(member_alone(weights, predictor.cfg.model, vocab, 4, i), predictor.tokenizer, predictor.cfg,
                       EMOTIONS).probabilities(texts)[0] for i in (0, 1)]
    assert not np.allclose(alone[0], alone[1], atol=1e-3)
    assert np.allclose(predictor.probabilities(texts)[0], (alone[0] + alone[1]) / 2, atol=1e-6)


def test_multiclass_ngram_ratios_against_a_hand_computation():
    """One-vs-rest naive-Bayes ratios per class: r[c, f] = log((p / |p|) / (q / |q|)) with p the add-one smoothed
    counts of reviews of class c holding word f, q those of every other class."""
    import math

    from distsent.config import ModelConfig
    from distsent.model import NgramHead

    head = NgramHead(8, ModelConfig(ngram_max_n=1), num_classes=3)
    ids = torch.tensor([[2, 3, 0], [2, 4, 0], [4, 4, 5], [3, 0, 0]])
    lengths, labels = torch.tensor([2, 2, 3, 1]), torch.tensor([0, 1, 2, 0])
    head.fit_ratios([(ids, lengths, labels)])
    has = {0: {2: 1, 3: 2}, 1: {2: 1, 4: 1}, 2: {4: 1, 5: 1}}  # reviews of each class holding each word (once each)
    for c in range(3):
        p = [has[c].get(f, 0) + 1 for f in range(8)]
        q = [sum(has[k].get(f, 0) for k in has if k != c) + 1 for f in range(8)]
        expected = [math.log((p[f] / sum(p)) / (q[f] / sum(q))) for f in range(8)]
        assert head.ratio[c].tolist() == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        head.weight.fill_(1.0)
    logits = head(ids, lengths)  # each class's logit: the ratios of the review's distinct words
    assert logits.shape == (4, 3)
    assert logits[2].tolist() == pytest.approx((head.ratio[:, 4] + head.ratio[:, 5]).tolist(), rel=1e-6)


def test_binary_loss_is_the_tutorials_bce():
    """Two classes keep the single logit and BCEWithLogitsLoss per head (IMDB runs unchanged)."""
    import torch.nn.functional as F

    from distsent.config import ModelConfig
    from distsent.model import build_model

    model = build_model(30, ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1, ngram_max_n=2,
                                        ngram_buckets=64))
    assert model.fc.out_features == 1
    heads, labels = torch.randn(5, 2), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    expected = F.binary_cross_entropy_with_logits(heads, labels.unsqueeze(1).expand_as(heads), reduction="none").sum(1)
    assert torch.equal(model.head_losses(heads, labels), expected)
    many = build_model(30, ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1), num_classes=6)
    assert many.fc.out_features == 6
    logits = torch.randn(5, 6)
    assert torch.equal(many.head_losses(logits.unsqueeze(1), labels.long()),
                       F.cross_entropy(logits, labels.long(), reduction="none"))


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_EMOTION / "train.csv").is_file(), reason=f"no emotion copy at {REAL_EMOTION}")
def test_real_emotion_short_run_then_predict(tmp_path, cache_env):
    run_dir = tmp_path / "emotion"
    proc = run(direct_cmd([f"output_dir={run_dir}", f"data.path={REAL_EMOTION}", "train.max_steps=350",
                           "log.trackers=[]", "train.mixed_precision=no"], config="configs/emotion.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16000 train / 2000 val / 2000 test texts" in proc.stderr
    test = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "test/acc" in r][0]
    assert test["test/n"] == 2000 and test["test/acc"] > 0.5  # six classes, the largest 35%
    out = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(run_dir / "best"),
                          "i feel so happy and excited today", "i am terrified of the dark"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    six = {"anger", "fear", "joy", "love", "sadness", "surprise"}
    assert all(set(r["probabilities"]) == six and r["label"] in six for r in results)
    # the test file itself through --file (its label column unused): the trainer's test accuracy, tweet for tweet
    # up to the last bits of a differently padded batch
    out = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(run_dir / "best"), "--file",
                          str(REAL_EMOTION / "test.csv")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.split("\n") if line]
    with open(REAL_EMOTION / "test.csv", newline="", encoding="utf-8") as f:
        gold = [row["label"] for row in csv.DictReader(f)]
    assert len(results) == len(gold) == 2000 and results[0]["line"] == 2
    right = sum(r["label"] == y for r, y in zip(results, gold))
    assert abs(right - round(test["test/acc"] * 2000)) <= 2


def test_with_data_symbols_an_emoji_alone_tells_the_class(tmp_path, cache_env):
    """Tweets whose emotion only an emoji says (their words are filler drawn alike for every class): with
    data.symbols the emoji are tokens, the model learns them, and its saved tokenizer.json reads them at prediction,
    a text of emoji alone included. Without data.symbols the same texts keep no emoji: nothing to learn from."""
    from distsent.config import DataConfig
    from distsent.predict import Predictor
    from distsent.tokenizer import train_tokenizer
    from distsent.train import main

    faces = {"anger": "😡", "fear": "😱", "joy": "😂", "sadness": "😢"}

    def tweets(n, seed):
        rng = np.random.default_rng(seed)
        labels = [EMOTIONS[i] for i in rng.integers(0, len(EMOTIONS), n)]
        return [" ".join(rng.choice(NEUTRAL, size=int(rng.integers(4, 15)))) + " " + faces[y] * int(rng.integers(1, 3))
                + "!" * int(rng.integers(0, 3)) for y in labels], labels

    train = tweets(800, 0)
    assert not set(faces.values()) & set(train_tokenizer(train[0], DataConfig(min_freq=1)).get_vocab())
    run_dir = tmp_path / "run"
    assert main(["--config", str(REPO / "configs" / "smoke.yaml"), *tiny_overrides(
        run_dir, write_csv(tmp_path / "tweets", {"train": train, "test": tweets(200, 1)}),
        **{"data.symbols": "true", "data.strip_html": "false", "train.epochs": 3})]) == 0
    test = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "test/acc" in r][0]
    assert test["test/acc"] > 0.9, test  # four classes: 25% by chance
    results = Predictor.load(run_dir / "best").predict(["😢", "word1 the movie 😂😂"])
    assert [r["label"] for r in results] == ["sadness", "joy"] and "warning" not in results[0]


def test_label_smoothing_targets():
    """train.label_smoothing: C classes put 1 - e + e/C on the true class and e/C on each other one; two classes give
    the single logit the same two-class distribution (its BCE equals the smoothed cross-entropy of logits [0, z])."""
    import torch.nn.functional as F

    from distsent.config import ConfigError, ModelConfig, TrainConfig
    from distsent.model import build_model

    e, labels = 0.2, torch.tensor([0, 3, 5, 1])
    many = build_model(30, ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1), num_classes=6)
    logits = torch.randn(4, 6, dtype=torch.float64)
    target = torch.full((4, 6), e / 6, dtype=torch.float64)
    target[torch.arange(4), labels] += 1 - e
    expected = -(target * torch.log_softmax(logits, -1)).sum(1)
    assert torch.allclose(many.head_losses(logits.unsqueeze(1), labels.float(), e), expected)
    assert not torch.allclose(many.head_losses(logits.unsqueeze(1), labels.float()), expected)

    two = build_model(30, ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1))
    z, y = torch.randn(4, 1, dtype=torch.float64), torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    pair = torch.cat([torch.zeros_like(z), z], dim=1)  # softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]
    assert torch.allclose(two.head_losses(z, y, e), F.cross_entropy(pair, y.long(), reduction="none",
                                                                    label_smoothing=e))
    with pytest.raises(ConfigError, match="train.label_smoothing"):
        TrainConfig(label_smoothing=1.0)


def test_class_weights_balanced_and_sqrt():
    """balanced: n / (C x count); sqrt: its square root scaled so that the mean weight of a training review is 1."""
    from types import SimpleNamespace

    import numpy as np

    from distsent.build import class_weights
    from distsent.configfile import load_config

    class Split:  # what class_weights reads of a tokenized split
        labels = np.array([0] * 6 + [1] * 3 + [2] * 1)

        def __len__(self):
            return len(self.labels)

    labels, data = Split.labels, SimpleNamespace(train=Split(), num_classes=3)
    weights = {}
    for kind in ("none", "balanced", "sqrt"):
        cfg = load_config(REPO / "configs" / "emotion.yaml", [f"train.class_weights={kind}"])
        weights[kind] = class_weights(cfg, data, "cpu")
    assert weights["none"] is None
    assert weights["balanced"].tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    raw = np.sqrt([10 / 18, 10 / 9, 10 / 3])
    assert weights["sqrt"].tolist() == pytest.approx((raw * 10 / (raw * [6, 3, 1]).sum()).tolist())
    for w in (weights["balanced"], weights["sqrt"]):
        assert float(w[torch.from_numpy(labels)].mean()) == pytest.approx(1.0)
