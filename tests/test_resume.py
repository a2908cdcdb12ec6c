"""Exact, preemption-safe resume with real processes, real signals and real files."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, direct_cmd, launch_cmd, read_jsonl, run, run_env, tiny_overrides, train_rows
from distsent import checkpoint as ckpt

pytestmark = pytest.mark.slow

EXIT_PREEMPTED = 75


def overrides(run_dir, data, **extra):
    # 1440 training reviews / 32 = 45 steps per epoch, 3 epochs; a checkpoint every 7 steps
    return tiny_overrides(run_dir, data, **{"train.epochs": 3, "train.debug_records": "true", "checkpoint.every": 7,
                                            "model.hidden_dim": 64, "data.max_len": 96, **extra})


def start(nproc, args, launcher: bool = True):
    """The run in the background, in a session of its own (its process group: the launcher and its ranks);
    launcher=False: one process without `accelerate launch`, where the launcher is not what a test is about."""
    cmd = launch_cmd(nproc, args) if launcher else direct_cmd(args)
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-3000:]}")
        try:
            rows = train_rows(run_dir)
            if rows and rows[-1]["step"] >= step:
                return rows[-1]["step"]
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def wait_for_group_gone(pgid: int, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("processes of the run are still alive")


def stop_at(run_dir: Path, step: int, proc, sig=signal.SIGUSR1, group: bool = False) -> str:
    """Let the run reach `step`, send `sig` to its launcher (with group: to every process of the run), wait until
    all of them are gone, and return the launcher's stderr."""
    wait_for_step(run_dir, step, proc)
    (os.killpg if group else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    wait_for_group_gone(proc.pid)  # with 1 process the launcher dies at once; its rank checkpoints, then exits
    return err


def final_digests(run_dir: Path, nproc: int) -> list[str]:
    return [read_jsonl(run_dir / "debug" / f"weights-rank{r}.jsonl")[-1]["sha256"] for r in range(nproc)]


def ids_per_epoch(run_dir: Path) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {}
    for f in sorted((run_dir / "debug").glob("samples-rank*.jsonl")):
        for row in read_jsonl(f):
            seen.setdefault(row["epoch"], []).extend(row["ids"])
    return seen


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in train_rows(run_dir)]


def uninterrupted_runs(tmp_path_factory, data, **extra) -> dict[int, Path]:
    """Uninterrupted runs with 1 and 2 processes, the yardstick for resumed runs."""
    env = {"DISTSENT_CACHE": str(tmp_path_factory.mktemp("cache"))}
    out = {}
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"ref{nproc}")
        proc = run(launch_cmd(nproc, overrides(run_dir, data, **extra)), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[nproc] = run_dir
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_imdb):
    return uninterrupted_runs(tmp_path_factory, synth_imdb)


@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGUSR1), (2, signal.SIGUSR1), (2, signal.SIGTERM),
                                       (2, signal.SIGHUP)])  # the terminal closed
