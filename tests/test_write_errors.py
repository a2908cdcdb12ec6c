"""A full disk or a read-only filesystem while writing checkpoints, best/, metrics.jsonl, status.json or the token
cache: one clear line naming the file and the cause, the documented exit status (74), no partial files, nothing
earlier lost. Real filesystems: a 2 MiB tmpfs filled up while a run goes on (mounting needs root; skipped
otherwise)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, direct_cmd, fill_disk, launch_cmd, read_jsonl, run, run_env, tiny_overrides

def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def pause_at_checkpoint(proc: subprocess.Popen, folder: Path, timeout: float = 180) -> None:
    """Stop the whole process group as soon as `folder` (a checkpoint) exists, so that the disk can be filled
    before the next write whatever the machine's speed."""
    deadline = time.time() + timeout
    while not folder.is_dir():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"no {folder.name}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGSTOP)


def assert_intact(run_dir: Path, steps: list[str]) -> None:
    from distsent.checkpoint import verify

    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == steps  # no .tmp-step-* left behind
    for name in steps:
        verify(ckpts / name)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no line cut short


@pytest.mark.slow
def test_disk_full_in_a_two_process_run_stops_both_with_the_cause_and_loses_nothing(tmp_path, small_disk, synth_imdb,
                                                                                    cache_env):
    """Process 0 cannot write the checkpoint's weights (the disk leaves room for both processes' small random-state
    files only): it names the file and the cause, process 1 stops with it in one line, the launcher's summary
    shows exit status 74 and the cause for each process, the earlier checkpoint stays; with space again the same
    command resumes and finishes."""
    run_dir = small_disk / "run"
    args = tiny_overrides(run_dir, synth_imdb, **{"train.epochs": 4, "train.log_every": 1000, "checkpoint.every": 10})
    proc = start(launch_cmd(2, args))
    pause_at_checkpoint(proc, run_dir / "checkpoints" / "step-00000010")
    filler = fill_disk(small_disk, leave=48 * 1024)
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    tmp = run_dir / "checkpoints" / ".tmp-step-00000020"
    assert (f"distsent-train: WriteError: cannot write {tmp / 'model.safetensors'}: No space left on device"
            in err), err[-3000:]
    assert (f"distsent-train: PeerFailed: process 0 could not write checkpoint {run_dir}/checkpoints/step-00000020 "
            "(it prints its error)" in err)
    root = err.split("Root Cause")[1]  # the launcher's summary: process 0's cause is the root, both exit 74
    assert err.count("exitcode  : 74") == 2 and "traceback : WriteError: cannot write" in root
    assert "Connection closed by peer" not in err and "gloo" not in err.lower()
    assert_intact(run_dir, ["step-00000010"])
    status = json.loads((run_dir / "status.json").read_text())  # written in place on the full disk
    assert status["state"] == "failed" and status["exit_code"] == 74 and "No space left" in status["error"]

    filler.unlink()
    again = run(launch_cmd(2, args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step-00000010" in again.stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 180


@pytest.mark.slow
def test_a_stop_signal_whose_checkpoint_cannot_be_written_says_so(small_disk, synth_imdb, cache_env):
    run_dir = small_disk / "run"
    proc = start(direct_cmd(tiny_overrides(run_dir, synth_imdb, **{
        "train.epochs": 4, "train.log_every": 1000, "checkpoint.every": 10})))
    pause_at_checkpoint(proc, run_dir / "checkpoints" / "step-00000010")
    fill_disk(small_disk)
    os.kill(proc.pid, signal.SIGTERM)  # delivered when it continues
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 74, err[-3000:]  # not 75: nothing was saved to resume from at this step
    assert "distsent-train: WriteError: cannot write" in err and "No space left on device" in err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 74
    assert "a stop signal (SIGTERM) came but no checkpoint was written for it" in status["error"]
    assert_intact(run_dir, ["step-00000010"])


def test_token_cache_on_a_full_disk_leaves_no_partial_entry(small_disk, synth_imdb):
    from distsent.config import DataConfig
    from distsent.data import prepare
    from distsent.files import WriteError

    cache = small_disk / "cache"
    cfg = DataConfig(path=str(synth_imdb), cache_dir=str(cache), min_freq=1)
    filler = fill_disk(small_disk, leave=8 * 1024)
    with pytest.raises(WriteError, match=f"cannot write {cache}/.*: No space left on device .*MiB free there.* "
                                         r"\(the token cache: data.cache_dir or \$DISTSENT_CACHE names another"):
        prepare(cfg)
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
    filler.unlink()
    assert not prepare(cfg).cache_hit and prepare(cfg).cache_hit
    # numpy reports a short write of an id array without an errno ("N requested and M written"): still the disk
    import numpy as np

    fill_disk(small_disk, leave=20_000)
    with pytest.raises(OSError) as info:
        np.save(small_disk / "ids.npy", np.arange(100_000))
    assert info.value.errno is None and "requested and" in str(info.value)
    assert "No space left on device" in str(WriteError.of(small_disk / "ids.npy", info.value))


def test_best_model_on_a_full_disk_keeps_the_previous_one(small_disk):
    import torch

    from conftest import make_reviews
    from distsent.checkpoint import export_model, verify_model_folder
    from distsent.config import DataConfig
    from distsent.configfile import load_config
    from distsent.files import WriteError, sha256_file
    from distsent.model import build_model
    from distsent.tokenizer import train_tokenizer

    cfg = load_config(None, ["model.embedding_dim=16", "model.hidden_dim=16", "data.min_freq=1"])
    tok = train_tokenizer(make_reviews(50, 0)[0], DataConfig(min_freq=1))
    best = small_disk / "best"
    export_model(best, build_model(tok.get_vocab_size(), cfg.model), tok, cfg, {"step": 1})
    before = sha256_file(best / "model.safetensors")
    fill_disk(small_disk)
    torch.manual_seed(1)
    with pytest.raises(WriteError, match=f"cannot write {small_disk}/.best.tmp/model.safetensors: No space left"):
        export_model(best, build_model(tok.get_vocab_size(), cfg.model), tok, cfg, {"step": 2})
    verify_model_folder(best)
    assert sha256_file(best / "model.safetensors") == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["best", "filler"]  # no .best.tmp


def test_run_records_on_a_full_then_read_only_disk(small_disk):
    """metrics.jsonl: the row that does not fit is removed whole and the failure kept for the trainer to stop on;
    status.json is still written on the full disk (in place); a read-only filesystem is named as such."""
    from distsent.configfile import load_config
    from distsent.files import WriteError
    from distsent.tracking import RunLog, write_status

    cfg = load_config(None, ["log.trackers=[]"])
    write_status(small_disk, state="running", step=0)
    records = RunLog(cfg, small_disk, SimpleNamespace(is_main_process=True), "run", None, {})
    fill_disk(small_disk)
    for step in range(1, 5000):
        records.log({"train/loss": 0.5, "note": "x" * 200}, step)
        if records.failure is not None:
            break
    assert f"cannot write {small_disk / 'metrics.jsonl'}: No space left on device" in str(records.failure)
    assert [r["step"] for r in read_jsonl(small_disk / "metrics.jsonl")] == list(range(1, step))
    write_status(small_disk, state="failed", step=step, error=str(records.failure))
    assert json.loads((small_disk / "status.json").read_text())["step"] == step

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(WriteError, match=f"cannot write {small_disk / 'status.json'}: Read-only file system"):
        write_status(small_disk, state="finished", step=step)


def test_a_run_lock_that_cannot_be_written_leaves_no_lock_behind(small_disk, synth_imdb, cache_env, capsys):
    """A launch into a full disk or a read-only filesystem stops at its run lock with one line naming it, on both
    processes (no collective traceback); it leaves no empty run.lock, which would pass for a live run's and refuse
    the next launch, and status.json says failed. With space again, the same command starts at once."""
    from distsent.files import WriteError
    from distsent.runlock import RunLock

    run_dir = small_disk / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"state": "preempted", "exit_code": 75}))
    filler = fill_disk(small_disk)
    args = tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": 2})
    proc = run(launch_cmd(2, args))
    assert proc.returncode != 0
    cause = f"distsent-train: WriteError: cannot write {run_dir / 'run.lock'}: No space left on device"
    assert proc.stderr.count(cause) == 2, proc.stderr[-3000:]  # each process says it, neither dies in a collective
    assert "Connection" not in proc.stderr and "gloo" not in proc.stderr.lower()
    assert f'File "{REPO / "distsent"}' not in proc.stderr  # no traceback of ours (the launcher prints its own)
    assert not (run_dir / "run.lock").exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"

    filler.unlink()
    (run_dir / "status.json").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(WriteError, match=f"cannot write {run_dir / 'run.lock'}: Read-only file system"):
        RunLock(run_dir).acquire()
    new = run(direct_cmd(tiny_overrides(small_disk / "new", synth_imdb)))  # a run directory that cannot be made
    assert new.returncode == 74, new.stderr[-3000:]
    assert f"distsent-train: WriteError: cannot write {small_disk / 'new'}: Read-only file system" in new.stderr
    from distsent.train import main  # --check says so before a job is queued

    assert main(["--config", str(REPO / "configs" / "smoke.yaml"), "--check",
                 *tiny_overrides(small_disk / "new" / "run", synth_imdb)]) == 2
    assert f"{small_disk} cannot be written here (a read-only filesystem" in capsys.readouterr().err
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    again = run(direct_cmd(args))
    assert again.returncode == 0, again.stderr[-3000:]
