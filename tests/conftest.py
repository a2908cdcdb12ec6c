"""Shared test helpers: small generated IMDB-like data in every source format, and launching real runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# a local parquet copy of IMDB for the real-data tests: $DISTSENT_TEST_IMDB, else one next to the checkout
REAL_IMDB = Path(os.environ.get("DISTSENT_TEST_IMDB", REPO.parent / "shared" / "data" / "imdb"))
# the six-class emotion tweets (CSV, string labels) for the real multi-class test
REAL_EMOTION = Path(os.environ.get("DISTSENT_TEST_EMOTION", REPO.parent / "shared" / "data" / "emotion"))

POSITIVE = [f"good{i}" for i in range(30)] + ["great", "wonderful", "superb", "loved"]
NEGATIVE = [f"bad{i}" for i in range(30)] + ["awful", "boring", "terrible", "hated"]
NEUTRAL = [f"word{i}" for i in range(300)] + ["the", "a", "movie", "film", "plot", "actor"]


def make_reviews(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Learnable reviews: a label's words are sprinkled through neutral filler, plus a few of the other label's."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        length = int(rng.integers(8, 60))
        words = list(rng.choice(NEUTRAL, size=length))
        own, other = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        for _ in range(max(2, length // 6)):
            words[int(rng.integers(0, length))] = str(rng.choice(own))
        words[int(rng.integers(0, length))] = str(rng.choice(other))
        text = " ".join(words).capitalize() + "."
        texts.append(text.replace(" the ", " The <br /><br /> the ", 1))
        labels.append(label)
    return texts, labels


EMOTIONS = ["anger", "fear", "joy", "sadness"]


def make_emotions(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Learnable 4-class texts: each class's own words (anger0, fear3, ...) sprinkled through neutral filler."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = EMOTIONS[int(rng.integers(0, len(EMOTIONS)))]
        words = list(rng.choice(NEUTRAL, size=int(rng.integers(6, 30))))
        for _ in range(max(2, len(words) // 5)):
            words[int(rng.integers(0, len(words)))] = f"{label}{int(rng.integers(0, 20))}"
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def write_csv(folder: Path, splits: dict[str, tuple[list[str], list]]) -> Path:
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    for name, (texts, labels) in splits.items():
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(zip(texts, labels))
    return folder


def score(probs, labels, classes: list[str]) -> dict:
    """metrics.score_logits from class probabilities [n, C]."""
    import torch

    from distsent.metrics import score_logits

    p = torch.as_tensor(np.asarray(probs, np.float64))
    if len(classes) == 2:
        return score_logits(torch.logit(p[:, 1], eps=1e-12), labels, classes)  # p of 0 or 1 keeps a finite loss
    return score_logits(p.clamp(min=1e-12).log(), labels, classes)  # softmax(log p) = p


def binary_score(p_positive, labels) -> dict:
    """score of two-class probabilities given as p(positive)."""
    p = np.asarray(p_positive, np.float64)
    return score(np.stack([1 - p, p], axis=1), labels, ["negative", "positive"])


def write_parquet(folder: Path, splits: dict[str, tuple[list[str], list[int]]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for name, (texts, labels) in splits.items():
        pq.write_table(pa.table({"text": texts, "label": labels}), folder / f"{name}.parquet")
    return folder


def write_aclimdb(folder: Path, splits: dict[str, tuple[list[str], list[int]]]) -> Path:
    """The original layout: {split}/{pos,neg}/{id}_{rating}.txt, records numbered in (neg, pos) order."""
    for name, (texts, labels) in splits.items():
        for lab in ("pos", "neg"):
            (folder / name / lab).mkdir(parents=True, exist_ok=True)
        for i, (t, y) in enumerate(zip(texts, labels)):
            (folder / name / ("pos" if y else "neg") / f"{i}_{8 if y else 2}.txt").write_text(t, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def synth_splits():
    return {"train": make_reviews(1600, 0), "test": make_reviews(400, 1)}


@pytest.fixture(scope="session")
def synth_imdb(tmp_path_factory, synth_splits) -> Path:
    return write_parquet(tmp_path_factory.mktemp("imdb"), synth_splits)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A model folder laid out as <run>/best (random weights: these tests check plumbing, not accuracy)."""
    import torch

    from distsent.checkpoint import export_model
    from distsent.config import DataConfig
    from distsent.configfile import load_config
    from distsent.model import build_model
    from distsent.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("run") / "best"
    cfg = load_config(None, ["model.embedding_dim=16", "model.hidden_dim=16", "data.max_len=20", "data.min_freq=1"])
    tok = train_tokenizer(make_reviews(50, 0)[0], DataConfig(min_freq=1))
    torch.manual_seed(0)
    export_model(folder, build_model(tok.get_vocab_size(), cfg.model), tok, cfg, {"step": 0})
    return folder


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTSENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "cache"


def tiny_overrides(run_dir: Path, data: Path, **extra) -> list[str]:
    """A small, fast, learnable setup on generated data."""
    base = {"output_dir": str(run_dir), "data.path": str(data), "data.max_len": 64, "data.min_freq": 1,
            "model.embedding_dim": 32, "model.hidden_dim": 32, "model.num_layers": 1, "optim.lr": 0.01,
            "train.global_batch_size": 32, "train.epochs": 2, "train.log_every": 1, "train.eval_batch_size": 64,
            "log.trackers": "[]", "train.mixed_precision": "no"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def member_alone(state: dict, model_cfg, vocab_size: int, num_classes: int, i: int):
    """Member i of an ensemble's state dict as a single model: its recurrent part and the shared n-gram head."""
    import dataclasses

    from distsent.model import build_model

    single = build_model(vocab_size, dataclasses.replace(model_cfg, members=1), num_classes).eval()
    prefix = f"members.{i}."
    single.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                           | {k: v for k, v in state.items() if k.startswith("ngrams.")})
    return single


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(nproc: int, overrides: list[str], config: str = "configs/smoke.yaml") -> list[str]:
    """`accelerate launch` of the trainer with nproc CPU processes (DDP over gloo when nproc > 1)."""
    cfg = "launch/cpu_2proc.yaml" if nproc > 1 else "launch/cpu_1proc.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / cfg),
            "--num_processes", str(nproc), "--main_process_port", str(free_port()),
            "-m", "distsent.train", "--config", str(REPO / config), *overrides]


def direct_cmd(overrides: list[str], config: str = "configs/smoke.yaml") -> list[str]:
    """The trainer in this process's Python, no launcher: its exit status is the trainer's own."""
    return [sys.executable, "-m", "distsent.train", "--config", str(REPO / config), *overrides]


def run_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    env.update(extra or {})
    return env


def run(cmd: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(env), capture_output=True, text=True, timeout=timeout)
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs) to fill up; mounting one needs root, so elsewhere the test is skipped."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(mount: Path, leave: int = 0) -> Path:
    """Fill a filesystem with one file, leaving about `leave` bytes free; delete the file to free the space."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:  # full
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler
