"""Prediction: the CLI and the Python function on a model folder, including awkward inputs."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, make_reviews, run_env
from distsent.predict import Predictor


def predict_cli(model_dir, *args, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(model_dir), *args], input=stdin,
                          capture_output=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().split("\n") if line]  # not splitlines(): U+2028


def test_batched_equals_one_by_one(model_dir, monkeypatch):
    """Batches of 3, and texts tokenized 4 at a time (ENCODE_CHUNK, which bounds memory): each text's answer is
    its own, in input order."""
    import distsent.predict

    p = Predictor.load(model_dir, batch_size=3)
    texts = make_reviews(10, 5)[0]
    together, words = p.probabilities(texts)
    monkeypatch.setattr(distsent.predict, "ENCODE_CHUNK", 4)
    chunked, chunked_words = p.probabilities(texts)
    alone = np.array([p.probabilities([t])[0][0] for t in texts])
    assert np.allclose(together, alone, atol=1e-6) and np.allclose(chunked, alone, atol=1e-6)
    assert chunked_words.tolist() == words.tolist() and min(words) > 0


def test_awkward_inputs_get_defined_answers(model_dir):
    p = Predictor.load(model_dir)
    long = "good0 " * 5000
    out = p.predict(["good0 word1", "", "   ", long, "?!...", 7, None, "zzzz qqqq"])
    first = out[0]
    assert first["label"] == ("positive" if first["p_positive"] > 0.5 else "negative")
    assert first["probability"] == pytest.approx(max(first["p_positive"], 1 - first["p_positive"]), abs=2e-6)
    assert out[1]["error"].startswith("empty text") and out[2]["error"].startswith("empty text")
    assert "truncated" in out[3] and "5000 words" in out[3]["truncated"]
    assert "warning" in out[4]
    assert "expected a string, got int" in out[5]["error"] and out[6]["error"] == "no text (null)"
    assert out[7]["warning"].startswith("none of the words the model read is in its vocabulary")
    assert "warning" not in out[0] and "warning" not in out[3]
    with pytest.raises(TypeError, match=r"takes a list of texts; to classify one, pass \[text\]"):
        p.predict("good0 word1")  # not 11 one-character texts


@pytest.mark.parametrize("bad, why", [("", "empty text"), ("  ", "empty text"), (None, r"no text \(null\)"),
                                      (float("nan"), r"no text \(null\)"), (7, "expected a string, got int")])
def test_logits_and_probabilities_refuse_a_text_predict_would_answer_with_an_error(model_dir, bad, why):
    """The array methods have no place for a per-text error: the text is named by its index, not given a made-up
    row of logits (an empty text) or a TypeError from deep in the tokenizer (None)."""
    p = Predictor.load(model_dir)
    texts = ["good0 great", "bad1 awful", bad]
    for method in (p.logits, p.probabilities):
        with pytest.raises(ValueError, match=rf"texts\[2\]: {why}"):
            method(texts)
    with pytest.raises(TypeError, match="takes a list of texts"):
        p.logits("good0 great")
    assert p.logits(texts[:2])[0].shape == (2,)


def test_logits_read_an_arrow_array_as_its_list(model_dir):
    """distsent-evaluate passes a read split's texts, an Arrow string array, checked a chunk at a time."""
    import pyarrow as pa

    p = Predictor.load(model_dir)
    texts = ["good0 great", "bad1 awful", "word1 " * 30]
    for array in (pa.array(texts, pa.large_string()), pa.chunked_array([texts[:1], texts[1:]])):
        np.testing.assert_array_equal(p.logits(array)[0], p.logits(texts)[0])
    with pytest.raises(ValueError, match=r"texts\[1\]: no text \(null\)"):
        p.logits(pa.array(["good0", None]))


