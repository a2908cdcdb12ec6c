"""Prediction: the CLI and the Python function on a model folder, including awkward inputs."""

import json
import subprocess
import sys

import numpy as np

from conftest import REPO, make_reviews
from distsent.predict import Predictor


def predict_cli(model_dir, *args, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(model_dir), *args], input=stdin,
                          capture_output=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def test_batched_equals_one_by_one(model_dir):
    p = Predictor.load(model_dir, batch_size=3)
    texts = make_reviews(10, 5)[0]
    together = p.probabilities(texts)[0]
    alone = np.array([p.probabilities([t])[0][0] for t in texts])
    assert np.allclose(together, alone, atol=1e-6)


def test_awkward_inputs_get_defined_answers(model_dir):
    p = Predictor.load(model_dir)
    long = "good0 " * 5000
    out = p.predict(["good0 word1", "", "   ", long, "?!...", None])
    assert out[0]["label"] in ("positive", "negative") and 0.5 <= out[0]["probability"] <= 1
    assert out[1]["error"].startswith("empty text") and out[2]["error"].startswith("empty text")
    assert "truncated" in out[3] and "5000 words" in out[3]["truncated"]
    assert "warning" in out[4]
    assert "expected a string" in out[5]["error"]


def test_cli_arguments_file_and_stdin(model_dir, tmp_path):
    by_args = predict_cli(model_dir, "good0 great", "bad1 awful")
    assert [r["text"] for r in by_args] == ["good0 great", "bad1 awful"]
    f = tmp_path / "reviews.txt"
    f.write_bytes(b"good0 great\n\xff\xfe broken\n\nbad1 awful\n")
    by_file = predict_cli(model_dir, "--file", str(f))
    assert len(by_file) == 4
    assert by_file[0]["p_positive"] == by_args[0]["p_positive"] and by_file[3]["p_positive"] == by_args[1]["p_positive"]
    assert "line 2: not valid UTF-8" in by_file[1]["error"]
    assert by_file[2]["error"].startswith("empty text")
    assert predict_cli(model_dir, "-", stdin=f.read_bytes()) == by_file


def test_missing_model_folder_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(tmp_path), "x"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "config.yaml: missing" in proc.stderr
