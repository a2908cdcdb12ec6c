"""The GPU check: what distsent promises on a GPU, run and measured in one call (planned for under 8 minutes on
one H100 or H200).

    benchmarks/gpu_check.sh OUT_DIR [IMDB_DIR]                 # the wrapper: also writes OUT_DIR/gpu_check.log
    python benchmarks/gpu_check.py --out OUT_DIR --data IMDB_DIR [--device cpu --quick]

Steps, each in its own process with a time limit; every result goes to OUT_DIR/gpu_check.json:
  gpu_tests  pytest -m gpu (tests/test_gpu.py): padding invariance, fp16 scaler, bf16, bitwise resume, GPU -> CPU
  bound      benchmarks/lstm_bound.py: the cuDNN LSTM's forward + backward alone, per precision
  benchmark  benchmarks/run.py --gpu --only-gpu: the tutorial's pipeline and distsent on the same GPU, fp32/fp16/bf16
  imdb_lstm  configs/imdb_lstm.yaml trained to the end on the GPU in fp16: wall time and test accuracy
  imdb_best  configs/imdb_best.yaml likewise
`--device cpu --quick` runs every step tiny on a CPU (the GPU tests then skip): how the script itself is tested.
`--steps gpu_tests,imdb_lstm` runs only the steps named (a short lease on a GPU machine fits fewer).
Needs only what the repository imports (distsent runs from the checkout, no install): with local parquet data and
no trackers, neither `datasets` nor `wandb` is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("gpu_tests", "bound", "benchmark", "imdb_lstm", "imdb_best")


def step(name: str, cmd: list[str], limit_s: int, env: dict) -> dict:
    """Run one step, echo its output (the wrapper logs it), and return its exit code, time and output."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit_s)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = "timeout", (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    print(out, flush=True)
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "out": out}


def train_config(name: str, args, tmp: Path, env: dict) -> dict:
    """One config trained to the end (fp16 on the GPU, the precision whose LSTM runs in half there): wall time,
    best validation and test accuracy."""
    run_dir = tmp / name
    launch = "launch/gpu_1.yaml" if args.device == "cuda" else "launch/cpu_1proc.yaml"
    extra = ["data.limit=400", "data.test_limit=200", "train.max_steps=4", "train.eval_every=2"] if args.quick else []
    precision = "fp16" if args.device == "cuda" else "auto"
    r = step(name, [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch, "-m",
                    "distsent.train", "--config", f"configs/{name}.yaml", f"output_dir={run_dir}",
                    f"data.path={args.data}", f"train.mixed_precision={precision}", "log.trackers=[]",
                    "checkpoint.resume=never", *extra], args.limit_train_s, env)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    test = [row for row in rows if "test/acc" in row]
    val = [row["val/acc"] for row in rows if "val/acc" in row]
    epochs = [row for row in rows if "throughput/epoch_samples_per_s" in row]
    return {"rc": r["rc"], "wall_s": r["wall_s"], "precision": precision,
            "test_acc": test[0]["test/acc"] if test else None, "best_val_acc": max(val) if val else None,
            "train_samples_per_s": [row["throughput/epoch_samples_per_s"] for row in epochs],
            "log_tail": r["out"][-1500:]}


def benchmark(args, tmp: Path, env: dict) -> dict:
    """benchmarks/run.py on the device: the tutorial's pipeline and distsent, per precision."""
    bench_json = tmp / "benchmark.json"
    sizes = ["--limit", "300", "--test-limit", "100", "--prep-limit", "300", "--skip-seed", "--threads", "1",
             "--precisions", "bf16"] if args.quick else ["--limit", "3000", "--test-limit", "1000", "--prep-limit",
                                                       "3000"]
    bench = step("benchmark", [sys.executable, "benchmarks/run.py", "--data", args.data, *sizes, "--out",
                               str(bench_json), *(["--gpu", "--only-gpu"] if args.device == "cuda" else [])],
                 240, env)
    return {"rc": bench["rc"], "wall_s": bench["wall_s"],
            **(json.loads(bench_json.read_text()) if bench_json.is_file() else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", required=True, help="IMDB as train.parquet / test.parquet")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="every step tiny (to test this script)")
    ap.add_argument("--limit-train-s", type=int, default=120, help="time limit of each training run")
    ap.add_argument("--steps", default=",".join(STEPS), help="the steps to run, comma-separated (default: all)")
    args = ap.parse_args(argv)
    wanted = args.steps.split(",")
    if unknown := sorted(set(wanted) - set(STEPS)):
        ap.error(f"--steps: no step {', '.join(unknown)} (the steps: {', '.join(STEPS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    result = {"device": args.device, "quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    import torch

    if torch.cuda.is_available():
        result["gpu"] = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    with tempfile.TemporaryDirectory() as tmp:
        env["DISTSENT_CACHE"] = str(Path(tmp) / "cache")
        if "gpu_tests" in wanted:
            tests = step("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-rA", "-m", "gpu", "tests/test_gpu.py",
                                       "-p", "no:cacheprovider"], 240, env)
            result["gpu_tests"] = {"rc": tests["rc"], "wall_s": tests["wall_s"],
                                   "summary": [line for line in tests["out"].splitlines()
                                               if line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))
                                               or " passed" in line or " skipped" in line]}
        if "bound" in wanted:
            bound = step("bound", [sys.executable, "benchmarks/lstm_bound.py", "--device", args.device,
                                   *(["--steps", "2", "--warmup", "1"] if args.quick else [])], 120, env)
            result["bound"] = {"rc": bound["rc"], "rows": [json.loads(line) for line in bound["out"].splitlines()
                                                           if line.startswith("{")]}
        if "benchmark" in wanted:
            result["benchmark"] = benchmark(args, Path(tmp), env)
        for name in ("imdb_lstm", "imdb_best"):
            if name in wanted:
                result[name] = train_config(name, args, Path(tmp), env)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    failed = [k for k in wanted if result[k]["rc"] != 0]
    print(f"\ngpu_check: {'all steps ran' if not failed else 'failed: ' + ', '.join(failed)}; "
          f"{args.out / 'gpu_check.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