def test_signal_mid_epoch_then_resume_is_bitwise_exact(nproc, sig, reference, synth_imdb, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    proc = start(nproc, overrides(run_dir, synth_imdb))
    err = stop_at(run_dir, 50, proc, sig)  # epoch 1 (steps 46-90); to the `accelerate launch` process itself
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == EXIT_PREEMPTED, err[-3000:]
    stopped_at = status["step"]
    assert 50 <= stopped_at < 90 and stopped_at % 45, "the stop should fall in the middle of epoch 1"
    if nproc == 1:  # accelerate's single-process launcher does not forward signals: it dies of it
        assert proc.returncode == -sig
    else:  # torchrun forwards the signal to the ranks, waits for them, then exits 1 ("got signal")
        assert proc.returncode == 1 and f"got signal: {int(sig)}" in err
    assert ckpt.find_latest(run_dir / "checkpoints").name == f"step-{stopped_at:08d}"
    if sig != signal.SIGUSR1:
        return  # what a stop signal leaves does not depend on the signal (checked above): its resume runs for SIGUSR1

    proc = run(launch_cmd(nproc, overrides(run_dir, synth_imdb)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr

    ref = reference[nproc]
    assert final_digests(run_dir, nproc) == final_digests(ref, nproc)
    assert losses(run_dir) == losses(ref)  # every step logged once, with the same loss
    for epoch, ids in ids_per_epoch(run_dir).items():
        assert sorted(ids) == sorted(ids_per_epoch(ref)[epoch]) and len(ids) == len(set(ids)) == 1440, epoch
    # epoch 1 ran partly before the stop: its rates are logged (this launch's part) but not a duration
    epoch_rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "throughput/epoch_samples_per_s" in r]
    assert [(r["step"], "time/epoch_s" in r) for r in epoch_rows][:2] == [(45, True), (90, False)]


def test_ctrl_c_checkpoints_and_stops_and_a_plain_interrupt_is_one_line(synth_imdb, tmp_path, cache_env):
    """Ctrl-C (SIGINT, a default stop signal) checkpoints and stops like a preemption; where SIGINT is not a stop
    signal (or at a second Ctrl-C) the run stops at once: one line, no traceback, status.json not left "running"."""
    run_dir = tmp_path / "run"

    def interrupt_at(step, *extra):
        # SIGINT at its default disposition in the child: a shell's background job would start with it ignored
        proc = subprocess.Popen(direct_cmd(overrides(run_dir, synth_imdb, **dict(extra))), cwd=REPO, env=run_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_for_step(run_dir, step, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err, json.loads((run_dir / "status.json").read_text())

    code, err, status = interrupt_at(30)
    assert code == EXIT_PREEMPTED and status["state"] == "preempted", err[-3000:]
    # into a file (a pipe here, a Slurm log there) each redraw of the progress bar is a line: no log record joins it
    bars = [line for line in err.splitlines() if "step/s" in line]
    assert bars and not [line for line in bars if " distsent" in line], bars
    assert ckpt.find_latest(run_dir / "checkpoints").name == f"step-{status['step']:08d}"
    assert "Ctrl-C again: stop at once, without a checkpoint" in err
    code, err, status = interrupt_at(status["step"] + 20, ("dist.stop_signals", "[SIGTERM]"))
    assert code == 130 and "interrupted (Ctrl-C) without a checkpoint" in err and "Traceback" not in err, err[-3000:]
    assert status["state"] == "failed" and status["exit_code"] == 130


def test_kill_9_at_random_moments_always_resumes(reference, synth_imdb, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    args = overrides(run_dir, synth_imdb, **{"checkpoint.every": 2})
    rnd = random.Random(1234)
    kills = 0
    for trial in range(4):
        proc = start(1, args, launcher=False)
        wait_for_step(run_dir, 3 + 25 * trial, proc)  # 135 steps in all: every trial's kill point comes first
        time.sleep(rnd.uniform(0.0, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        kills += 1
        latest = ckpt.find_latest(run_dir / "checkpoints")
        if latest is not None:  # whatever is picked as latest must verify and load
            ckpt.verify(latest)
            import torch

            torch.load(latest / "optimizer.pt", weights_only=True)
    assert kills == 4
    proc = run(direct_cmd(args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert final_digests(run_dir, 1) == final_digests(reference[1], 1)
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "leftovers of interrupted writes are cleaned up"


def test_dead_rank_makes_survivor_exit_then_resume(synth_imdb, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    args = overrides(run_dir, synth_imdb, **{"dist.timeout_s": 20})
    proc = start(2, args)
    wait_for_step(run_dir, 20, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    rank = {w: dict(v.split("=", 1) for v in Path(f"/proc/{w}/environ").read_text().split("\0") if "=" in v)["RANK"]
            for w in workers}
    main, other = sorted(workers, key=rank.get)
    os.kill(int(other), signal.SIGKILL)
    t0 = time.time()
    proc.communicate(timeout=60)
    assert time.time() - t0 < 30 and proc.returncode != 0
    survivors = subprocess.run(["ps", "-o", "pid=", "-p", main], capture_output=True, text=True).stdout.strip()
    assert not survivors, "the surviving rank is still running"
    status = json.loads((run_dir / "status.json").read_text())  # not "running" with the pid of a dead process
    assert status["state"] == "failed" and status["exit_code"] == 1, status
    proc = run(launch_cmd(2, args))
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]


def test_a_run_killed_before_its_first_checkpoint_starts_over_and_max_steps_ends_evaluated_and_saved(
        synth_imdb, tmp_path, cache_env):
    """kill -9 before the first checkpoint (by default one comes only at the epoch's end): the restart is a fresh
    start, and metrics.jsonl holds each step once, not the dead attempt's rows and then the new ones. A run ended by
    train.max_steps in mid-epoch evaluates and checkpoints its last step, as at an epoch's end."""
    run_dir = tmp_path / "run"
    args = overrides(run_dir, synth_imdb, **{"checkpoint.every": 0, "train.max_steps": 40, "train.eval_every": 25})
    stop_at(run_dir, 10, start(1, args, launcher=False), signal.SIGKILL, group=True)
    assert not list(run_dir.glob("checkpoints/step-*")) and train_rows(run_dir)
    proc = run(direct_cmd(args))
    assert proc.returncode == 0 and "resumed from" not in proc.stderr, proc.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 41))  # 45 steps make an epoch
    assert [r["step"] for r in rows if "val/acc" in r] == [25, 40]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000040"]
    assert json.loads((run_dir / "best" / "meta.json").read_text())["step"] in (25, 40)


def test_a_finished_run_relaunched_tests_once_more_and_a_damaged_best_stops_every_process(
        reference, synth_imdb, tmp_path, cache_env):
    """A relaunch after the end (a requeue, say) tests the best model again: metrics.jsonl keeps one test row. With
    best/ damaged meanwhile, the main process names the file and the other stops with one line, not a traceback out
    of the barrier it waited at."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference[2], run_dir)
    args = overrides(run_dir, synth_imdb)
    proc = run(launch_cmd(2, args))
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert "at or past its end: testing the best model again" in proc.stderr
    assert not re.search(r"\| *\d+/\d+ \[", proc.stderr)  # no progress bar
    assert len([r for r in read_jsonl(run_dir / "metrics.jsonl") if "test/acc" in r]) == 1
    # a relaunch refused before it runs (a mistyped data path) leaves the finished run's status.json as it is
    finished = (run_dir / "status.json").read_text()
    proc = run(direct_cmd(overrides(run_dir, tmp_path / "nowhere")))
    assert proc.returncode == 2 and "data.path" in proc.stderr and "its status.json is left as it is" in proc.stderr
    assert (run_dir / "status.json").read_text() == finished and json.loads(finished)["state"] == "finished"
    weights = run_dir / "best" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = run(launch_cmd(2, args))
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert f"IntegrityError: {weights}" in proc.stderr and "process 0 could not check" in proc.stderr
    assert "[rank1]" not in proc.stderr and "barrier" not in proc.stderr, proc.stderr[-3000:]  # rank 1's traceback
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


def test_broken_checkpoints_are_skipped_or_refused(reference, synth_imdb, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir)
    root = run_dir / "checkpoints"
    newest, older = sorted(root.glob("step-*"), reverse=True)[:2]
    # truncate the newest checkpoint's weights: "latest" must fall back to the older one, with a warning naming it
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert ckpt.find_latest(root) == older
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.verify(newest)
    # flip bytes in the older one's optimizer state: corrupted
    opt = older / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.verify(older)
    assert ckpt.find_latest(root) is None
    # an interrupted write: no manifest
    (root / "step-99999999").mkdir()
    assert ckpt.find_latest(root) is None

    # named explicitly, a broken checkpoint is a clear error before training
    proc = run(direct_cmd(overrides(tmp_path / "new", synth_imdb, **{"checkpoint.resume": str(older)})))
    assert proc.returncode == 2 and "corrupted" in proc.stderr


def test_changed_model_shape_is_refused_but_more_epochs_allowed(reference, synth_imdb, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir)
    config_before = (run_dir / "config.yaml").read_text()
    # a warmup outlasting the run is warned about, but only by a run that starts: a refusal says only why
    proc = run(direct_cmd(overrides(run_dir, synth_imdb, **{"model.hidden_dim": 48, "optim.warmup_steps": 1000})))
    assert proc.returncode == 2
    assert "model.hidden_dim: checkpoint 64, config 48" in proc.stderr and "warmup" not in proc.stderr
    assert (run_dir / "config.yaml").read_text() == config_before  # the refused config is not recorded
    # starting over in a used directory would mix two runs: refused, nothing touched (the finished run's status
    # included)
    def files():
        return sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))

    before = files()
    proc = run(direct_cmd(overrides(run_dir, synth_imdb, **{"model.hidden_dim": 48, "checkpoint.resume": "never"})))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds an earlier run (checkpoints, best, metrics.jsonl)" in proc.stderr
    assert "or resume it (checkpoint.resume=auto)" in proc.stderr
    assert files() == before and json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    # the same command on edited data (one training label flipped) is another run, not this one's resume
    import pyarrow as pa
    import pyarrow.parquet as pq

    edited = tmp_path / "edited"
    shutil.copytree(synth_imdb, edited)
    table = pq.read_table(edited / "train.parquet")
    labels = table.column("label").to_pylist()
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array([1 - labels[0]] + labels[1:], pa.int64())),
                   edited / "train.parquet")
    proc = run(direct_cmd(overrides(run_dir, edited)))
    assert proc.returncode == 2 and "data_content: checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert "the tokenized training or validation data differ: edited data" in proc.stderr
    proc = run(direct_cmd(overrides(run_dir, synth_imdb, **{"train.epochs": 4})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and train_rows(run_dir)[-1]["step"] == 180
