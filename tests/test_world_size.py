"""Resume onto a different number of processes: same global batches, every sample once per epoch."""

import json
import subprocess

import pytest
from safetensors.torch import load_file

from conftest import REPO, launch_cmd, read_jsonl, run, run_env, train_rows
from test_resume import ids_per_epoch, overrides, start, stop_at, uninterrupted_runs

pytestmark = pytest.mark.slow

# Without dropout the only difference left between world sizes is the float summation order (32 samples in one
# process vs 16 + 16 averaged by DDP): ~1e-7 per step. Training amplifies it, the more the higher the learning rate
# (measured after 135 steps: 7e-7 at lr 1e-3, 2e-2 at lr 3e-3), so these runs use lr 1e-3. With dropout, the
# per-process streams re-derived after a world-size change would make a larger, random difference.
NO_DROPOUT = {"model.dropout": 0.0, "optim.lr": 0.001}
TOLERANCE = 1e-4  # largest absolute parameter difference allowed (weights reach ~4 in size)


def final_weights(run_dir):
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return last.name, load_file(last / "model.safetensors")


@pytest.fixture(scope="module")
def references(tmp_path_factory, synth_imdb):
    return uninterrupted_runs(tmp_path_factory, synth_imdb, **NO_DROPOUT)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_uninterrupted_runs_agree_across_world_sizes(references):
    (name1, w1), (name2, w2) = final_weights(references[1]), final_weights(references[2])
    assert name1 == name2 == "step-00000135"
    assert max_diff(w1, w2) < TOLERANCE


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_stop_and_resume_on_another_world_size(before, after, references, synth_imdb, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    args = overrides(run_dir, synth_imdb, **NO_DROPOUT)
    stop_at(run_dir, 50, start(before, args))
    stopped_at = json.loads((run_dir / "status.json").read_text())["step"]
    assert 50 <= stopped_at < 90

    proc = run(launch_cmd(after, args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"world size changed from {before} to {after} at step {stopped_at}" in proc.stderr

    # every training sample exactly once per epoch, across both halves of the run and all processes
    seen = ids_per_epoch(run_dir)
    assert sorted(seen) == [0, 1, 2]
    for epoch, ids in seen.items():
        assert len(ids) == len(set(ids)) == 1440, epoch
    # the same optimizer steps as an uninterrupted run, each logged once, and the same global batches
    steps = [r["step"] for r in train_rows(run_dir)]
    assert steps == list(range(1, 136))
    ref_seen = ids_per_epoch(references[after])
    assert all(sorted(seen[e]) == sorted(ref_seen[e]) for e in seen)
    # the change is an event in the run log
    events = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "event/world_size_old" in r]
    assert [(r["step"], r["event/world_size_old"], r["event/world_size_new"]) for r in events] == [
        (stopped_at + 1, before, after)]
    # and each launch in launches.jsonl, with what it ran on
    launches = read_jsonl(run_dir / "launches.jsonl")
    assert [(r["start_step"], r["num_processes"], r["mixed_precision"]) for r in launches] == [
        (0, before, "no"), (stopped_at, after, "no")]
    assert all(r["torch"] and r["device"].startswith("cpu") and r["threads_per_process"] >= 1 for r in launches)
    assert len({r["run_id"] for r in launches}) == 1  # one run, continued (its W&B run too)
    name, weights = final_weights(run_dir)
    assert name == "step-00000135"
    diff = max(max_diff(weights, final_weights(references[n])[1]) for n in (1, 2))
    print(f"{before}->{after}: stopped at step {stopped_at}, max |param diff| vs uninterrupted = {diff:.3g}")
    assert diff < TOLERANCE


def test_world_size_that_cannot_form_the_global_batch_is_refused(synth_imdb, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    cmd = launch_cmd(2, overrides(run_dir, synth_imdb, **{"train.global_batch_size": 32}))
    cmd[cmd.index("--num_processes") + 1] = "3"
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "train.global_batch_size=32 cannot be split evenly over 3 processes; process counts that work: 1, 2, 4, 8, 16, 32" in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_first_step_gradient_is_the_same_for_every_layout(references, synth_imdb, tmp_path, cache_env):
    """The loss scale: the gradient of a step is the mean over its global batch, whatever the processes and the
    accumulation. Checked on the first step's gradient norm (before clipping), without dropout: 1 x 32 and 2 x 16
    (the uninterrupted runs' first steps) against 2 x 8 x 2 accumulation steps; and each layout's micro-batches of
    that step are disjoint and cover the global batch."""
    run_dir = tmp_path / "p2m8"
    args = overrides(run_dir, synth_imdb, **NO_DROPOUT, **{"train.max_steps": 1, "train.micro_batch_size": 8,
                                                          "checkpoint.every": 0})
    proc = run(launch_cmd(2, args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    norms = {}
    for (nproc, micro), folder in {(1, 0): references[1], (2, 0): references[2], (2, 8): run_dir}.items():
        norms[nproc, micro] = train_rows(folder)[0]["grad_norm"]
        ids = [i for r in range(nproc) for row in read_jsonl(folder / "debug" / f"samples-rank{r}.jsonl")
               if row["step"] == 1 for i in row["ids"]]
        assert len(ids) == len(set(ids)) == 32, (nproc, micro)
    reference = norms[1, 0]
    assert reference > 0.01
    for layout, norm in norms.items():
        assert abs(norm - reference) < 1e-6 * reference, norms
