"""Benchmark: the tutorial's pipeline against distsent, same data, same architecture, one invocation.

    python benchmarks/run.py --data /path/to/imdb [--limit 4000] [--test-limit 2000] [--epochs 1] [--repeat 3]

Runs, one after the other (never two at once, so they do not share the cores):
  seed       benchmarks/seed_baseline.py, the tutorial as written (1 process, all threads)
  ds-1x{T}   distsent, 1 process x T threads        (configs/imdb_lstm.yaml architecture, batch 64, max_len 256,
  ds-{P}x1   distsent, P processes x 1 thread, DDP    the tutorial's constant Adam 1e-3 and head truncation)
and reports training samples/s and real tokens/s, evaluation samples/s, data preparation (cold and cached), peak
resident memory (all processes of a run together; data preparation is timed on every review of both splits
unless --prep-limit says otherwise), time per epoch, time to a target validation accuracy, and
prediction reviews/s; then the distsent/seed ratios. With --repeat N, all of it N times in rounds, ratios taken
within each round, medians reported (the per-round ratios too). Writes the table to stdout and everything to --out (JSON).
On a CPU that computes bf16 natively, the distsent runs are repeated in bf16 (rows *-bf16); on a machine with a GPU,
--gpu adds the tutorial and distsent (fp32, fp16, bf16) on it, and --only-gpu leaves the CPU runs out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class PeakRSS:
    """Samples the summed resident memory of a process and all its children until stopped."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[str, float, float]:
    """(stdout + stderr, wall seconds, peak MiB) of a command; raises with its output if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = PeakRSS(proc.pid)
    out, _ = proc.communicate()
    mib = peak.stop()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return out, time.perf_counter() - t0, mib


def seed_cmd(args, limit: int, test_limit: int, device: str = "cpu") -> list[str]:
    return [sys.executable, str(HERE / "seed_baseline.py"), "--data", args.data, "--train-limit", str(limit),
            "--test-limit", str(test_limit), "--threads", str(args.threads), "--device", device]


def seed_runs(args, device: str = "cpu") -> dict:
    base = seed_cmd(args, args.limit, args.test_limit, device)
    prep_out, _, _ = run_measured(seed_cmd(args, args.prep_limit, args.prep_limit) + ["--prep-only"])
    prep = [json.loads(line) for line in prep_out.splitlines() if line.startswith('{"event": "prep_all"')][0]
    out, wall, mib = run_measured(base + ["--epochs", str(args.epochs)])
    epochs = [json.loads(line) for line in out.splitlines() if line.startswith('{"event": "epoch"')]
    # the tutorial validates on its test set; that is its only accuracy curve
    reach = _time_to_target([(e["train_s"] + e["eval_s"], e["test_acc"]) for e in epochs], args.target_acc,
                            offset=prep["seconds"])
    return {"train_samples_per_s": _mean([e["train_samples_per_s"] for e in epochs]),
            "train_tokens_per_s": None,  # the tutorial computes every padded position: no real-token count
            # its times are rounded to 10 ms: never divide by a zero
            "eval_samples_per_s": _mean([args.test_limit_n / max(e["eval_s"], 0.01) for e in epochs]),
            "prep_cold_s": prep["seconds"], "prep_cached_s": prep["seconds"],  # it keeps no cache
            "epoch_s": _mean([e["train_s"] + e["eval_s"] for e in epochs]), "peak_rss_mib": mib, "wall_s": wall,
            "acc_per_epoch": [e["test_acc"] for e in epochs], "time_to_target_s": reach}


def distsent_run(args, name: str, nproc: int, threads: int, cache: Path, out_root: Path, precision: str,
                 gpu: bool = False) -> dict:
    run_dir = out_root / name
    launch = "launch/gpu_1.yaml" if gpu else "launch/cpu_2proc.yaml" if nproc > 1 else "launch/cpu_1proc.yaml"
    overrides = [f"output_dir={run_dir}", f"data.path={args.data}", f"data.limit={args.limit}",
                 f"data.test_limit={args.test_limit}", f"train.epochs={args.epochs}", f"train.threads={threads}",
                 # the tutorial's numerics: constant Adam 1e-3, first 256 tokens, no HTML stripping
                 "optim.lr=0.001", "optim.schedule=constant", "optim.warmup_steps=0", "data.truncate=head",
                 "data.strip_html=false", "checkpoint.every=0", "log.trackers=[]", "checkpoint.resume=never",
                 "train.eval_every=0",  # one evaluation per epoch, as the tutorial does
                 f"train.mixed_precision={precision}"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch, "--num_processes",
           str(nproc), "-m", "distsent.train", "--config", "configs/imdb_lstm.yaml", *overrides]
    out, wall, mib = run_measured(cmd, env={"DISTSENT_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/acc" in r]
    epochs = [r for r in rows if "time/epoch_s" in r]
    prep = [r for r in rows if "data/prepare_s" in r][0]
    return {"train_samples_per_s": _mean([r["throughput/epoch_samples_per_s"] for r in epochs]),
            "train_tokens_per_s": _mean([r["throughput/epoch_tokens_per_s"] for r in epochs]),
            # the seed evaluates the test reviews; so does this figure (the final test pass, same reviews)
            "eval_samples_per_s": [r["test/samples_per_s"] for r in rows if "test/samples_per_s" in r][0],
            "run_prep_s": prep["data/prepare_s"], "epoch_s": _mean([r["time/epoch_s"] for r in epochs]),
            "peak_rss_mib": mib, "wall_s": wall,
            "acc_per_epoch": [r["val/acc"] for r in val if r["epoch"] == int(r["epoch"])],
            "time_to_target_s": _time_to_target([(None, r["val/acc"], r["time/elapsed_s"]) for r in val],
                                                args.target_acc),
            "best_dir": str(run_dir / "best")}


def prep_distsent(args, cache: Path) -> dict:
    """Cold and cached preparation of every review (train + test) in this process."""
    import importlib

    for lib in ("pyarrow.compute", "pyarrow.parquet", "tokenizers"):  # loaded before the clock starts, as the
        importlib.import_module(lib)  # tutorial's libraries are

    from distsent.config import DataConfig
    from distsent.data import prepare

    cfg = DataConfig(path=args.data, limit=args.prep_limit, test_limit=args.prep_limit, cache_dir=str(cache))
    t0 = time.perf_counter()
    cold = prepare(cfg)
    t1 = time.perf_counter()
    warm = prepare(cfg)
    t2 = time.perf_counter()
    assert not cold.cache_hit and warm.cache_hit
    return {"prep_cold_s": t1 - t0, "prep_cached_s": t2 - t1,
            "reviews": len(cold.train) + len(cold.val) + len(cold.test)}


def predict_speed(best_dir: str, args) -> float:
    import pyarrow.parquet as pq
    import torch

    from distsent.predict import Predictor

    torch.set_num_threads(args.threads)
    texts = pq.read_table(Path(args.data) / "test.parquet", columns=["text"]).column("text").to_pylist()
    texts = texts[: args.test_limit or len(texts)]
    predictor = Predictor.load(best_dir)
    t0 = time.perf_counter()
    predictor.predict(texts)
    return len(texts) / (time.perf_counter() - t0)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _time_to_target(points, target: float, offset: float = 0.0):
    """Wall seconds until accuracy first reaches target; points are (duration, acc) or (None, acc, elapsed)."""
    elapsed = offset
    for p in points:
        if p[0] is None:
            elapsed = p[2]
        else:
            elapsed += p[0]
        if p[1] >= target:
            return elapsed
    return None


def one_round(args, tmp: Path) -> dict:
    """Every pipeline once, one after the other: {run name: its numbers}."""
    runs = {}
    prep = prep_distsent(args, tmp / "cache-prep")
    if not args.only_gpu:
        if not args.skip_seed:
            runs["seed"] = seed_runs(args)
        layouts = [("ds-1x%d" % args.threads, 1, args.threads)]
        if args.threads > 1:
            layouts.append(("ds-%dx1" % args.threads, args.threads, 1))
        for precision in args.precisions.split(","):
            for name, nproc, threads in layouts:
                name += "" if precision == "no" else f"-{precision}"
                r = distsent_run(args, name, nproc, threads, tmp / "cache-runs", tmp, precision)
                runs[name] = r | {k: prep[k] for k in ("prep_cold_s", "prep_cached_s")}
        first = runs[layouts[0][0] + ("" if args.precisions.split(",")[0] == "no" else
                                      "-" + args.precisions.split(",")[0])]
        first["predict_reviews_per_s"] = predict_speed(first.pop("best_dir"), args)
    if args.gpu:  # the tutorial on the same GPU, then distsent in each precision
        if not args.skip_seed:
            runs["seed-gpu"] = seed_runs(args, device="cuda")
        for precision in ("no", "fp16", "bf16"):
            name = f"ds-gpu-{precision}"
            runs[name] = distsent_run(args, name, 1, args.threads, tmp / "cache-runs", tmp, precision, gpu=True)
            runs[name] |= {k: prep[k] for k in ("prep_cold_s", "prep_cached_s")}
    for r in runs.values():
        r.pop("best_dir", None)
    return runs


def ratios_vs_seed(runs: dict) -> dict:
    """Each distsent run against the tutorial's pipeline on the same device (GPU rows against seed-gpu)."""
    out = {}
    for name, r in runs.items():
        seed = runs.get("seed-gpu" if name.startswith("ds-gpu") else "seed")
        if name.startswith("seed") or seed is None:
            continue
        out[name] = {k: r[k] / seed[k] for k in ("train_samples_per_s", "eval_samples_per_s")
                     if r.get(k) and seed.get(k)} | {"prep_speedup": seed["prep_cold_s"] / r["prep_cold_s"]}
    return out


