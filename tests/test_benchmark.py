"""The benchmark runs end to end on a tiny subset (so it cannot rot) and reports every number it promises."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, run_env


@pytest.mark.slow
def test_benchmark_runs_on_tiny_subset(tmp_path, synth_imdb, cache_env):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--data", str(synth_imdb), "--limit", "120",
                           "--test-limit", "40", "--epochs", "1", "--threads", "2", "--precisions", "no",
                           "--out", str(out)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"seed", "ds-1x2", "ds-2x1"}  # bf16 rows: see the GPU check's test below
    for name, r in results["runs"].items():
        for key in ("train_samples_per_s", "eval_samples_per_s", "prep_cold_s", "epoch_s", "peak_rss_mib"):
            assert r[key] is not None and r[key] > 0, (name, key)
        assert len(r["acc_per_epoch"]) == 1
    assert results["runs"]["ds-1x2"]["predict_reviews_per_s"] > 0
    assert results["runs"]["ds-2x1"]["train_tokens_per_s"] > 0
    assert set(results["ratios_vs_seed"]) == {"ds-1x2", "ds-2x1"}
    ratio = results["runs"]["ds-2x1"]["train_samples_per_s"] / results["runs"]["seed"]["train_samples_per_s"]
    assert results["ratios_vs_seed"]["ds-2x1"]["train_samples_per_s"] == pytest.approx(ratio)
    assert "| seed |" in proc.stdout and "ds-2x1 / seed" in proc.stdout


def test_benchmark_rounds_report_medians_and_each_rounds_ratio(tmp_path, synth_imdb, monkeypatch, capsys):
    """--repeat N: per run the median over rounds of each number, ratios taken within each round, then their
    median. The rounds are made up here (the arithmetic alone; the runs themselves are tested above)."""
    spec = importlib.util.spec_from_file_location("benchmark_run", REPO / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rounds = iter([{"seed": {"train_samples_per_s": s, "eval_samples_per_s": 10.0, "prep_cold_s": 4.0,
                             "acc_per_epoch": [a]},
                    "ds-2x1": {"train_samples_per_s": d, "eval_samples_per_s": 20.0, "prep_cold_s": 2.0}}
                   for s, d, a in [(100.0, 300.0, 0.5), (50.0, 200.0, 0.6), (80.0, 120.0, 0.7)]])
    monkeypatch.setattr(bench, "one_round", lambda args, tmp: next(rounds))
    out = tmp_path / "results.json"
    assert bench.main(["--data", str(synth_imdb), "--repeat", "3", "--precisions", "no", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["runs"]["seed"]["train_samples_per_s"] == 80.0
    assert results["runs"]["ds-2x1"]["train_samples_per_s"] == 200.0
    assert results["runs"]["seed"]["acc_per_epoch"] == [0.5]  # lists: the first round's
    assert [p["ds-2x1"]["train_samples_per_s"] for p in results["ratios_per_round"]] == [3.0, 4.0, 1.5]
    assert results["ratios_vs_seed"]["ds-2x1"] == {"train_samples_per_s": 3.0, "eval_samples_per_s": 2.0,
                                                   "prep_speedup": 2.0}  # not 200 / 80 = 2.5
    assert "train_samples_per_s x3.00 (rounds: 3.00, 4.00, 1.50)" in capsys.readouterr().out


@pytest.mark.slow
def test_step_profile_runs_and_reports_every_phase():
    proc = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--procs", "2", "--batch", "4", "--tokens",
                           "5", "--vocab", "50", "--steps", "2"], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| Adam")}
    assert set(rows) == {"Adam foreach", "Adam fused"}
    for line in rows.values():
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        assert len(cells) == 6 and all(c.isdigit() for c in cells), line
    assert "all-reduce of a" in proc.stdout and "batch 512:" in proc.stdout


@pytest.mark.slow
def test_lstm_bound_reports_each_precision():
    proc = subprocess.run([sys.executable, "benchmarks/lstm_bound.py", "--device", "cpu", "--batch", "4", "--tokens",
                           "6", "--steps", "2", "--warmup", "1"], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["precision"] for r in rows] == ["no", "bf16"]  # fp16 is a GPU precision: no CPU row
    assert rows[0]["ms_per_step"] > 0 and rows[0]["samples_per_s"] > 0 and rows[0]["lstm_dtype"] == "float32"
    assert rows[1].get("ms_per_step", 0) > 0 or "error" in rows[1]  # a CPU without bf16 LSTM says why


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_a_cpu(tmp_path, synth_imdb, cache_env):
    """The GPU check's plumbing, tiny and on the CPU (its GPU tests then skip): a log and a JSON with every step."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out), str(synth_imdb), "--device", "cpu",
                           "--quick"], cwd=REPO, env=run_env({"PYTHON": sys.executable}), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["gpu_tests"]["rc"] == 0 and any("skipped" in line for line in result["gpu_tests"]["summary"])
    assert result["bound"]["rc"] == 0 and result["bound"]["rows"][0]["ms_per_step"] > 0
    # its quick benchmark runs distsent in bf16 (a row of its own; fp32 rows are tested above)
    assert result["benchmark"]["rc"] == 0 and result["benchmark"]["runs"]["ds-1x1-bf16"]["train_samples_per_s"] > 0
    for name in ("imdb_lstm", "imdb_best"):
        assert result[name]["rc"] == 0 and result[name]["test_acc"] is not None, result[name]["log_tail"]
    assert "gpu_check: all steps ran" in (out / "gpu_check.log").read_text()


def test_gpu_check_runs_only_the_steps_named(tmp_path, synth_imdb, cache_env):
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--data", str(synth_imdb), "--device",
           "cpu", "--quick"]
    proc = subprocess.run([*cmd, "--steps", "bound"], cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["bound"]["rows"] and not {"gpu_tests", "benchmark", "imdb_lstm", "imdb_best"} & set(result)
    proc = subprocess.run([*cmd, "--steps", "bound,imdb"], cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "no step imdb" in proc.stderr


@pytest.mark.slow
def test_preparation_benchmark_reports_cold_and_cached_rows(synth_imdb):
    proc = subprocess.run([sys.executable, "benchmarks/prepare.py", "--data", str(synth_imdb), "--copies", "1", "3"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = proc.stdout.splitlines()
    assert len(rows) == 4 and all("peak RSS" in r and "file-backed" in r for r in rows)
    assert "IMDB x1   prepare (cold cache)     1440 train" in rows[0] and "load (cached)" in rows[1]
    assert "IMDB x3   prepare (cold cache)     4320 train" in rows[2]  # the training split, three times