def test_cli_output_into_a_closed_pipe_ends_quietly(model_dir, tmp_path):
    """`distsent-predict ... | head -1`: the reader leaves after one line; no BrokenPipeError traceback."""
    f = tmp_path / "many.txt"
    f.write_text("good0 great\n" * 20000)
    proc = subprocess.run(f"{sys.executable} -m distsent.predict --model {model_dir} --file {f} | head -1",
                          shell=True, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_cli_arguments_file_and_stdin(model_dir, tmp_path, monkeypatch, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_args = predict_cli(model_dir, "good0 great", "bad1 awful", "word1 " * 20)
    assert [r["text"] for r in by_args] == ["good0 great", "bad1 awful", "word1 " * 13 + "wo..."]  # 80 + "..."
    f = tmp_path / "reviews.txt"
    f.write_bytes(b"good0 great\n\xff\xfe broken\n\nbad1 awful\n")
    by_file = predict_cli(model_dir, "--file", str(f))
    assert len(by_file) == 4
    assert by_file[0]["p_positive"] == by_args[0]["p_positive"] and by_file[3]["p_positive"] == by_args[1]["p_positive"]
    assert "line 2: not valid UTF-8" in by_file[1]["error"] and by_file[1]["text"] is None  # as a data file's
    assert by_file[2]["error"].startswith("empty text")
    assert [(r["row"], r["line"]) for r in by_file] == [(0, 1), (1, 2), (2, 3), (3, 4)] and "line" not in by_args[0]
    assert predict_cli(model_dir, "-", stdin=f.read_bytes()) == by_file
    # a byte order mark (some editors save one) is not part of the first text
    assert predict_cli(model_dir, "-", stdin=b"\xef\xbb\xbf" + f.read_bytes()) == by_file
    # --file - is stdin too (in this process: the same reading, without another start-up)
    from distsent.predict import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f.read_bytes())))
    assert main(["--model", str(model_dir), "--file", "-"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.split("\n") if line] == by_file
    # printed 2 at a time (ENCODE_CHUNK): the same lines, errors in their places; a data file's rows likewise
    import distsent.predict

    monkeypatch.setattr(distsent.predict, "ENCODE_CHUNK", 2)
    assert main(["--model", str(model_dir), "--file", str(f)]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.split("\n") if line] == by_file
    pq.write_table(pa.table({"text": ["good0 great", None, "bad1 awful"]}), tmp_path / "three.parquet")
    assert main(["--model", str(model_dir), "--file", str(tmp_path / "three.parquet")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.split("\n") if line]
    assert [r["row"] for r in rows] == [0, 1, 2] and rows[1]["error"] == "no text (null)"
    assert [rows[0]["p_positive"], rows[2]["p_positive"]] == [by_file[0]["p_positive"], by_file[3]["p_positive"]]


def test_lines_are_read_a_block_at_a_time_whatever_the_blocks_cut(tmp_path):
    """Lines of a file or stdin come a read at a time (never the whole input at once): a line cut between reads,
    a Windows line end, a byte order mark, bytes that are not UTF-8 and a last line without an end come out as
    reading the whole input line by line gives them, numbered from 1. What can be read at once (a file) comes
    together, up to ENCODE_CHUNK lines: batches stay full."""
    from distsent.predict import _line_chunks

    data = b"\xef\xbb\xbffirst\r\nsecond line\n\n\xff bad\nlong " + b"x" * 50 + b"\nlast"
    whole = [raw.rstrip(b"\r") for raw in data.split(b"\n")]
    for size in (1, 3, 7, 64, 1 << 16):
        chunks = list(_line_chunks(io.BytesIO(data), size))
        items = [item for chunk in chunks for item in chunk]
        assert [p["line"] for p, _, _ in items] == list(range(1, 7)), size
        assert [t for _, t, _ in items] == ["first", "second line", "", None, whole[4].decode(), "last"], size
        assert "line 4: not valid UTF-8" in items[3][2]
        assert size > len(data) or len(chunks) > 1
    (tmp_path / "f.txt").write_bytes(data)
    with open(tmp_path / "f.txt", "rb") as f:
        chunks = list(_line_chunks(f, 3))
    assert [len(c) for c in chunks] == [6] and chunks[0] == items


def test_stdin_is_answered_line_by_line_and_any_stdout_encoding_gets_json(model_dir, capsys):
    """A text piped in is answered before the input ends (a reader feeding it one text at a time sees each
    result); a stdout that cannot take every character (a latin-1 locale) gets \\u escapes, not a crash."""
    import select

    proc = subprocess.Popen([sys.executable, "-m", "distsent.predict", "--model", str(model_dir), "-"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_env())
    try:
        proc.stdin.write(b"good0 great\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # the input is still open
        assert ready, "no result before the input ended"
        assert json.loads(proc.stdout.readline())["text"] == "good0 great"
        proc.stdin.write(b"bad1 awful\n")
        proc.stdin.close()
        assert json.loads(proc.stdout.readline())["line"] == 2 and proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
    text = "good0 great \U0001f600 caf\u00e9"
    out = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(model_dir), text],
                         env=run_env({"PYTHONIOENCODING": "latin-1"}), capture_output=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stdout.decode("ascii"))["text"] == text
    from distsent.predict import main  # an input that opens but cannot be read: named as such, not as the output

    assert main(["--model", str(model_dir), "--file", "/proc/self/mem"]) == 2
    assert "distsent-predict: /proc/self/mem: cannot be read: Input/output error" in capsys.readouterr().err


def test_cli_data_files_read_their_text_column(model_dir, tmp_path):
    """A .csv / .jsonl / .parquet --file is read as training reads it: a CSV text holding commas, quotes and a newline
    stays one record, a raw U+2028 inside a JSON string does not end its line, no label column is needed, each result
    names its record's line (row for parquet), and an empty or null text gets an error of its own."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ['good0 great, "really"\u2028ok', "bad1 awful\nand long", "word1"]
    by_args = predict_cli(model_dir, *texts)
    with open(tmp_path / "new.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "tweet"]] + [[i, t] for i, t in enumerate(texts + [" "])])
    (tmp_path / "new.JSONL").write_text("".join(json.dumps({"tweet": t}, ensure_ascii=False) + "\n\n"
                                                for t in texts + [""]), encoding="utf-8")
    pq.write_table(pa.table({"tweet": texts + [None]}), tmp_path / "new.parquet")
    places = {"new.csv": [{"row": 0, "line": 2}, {"row": 1, "line": 3}, {"row": 2, "line": 5}, {"row": 3, "line": 6}],
              "new.JSONL": [{"row": 0, "line": 1}, {"row": 1, "line": 3}, {"row": 2, "line": 5}, {"row": 3, "line": 7}],
              "new.parquet": [{"row": 0}, {"row": 1}, {"row": 2}, {"row": 3}]}
    for name, where in places.items():
        out = predict_cli(model_dir, "--file", str(tmp_path / name), "--text-column", "tweet")
        assert [{k: r[k] for k in w} for r, w in zip(out, where)] == where and len(out) == 4, name
        assert [r["p_positive"] for r in out[:3]] == [r["p_positive"] for r in by_args], name
        assert out[3]["error"] == ("no text (null)" if name == "new.parquet" else "empty text: nothing to classify")
    # the column the model was trained with (text) is not in the file: named, with the columns there are
    proc = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(model_dir), "--file",
                           str(tmp_path / "new.csv")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "new.csv: no 'text' column (columns: id, tweet)" in proc.stderr
    assert "--text-column" in proc.stderr
    (tmp_path / "new.txt").write_text("word1\n")
    (tmp_path / "new.json").write_text('{"text": "word1"}\n')  # not classified line by line, braces and all
    for args, message in ((["--file", str(tmp_path / "new.txt"), "--text-column", "tweet"], "--text-column is for a"),
                          (["--file", str(tmp_path / "new.txt"), "word1"], "give texts or --file, not both"),
                          (["--file", str(tmp_path / "new.json")], "new.json: .json is not read here: a .csv, .jsonl")):
        proc = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(model_dir), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    # a record the reader cannot take is answered with its error; the records around it are classified
    (tmp_path / "some_bad.jsonl").write_text('{"text": "word1"}\n{"text": 5}\nnot json\n{"text": "good0"}\n')
    out = predict_cli(model_dir, "--file", str(tmp_path / "some_bad.jsonl"))
    assert [r["line"] for r in out] == [1, 2, 3, 4] and "label" in out[0] and "label" in out[3]
    assert out[1]["error"] == "line 2: the text is int, expected a string" and out[1]["text"] is None
    assert out[2]["error"].startswith("line 3 is not JSON")
    (tmp_path / "new.2024-05").write_text("word1\n")  # any other name is plain text, one text per line
    assert [r["text"] for r in predict_cli(model_dir, "--file", str(tmp_path / "new.2024-05"))] == ["word1"]


def test_cli_keep_copies_columns_into_each_result(model_dir, tmp_path, capsys):
    """--keep id (an id to join the results back on) copies that column of each record of a .csv / .jsonl / .parquet
    file into its result, as the file holds it (a CSV's as text, a parquet date as its ISO text), also for a record
    that cannot be classified; a JSONL record without it gets null; one named like a result key as file_<name>. A
    column the file lacks, or --keep without a data file, is refused naming it."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from distsent.predict import main

    def results(*args):
        assert main(["--model", str(model_dir), *args]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.split("\n") if line]

    (tmp_path / "new.csv").write_text('id,text,team,label\nt-7,"good0, great",a,positive\nt-9,bad1,b,negative\n')
    out = results("--file", str(tmp_path / "new.csv"), "--keep", "id", "--keep", " team , label")  # spaces trimmed
    assert [(r["id"], r["team"], r["row"]) for r in out] == [("t-7", "a", 0), ("t-9", "b", 1)] and "label" in out[1]
    # a column named like a result key (the true label beside the predicted one) comes as file_<name>
    assert [r["file_label"] for r in out] == ["positive", "negative"] and out[0]["label"] in ("negative", "positive")
    (tmp_path / "new.jsonl").write_text('{"text": "word1", "id": 3}\n{"text": 5, "id": 4}\n{"text": "good0"}\n')
    out = results("--file", str(tmp_path / "new.jsonl"), "--keep", "id")
    assert [r["id"] for r in out] == [3, 4, None] and "error" in out[1] and "label" in out[2]
    when = [datetime.date(2024, 5, 1), datetime.date(2024, 5, 2)]
    pq.write_table(pa.table({"id": [11, 12], "text": ["good0", "bad1"], "when": when}), tmp_path / "new.parquet")
    out = results("--file", str(tmp_path / "new.parquet"), "--keep", "id,when")
    assert [(r["id"], r["when"]) for r in out] == [(11, "2024-05-01"), (12, "2024-05-02")]
    assert [r["p_positive"] for r in out] == [r["p_positive"] for r in results("good0", "bad1")]
    for name in ("new.csv", "new.jsonl", "new.parquet"):  # a column no record has (in JSONL: a typo, not a gap)
        assert main(["--model", str(model_dir), "--file", str(tmp_path / name), "--keep", "ID"]) == 2
        assert f"{name}: no 'ID' column to keep (columns: " in capsys.readouterr().err
    (tmp_path / "new.txt").write_text("word1\n")
    for args, message in ((["--file", str(tmp_path / "new.csv"), "--keep", "label,file_label"],
                           "--keep label and file_label: the first is written as the second"),
                          (["--file", str(tmp_path / "new.txt"), "--keep", "id"], "--keep is for a .csv")):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(model_dir), *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_kept_values_are_strict_json_and_stay_with_records_that_have_an_error(model_dir, tmp_path, capsys):
    """A record that cannot be classified keeps its id (the record a user most needs to join back on); kept values
    print as strict JSON (NaN and infinities null, binary as hex, times in ISO 8601, a lone surrogate U+FFFD, never a
    traceback); a kept column named twice, or holding bytes that are not UTF-8 in a parquet file, is refused."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from distsent.predict import main

    def results(*args):
        assert main(["--model", str(model_dir), *args]) == 0
        return [json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
                for line in capsys.readouterr().out.split("\n") if line]

    (tmp_path / "new.jsonl").write_text('{"id": 1, "text": "good0"}\n{"id": 2}\n{"id": 3, "text": 5}\n'
                                        '{"id": 4, "text": "\\ud83d"}\n{"id": NaN, "text": "a"}\n'
                                        '{"id": 1e999, "text": "a"}\n{"id": "x\\ud83d", "text": "a"}\n[5]\n')
    out = results("--file", str(tmp_path / "new.jsonl"), "--keep", "id")
    assert [r["id"] for r in out] == [1, 2, 3, 4, None, None, "x\ufffd", None]
    assert ["error" in r for r in out] == [False, True, True, True, False, False, False, True]
    (tmp_path / "new.csv").write_bytes(b"id,text\nA,good0\nB,bad\xff1\nC,x,y\nid,text\nE,word1\n")
    out = results("--file", str(tmp_path / "new.csv"), "--keep", "id")
    assert [r["id"] for r in out] == ["A", "B", None, "id", "E"] and ["error" in r for r in out] == [
        False, True, True, True, False]  # not UTF-8; 3 fields; the header repeated (its fields line up)
    stamp = datetime.datetime(2024, 5, 1, 12, 30)
    far = pa.array([10**12, 5], pa.timestamp("s"))  # the year 33658: no Python date, Arrow's text instead
    pq.write_table(pa.table({"text": ["good0", "bad1"], "score": [float("nan"), 0.5], "key": [b"\x00\xff", None],
                             "at": [stamp, None], "far": far}), tmp_path / "new.parquet")
    out = results("--file", str(tmp_path / "new.parquet"), "--keep", "score,key,at,far")
    assert [(r["score"], r["key"], r["at"]) for r in out] == [(None, "00ff", "2024-05-01T12:30:00"), (0.5, None, None)]
    assert out[0]["far"].startswith("<value out of range") and out[1]["far"].startswith("1970-01-01 00:00:05")
    # keys and error messages that quote bytes that were not UTF-8 print too (U+FFFD)
    (tmp_path / "keys.jsonl").write_text('{"text": "ok", "id": {"\\ud800": 1}}\n{"\\udc80x": 1, "id": 2}\n')
    out = results("--file", str(tmp_path / "keys.jsonl"), "--keep", "id")
    assert out[0]["id"] == {"\ufffd": 1} and out[1]["id"] == 2 and "\ufffdx" in out[1]["error"]
    (tmp_path / "twice.csv").write_text("id,text,id\n1,good0,A\n")
    offsets = pa.py_buffer(bytes([0, 0, 0, 0, 2, 0, 0, 0]))
    not_utf8 = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"\xff\xfe")])
    in_list = pa.ListArray.from_arrays(pa.array([0, 1], pa.int32()), not_utf8)
    pq.write_table(pa.table({"text": ["good0"], "name": not_utf8, "tags": in_list}), tmp_path / "bytes.parquet")
    for name, column, message in (("twice.csv", "id", "2 columns are named 'id'"),
                                  ("bytes.parquet", "name", "row 0: the 'name' column is not valid UTF-8"),
                                  ("bytes.parquet", "tags", "the 'tags' column cannot be read"),
                                  ("new.jsonl", "ID", "no 'ID' column to keep (columns: id, text)")):
        assert main(["--model", str(model_dir), "--file", str(tmp_path / name), "--keep", column]) == 2
        assert f"{name}: {message}" in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(tmp_path), "x"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "config.yaml: missing" in proc.stderr


@pytest.mark.parametrize("bias, label", [(-6.0, "negative"), (6.0, "positive")])
def test_probability_is_that_of_the_predicted_label(model_dir, bias, label):
    """A model pushed to one side by its output bias: the probability reported is that of the label it gives."""
    p = Predictor.load(model_dir)
    with torch.no_grad():
        p.model.fc.bias.fill_(bias)
    for result in p.predict(["good0 great movie", "bad0 awful plot", "word1"]):
        assert result["label"] == label and result["probability"] > 0.99
        assert result["probability"] == pytest.approx(1 - result["p_positive"] if label == "negative"
                                                      else result["p_positive"], abs=2e-6)


def test_a_checkpoint_a_model_folder_and_a_run_directory_are_told_apart(model_dir, tmp_path):
    """The folders a run writes, each named where another is expected: predict on a checkpoint, a resume from best/,
    from the run directory itself or from its checkpoints/; each error says what the folder is and which to use."""
    from distsent import checkpoint as ckpt
    from distsent.files import IntegrityError

    step = tmp_path / "run" / "checkpoints" / "step-00000007"
    step.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "state.json"):
        (step / name).write_bytes(b"x")  # the kind of folder is told by its files, before any is checked
    with pytest.raises(IntegrityError, match="is a training checkpoint, not a model folder: use the run's best/"):
        Predictor.load(step)
    with pytest.raises(IntegrityError, match="best: no such folder: the run has not evaluated yet"):
        Predictor.load(tmp_path / "run" / "best")
    with pytest.raises(IntegrityError, match="bset: no such folder$"):  # a typo is no run's missing best/
        Predictor.load(tmp_path / "run" / "bset")
    with pytest.raises(ckpt.CheckpointError, match=r"is a model folder \(such as <run>/best\), which has no optimizer"):
        ckpt.verify(model_dir)
    with pytest.raises(ckpt.CheckpointError, match="is a run directory, not a checkpoint: name one of its"):
        ckpt.verify(tmp_path / "run")
    with pytest.raises(ckpt.CheckpointError, match="is a folder of checkpoints, not a checkpoint: name one of its"):
        ckpt.verify(tmp_path / "run" / "checkpoints")



def test_any_sequence_of_texts_and_non_utf8_arguments(model_dir):
    """A generator and a pandas Series (whose index is not 0..n-1) give what the list gives, text by text; a
    command-line argument that is not UTF-8 gets an error line of its own and the others are classified."""
    import pandas as pd

    p = Predictor.load(model_dir)
    texts = ["good0 great", "bad1 awful", "word3 word4"]
    expected = p.predict(texts)
    assert p.predict(t for t in texts) == expected
    assert p.predict(pd.Series(texts, index=[2, 1, 0])) == expected
    # a table's missing values (NaN in an object column, pandas' NA in a string column) are missing texts
    missing = [{"error": "no text (null)"}] * 2
    assert p.predict(pd.Series([texts[0], None, float("nan")]))[1:] == missing
    assert p.predict(pd.Series([texts[0], None, pd.NA], dtype="string"))[1:] == missing
    assert p.predict(["caf\udce9 good0"]) == [{"error": "not valid UTF-8 (holds a lone surrogate)"}]
    proc = subprocess.run([sys.executable.encode(), b"-m", b"distsent.predict", b"--model", str(model_dir).encode(),
                           b"\xff good0", b"good0 great"], capture_output=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [json.loads(line) for line in proc.stdout.decode().split("\n") if line]
    assert lines[0] == {"text": None, "error": "argument 1: not valid UTF-8"}
    assert lines[1]["p_positive"] == expected[0]["p_positive"]


def test_unwritable_output_closed_stdin_and_damaged_folders_are_one_line(model_dir, tmp_path):
    import shutil

    def cli(*args, stdout=subprocess.PIPE):
        return subprocess.run([sys.executable, "-m", "distsent.predict", "--model", *map(str, args)], text=True,
                              stdout=stdout, stderr=subprocess.PIPE, cwd=REPO, timeout=120)

    with open("/dev/full", "w") as full:  # a full disk: every write fails with ENOSPC
        proc = cli(model_dir, "good0", stdout=full)
    assert proc.returncode == 74 and "cannot write the results: No space left on device" in proc.stderr, proc.stderr
    proc = subprocess.run(f"{sys.executable} -m distsent.predict --model {model_dir} - <&-", shell=True, text=True,
                          capture_output=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "'-' reads the texts from stdin, which is closed" in proc.stderr, proc.stderr
    proc = cli(model_dir, "-", "good0")
    assert proc.returncode == 2 and "'-' (read stdin) cannot be mixed with texts" in proc.stderr
    # folders of earlier versions carry no manifest: damage in them is found while loading, and named
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    (old / "manifest.json").unlink()
    weights = (old / "model.safetensors").read_bytes()
    (old / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    proc = cli(old, "good0")
    assert proc.returncode == 2 and f"{old}: cannot be loaded into this model" in proc.stderr, proc.stderr
    (old / "model.safetensors").write_bytes(weights)
    (old / "meta.json").write_text('{"label_names": [')
    proc = cli(old, "good0")
    assert proc.returncode == 2 and f"{old / 'meta.json'}: unreadable" in proc.stderr, proc.stderr
    (old / "meta.json").write_text("{}")
    (old / "manifest.json").write_text("[]")
    proc = cli(old, "good0")
    assert proc.returncode == 2 and f"{old / 'manifest.json'}: not a manifest" in proc.stderr, proc.stderr


def test_prediction_batches_by_the_models_eval_batch_size(tmp_path):
    """train.eval_batch_size is the batch "for evaluation and prediction": the model folder's, unless one is given;
    the results do not depend on it."""
    from distsent.checkpoint import export_model
    from distsent.config import DataConfig
    from distsent.configfile import load_config
    from distsent.model import build_model
    from distsent.tokenizer import train_tokenizer

    cfg = load_config(None, ["model.embedding_dim=8", "model.hidden_dim=8", "data.min_freq=1",
                             "train.eval_batch_size=7"])
    texts = make_reviews(30, 0)[0]
    tok = train_tokenizer(texts, DataConfig(min_freq=1))
    export_model(tmp_path / "best", build_model(tok.get_vocab_size(), cfg.model), tok, cfg, {"step": 0})
    predictor, small = Predictor.load(tmp_path / "best"), Predictor.load(tmp_path / "best", batch_size=2)
    assert (predictor.batch_size, small.batch_size) == (7, 2)
    np.testing.assert_allclose(predictor.logits(texts)[0], small.logits(texts)[0], atol=1e-6)