def _median_run(rounds: list[dict]) -> dict:
    """Per key, the median over rounds of the numbers (lists and missing values: the first round's)."""
    out = dict(rounds[0])
    for key, value in out.items():
        values = [r.get(key) for r in rounds]
        if isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in values):
            out[key] = statistics.median(values)
    return out


def summarize(rounds: list[dict]) -> dict:
    """The rounds' runs as one: a shared virtual machine's speed drifts by tens of percent over minutes, so every
    round runs all the pipelines back to back, ratios are taken within a round, and the medians over rounds are
    reported (with each round's ratios)."""
    out = {"runs": {name: _median_run([r[name] for r in rounds]) for name in rounds[0]}}
    if any(name.startswith("seed") for name in rounds[0]):
        per_round = [ratios_vs_seed(r) for r in rounds]
        out["ratios_per_round"] = per_round
        out["ratios_vs_seed"] = {name: {k: statistics.median(p[name][k] for p in per_round) for k in ratios}
                                 for name, ratios in per_round[0].items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with train.parquet and test.parquet")
    ap.add_argument("--limit", type=int, default=0, help="training reviews to use (0 = all 25,000)")
    ap.add_argument("--test-limit", type=int, default=0, help="test reviews to use (0 = all 25,000)")
    ap.add_argument("--prep-limit", type=int, default=0,
                    help="reviews per split for the data preparation timings (0 = all: 25,000 + 25,000)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--target-acc", type=float, default=0.8, help="validation accuracy for time-to-target")
    ap.add_argument("--out", default="benchmarks/results.json")
    ap.add_argument("--skip-seed", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all runs; medians are reported")
    ap.add_argument("--gpu", action="store_true",
                    help="also the tutorial and distsent (fp32, fp16, bf16) on the GPU, one process")
    ap.add_argument("--only-gpu", action="store_true", help="with --gpu: leave out the CPU runs")
    ap.add_argument("--precisions", default=None,
                    help="precisions of the CPU distsent runs, e.g. no,bf16 (default: no, plus bf16 on a CPU "
                         "that computes bf16 natively)")
    args = ap.parse_args(argv)
    if args.precisions is None:
        from distsent.precision import resolve

        args.precisions = "no,bf16" if resolve("auto", "cpu")[0] == "bf16" else "no"
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat}: needs at least one round")
    import pyarrow.parquet as pq

    n_test = pq.ParquetFile(Path(args.data) / "test.parquet").metadata.num_rows
    args.test_limit_n = min(args.test_limit or n_test, n_test)

    results = {"machine": {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                           "torch": __import__("torch").__version__},
               "settings": {k: v for k, v in vars(args).items() if k != "test_limit_n"}}
    with tempfile.TemporaryDirectory() as tmp:
        rounds = [one_round(args, Path(tmp) / f"round{i}") for i in range(args.repeat)]
    results |= summarize(rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwritten to {args.out}")
    return 0


def table(results: dict) -> str:
    cols = [("train_samples_per_s", "train samples/s"), ("train_tokens_per_s", "real tokens/s"),
            ("eval_samples_per_s", "eval samples/s"), ("predict_reviews_per_s", "predict reviews/s"),
            ("prep_cold_s", "prep cold s"), ("prep_cached_s", "prep cached s"), ("epoch_s", "s/epoch"),
            ("peak_rss_mib", "peak RSS MiB"), ("time_to_target_s", "s to target")]
    head = "| run | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, r in results["runs"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
    per_round = results.get("ratios_per_round", [])
    for name, ratios in results.get("ratios_vs_seed", {}).items():
        lines.append(f"\n{name} / seed: " + ", ".join(
            f"{k} x{v:.2f}" + (" (rounds: " + ", ".join(f"{p[name][k]:.2f}" for p in per_round) + ")"
                               if len(per_round) > 1 else "") for k, v in ratios.items()))
    return "\n".join(lines)


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
