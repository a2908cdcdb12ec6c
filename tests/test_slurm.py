"""The Slurm scripts on a real two-node cluster on this machine (slurm/dev-cluster.sh): a 2-node job, preemption
with requeue and exact resume, a requeue onto fewer nodes, a job array with a requeued task, a plain scancel, a
stop signal whose checkpoint hits a full disk, the launch command of a sweep task, and bash -n + shellcheck on every
script.

The cluster fixture installs and starts Slurm when it can (root with apt-get), and skips the module only where that
is impossible. Every job runs CPU processes over gloo on generated data; its log and run directory live in tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, fill_disk, run_env, tiny_overrides, train_rows

pytestmark = pytest.mark.slow

SLURM_DIR = REPO / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sh")) + sorted(SLURM_DIR.glob("*.sbatch"))
CONFIG = REPO / "configs" / "smoke.yaml"
SKIP = 77
STEPS_PER_EPOCH = 45  # 1440 training reviews / global batch 32
EPOCHS = 3


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


@pytest.fixture(scope="session")
def cluster():
    """The dev cluster, brought up for this session (and taken down after, if it was not already running)."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = [shutil.which("bash"), str(SLURM_DIR / "dev-cluster.sh")]
    was_up = subprocess.run([*script, "status"], capture_output=True, timeout=60).returncode == 0
    proc = subprocess.run([*script, "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode == SKIP:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield
    if not was_up:
        subprocess.run([*script, "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def job_env(tmp_path_factory):
    """What the jobs inherit from sbatch: this Python's bin directory first on PATH, a private token cache."""
    return clean_env({"DISTSENT_CACHE": str(tmp_path_factory.mktemp("slurm-cache")), "WANDB_MODE": "disabled"})


def clean_env(extra: dict) -> dict:
    """This environment without Slurm's or the scripts' own variables, this Python's bin directory first on PATH."""
    env = {k: v for k, v in run_env().items() if not k.startswith(("SLURM_", "SBATCH_", "DISTSENT_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def overrides(data: Path, **extra) -> list[str]:
    # tiny_overrides without output_dir: the script names the run directory after the job
    # the data sizes are pinned here, so that the step counts do not depend on configs/smoke.yaml
    args = tiny_overrides(Path("unused"), data, **{"train.epochs": EPOCHS, "model.hidden_dim": 64,
                                                   "data.max_len": 96, "data.limit": 0, "data.test_limit": 0,
                                                   "data.val_fraction": 0.1, "checkpoint.every": 10,
                                                   "train.threads": 1, **extra})
    return [a for a in args if not a.startswith("output_dir=")]


def sbatch(env: dict, workdir: Path, options: list[str], script: str, args: list[str]) -> str:
    cmd = ["sbatch", "--parsable", f"--chdir={workdir}", *options, str(SLURM_DIR / script), *args]
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=600)
    job = proc.stdout.strip().split(";")[0]
    assert job, proc.stderr
    return job


def job_logs(workdir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(workdir.glob("slurm-*.out")))


def job_fields(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(tok.split("=", 1) for tok in out.split("\n")[0].split() if "=" in tok)


def wait_for(what: str, check, timeout: float, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_step(run_dir: Path, step: int, job: str, timeout: float = 240) -> int:
    last_check = [0.0]

    def reached():
        if time.time() - last_check[0] > 1:  # the job's state once a second, the metrics file more often
            last_check[0] = time.time()
            if job_fields(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
                raise AssertionError(f"job {job} ended before step {step}: {job_fields(job)}")
        try:
            rows = train_rows(run_dir)
        except (FileNotFoundError, ValueError):
            return None
        return rows[-1]["step"] if rows and rows[-1]["step"] >= step else None

    return wait_for(f"step {step} of job {job}", reached, timeout, every=0.05)


def wait_requeued(job: str) -> dict:
    """The job requeued itself: it is pending again, held by Slurm for about 2 minutes (BeginTime)."""
    fields = wait_for(f"job {job} to be requeued",
                      lambda: (f := job_fields(job)).get("JobState") == "PENDING" and f, 120)
    log(f"job {job} pending again: Restarts={fields['Restarts']} Reason={fields['Reason']}")
    return fields


def release(job: str, *update: str) -> None:
    # Slurm's hold keeps a restart from starting in the same second as the kill of the previous attempt, whose
    # credential the nodes revoked ("Job credential revoked"): let a couple of seconds pass first
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", *update, "StartTime=now"], check=True)
    log(f"job {job} released: scontrol update {' '.join(update)} StartTime=now")


def wait_done(job: str, timeout: float = 300) -> dict:
    return wait_for(f"job {job} to end",
                    lambda: (f := job_fields(job)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                                       "TIMEOUT", "NODE_FAIL") and f, timeout)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in train_rows(run_dir)]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.fixture(scope="module")
def two_node_run(cluster, job_env, synth_imdb, tmp_path_factory):
    """An uninterrupted job on 2 nodes x 1 process: the test of multi-node itself, and the preemption yardstick."""
    work = tmp_path_factory.mktemp("two-node")
    t0 = time.time()
    job = sbatch(job_env, work, ["--nodes=2"], "train.sbatch", [str(CONFIG), *overrides(synth_imdb)])
    # polled here: `sbatch --wait` checks the job at growing intervals (this job took 42 s through it, 9 s here)
    fields = wait_done(job)
    assert fields["JobState"] == "COMPLETED", f"job {job} failed:\n{job_logs(work)[-4000:]}"
    log(f"2-node job {job} took {time.time() - t0:.0f} s")
    return job, work / "runs" / f"smoke-{job}", job_logs(work)


def test_two_nodes_train_to_the_end(two_node_run):
    job, run_dir, text = two_node_run
    assert "2 process(es) on 2 machine(s)" in text
    ranks = sorted(re.findall(r"node (n\d): machine rank (\d) of 2", text))
    assert ranks == [("n1", "0"), ("n2", "1")], text[-3000:]
    assert f"head n1:{20000 + int(job) % 20000}" in text
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == EPOCHS * STEPS_PER_EPOCH
    assert (run_dir / "best" / "model.safetensors").is_file()
    assert job_fields(job)["ExitCode"] == "0:0"


def test_usr1_checkpoints_requeues_and_resumes_exactly(two_node_run, job_env, synth_imdb, tmp_path):
    _, ref_dir, _ = two_node_run
    t0 = time.time()
    job = sbatch(job_env, tmp_path, ["--nodes=2"], "train.sbatch", [str(CONFIG), *overrides(synth_imdb)])
    log(f"submitted job {job}")
    run_dir = tmp_path / "runs" / f"smoke-{job}"
    at = wait_step(run_dir, 30, job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    log(f"job {job} at step {at}: scancel --signal=USR1 --batch")
    fields = wait_requeued(job)
    assert fields["Restarts"] == "1"
    stopped = status(run_dir)
    assert stopped["state"] == "preempted" and stopped["exit_code"] == 75
    assert at <= stopped["step"] < EPOCHS * STEPS_PER_EPOCH
    log(f"job {job} had checkpointed at step {stopped['step']} (status.json {stopped['time']})")
    release(job)
    fields = wait_done(job)
    log(f"job {job} {fields['JobState']} (Restarts={fields['Restarts']}); {time.time() - t0:.0f} s in all")

    text = job_logs(tmp_path)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text[-4000:]
    assert fields["Restarts"] == "1"
    assert f"requeueing job {job} (restart 1)" in text
    assert f"job {job} (id {job}, restart 1)" in text
    assert f"resumed from {run_dir}/checkpoints/step-{stopped['step']:08d}" in text
    assert status(run_dir)["state"] == "finished"
    assert status(run_dir)["step"] == status(ref_dir)["step"] == EPOCHS * STEPS_PER_EPOCH
    assert losses(run_dir) == losses(ref_dir), "the resumed run must retrace the uninterrupted one step by step"


def test_requeued_onto_one_node_finishes_the_same_steps(cluster, job_env, synth_imdb, tmp_path):
    job = sbatch(job_env, tmp_path, ["--nodes=2"], "train.sbatch", [str(CONFIG), *overrides(synth_imdb)])
    run_dir = tmp_path / "runs" / f"smoke-{job}"
    wait_step(run_dir, 30, job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_requeued(job)
    assert status(run_dir)["state"] == "preempted"
    release(job, "NumNodes=1-1", "NumTasks=1", "NumCPUs=1")
    fields = wait_done(job)
    text = job_logs(tmp_path)
    assert fields["JobState"] == "COMPLETED" and fields["NumNodes"] == "1", text[-4000:]
    assert "2 process(es) on 2 machine(s)" in text and "1 process(es) on 1 machine(s)" in text
    assert "world size changed from 2 to 1" in text
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == EPOCHS * STEPS_PER_EPOCH
    steps = [s for s, _ in losses(run_dir)]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))


def test_a_requeue_by_slurm_itself_is_not_told_to_resubmit(cluster, job_env, synth_imdb, tmp_path):
    """`scontrol requeue` (what a preemption with PreemptMode=REQUEUE does): the ranks checkpoint, the script leaves
    the requeue to Slurm without telling the user to submit again, and the job comes back and finishes."""
    job = sbatch(job_env, tmp_path, [], "train.sbatch", [str(CONFIG), *overrides(synth_imdb)])
    run_dir = tmp_path / "runs" / f"smoke-{job}"
    wait_step(run_dir, 20, job)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_requeued(job)
    release(job)
    fields = wait_done(job)
    text = job_logs(tmp_path)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-4000:]
    assert "checkpoint written; Slurm is requeueing the job itself (restart 1)" in text and "not requeueing" not in text
    assert "resumed from" in text and status(run_dir)["state"] == "finished"


def test_job_array_runs_one_seed_per_task_and_requeues_one_task(cluster, job_env, synth_imdb, tmp_path):
    import yaml

    args = overrides(synth_imdb, **{"train.epochs": 2})
    t0 = time.time()
    array = sbatch(job_env, tmp_path, ["--array=0-1"], "sweep.sbatch", [str(CONFIG), *args])
    tasks = {i: f"{array}_{i}" for i in (0, 1)}
    runs = {i: tmp_path / "runs" / f"smoke-{tasks[i]}" for i in (0, 1)}
    wait_step(runs[1], 20, tasks[1])
    # TERM to the batch shell: it reaches the ranks as USR1 (srun would kill them on a TERM) and they checkpoint
    subprocess.run(["scancel", "--signal=TERM", "--batch", tasks[1]], check=True)
    log(f"array task {tasks[1]}: scancel --signal=TERM --batch")
    wait_requeued(tasks[1])
    release(tasks[1])
    done = {i: wait_done(tasks[i]) for i in (0, 1)}
    log(f"array job {array} took {time.time() - t0:.0f} s")
    logs = {i: (tmp_path / f"slurm-{tasks[i]}.out").read_text() for i in (0, 1)}
    for i in (0, 1):
        assert done[i]["JobState"] == "COMPLETED", logs[i][-4000:]
        assert status(runs[i])["state"] == "finished" and status(runs[i])["step"] == 2 * STEPS_PER_EPOCH
        cfg = yaml.safe_load((runs[i] / "config.yaml").read_text())
        assert cfg["train"]["seed"] == i and cfg["log"]["wandb"]["group"] == f"smoke-{array}"
    assert (done[0]["Restarts"], done[1]["Restarts"]) == ("0", "1")
    assert f"checkpoint written; requeueing job {tasks[1]} (restart 1)" in logs[1] and "resumed from" in logs[1]
    assert losses(runs[0]) != losses(runs[1])


def test_plain_scancel_stops_for_good_after_a_checkpoint(cluster, job_env, synth_imdb, tmp_path):
    job = sbatch(job_env, tmp_path, [], "train.sbatch", [str(CONFIG), *overrides(synth_imdb)])
    run_dir = tmp_path / "runs" / f"smoke-{job}"
    wait_step(run_dir, 20, job)
    subprocess.run(["scancel", job], check=True)  # SIGTERM to the batch shell and every process of the job
    fields = wait_done(job)
    text = job_logs(tmp_path)
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", text[-3000:]
    assert status(run_dir)["state"] == "preempted", "the ranks checkpoint on SIGTERM before the job ends"
    # a new job would get a run directory of its own: the hint gives the command, with this one's, and it resumes
    hint = re.search(r"not requeueing; to continue from the checkpoint, submit again with the same config, "
                     r"overrides and environment: (sbatch \[options\] .*)\n", text)
    assert hint and hint[1].endswith(f"output_dir={run_dir}"), text[-3000:]
    again = sbatch(job_env, tmp_path, [], "train.sbatch", shlex.split(hint[1])[4:])
    assert wait_done(again)["JobState"] == "COMPLETED" and status(run_dir)["state"] == "finished", job_logs(tmp_path)
    assert "resumed from" in job_logs(tmp_path)


def test_a_stop_signal_whose_checkpoint_fails_ends_the_job_without_requeueing(cluster, job_env, synth_imdb,
                                                                                small_disk, tmp_path):
    """USR1 comes, but the checkpoint it asks for cannot be written (the run directory's disk, a real 2 MiB tmpfs,
    is full): the run fails with the write error's code 74 and the job ends there, instead of requeueing a run
    that fails again at each restart. The disk keeps 64 KiB free for the metrics lines of the steps before the
    signal arrives; a checkpoint of this model needs several times that, and the only scheduled one comes at the
    end of a 180-step epoch."""
    run_dir = small_disk / "run"
    args = overrides(synth_imdb, **{"train.global_batch_size": 8, "checkpoint.every": 1000})
    job = sbatch(job_env, tmp_path, [], "train.sbatch", [str(CONFIG), *args, f"output_dir={run_dir}"])
    wait_step(run_dir, 3, job)
    fill_disk(small_disk, leave=64 * 1024)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    # the end of this attempt: a requeue would show as PENDING
    fields = wait_for(f"job {job} to stop running", lambda: (f := job_fields(job)).get("JobState") not in (
        "RUNNING", "CONFIGURING", "COMPLETING") and f, 180)
    text = job_logs(tmp_path)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", text[-4000:]
    assert fields["ExitCode"] == "74:0", text[-4000:]
    stopped = status(run_dir)
    assert stopped["state"] == "failed" and stopped["exit_code"] == 74
    assert "a stop signal (SIGUSR1) came but no checkpoint was written for it" in stopped["error"]
    assert "No space left on device" in text
    assert "the run failed after SIGUSR1: not requeueing; once the cause is fixed, to continue from the checkpoint, " \
           "submit again with the same config, overrides and environment: sbatch [options] " in text
    assert f"output_dir={run_dir}\n" in text


def test_a_failed_run_ends_the_job_with_the_trainers_exit_code(cluster, job_env, tmp_path):
    """Bad data (a test label training never saw): the job fails with the trainer's documented code 2 from
    status.json, not the launcher's catch-all 1, and its log names the file and line."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("text,label\n" + "".join(f"good words {i},pos\nbad words {i},neg\n"
                                                           for i in range(40)))
    (data / "test.csv").write_text("text,label\ngood words,pos\nodd words,maybe\n")
    job = sbatch(job_env, tmp_path, [], "train.sbatch", [str(CONFIG), *overrides(data)])
    fields, text = wait_done(job), job_logs(tmp_path)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", text[-3000:]
    assert status(tmp_path / "runs" / f"smoke-{job}")["exit_code"] == 2
    assert f"{data / 'test.csv'}: line 3 has label 'maybe'" in text


@pytest.mark.parametrize("mistake", ["a misspelt override", "a run directory another run holds",
                                     "an sbatch option after the config"])
def test_a_launch_that_fails_before_it_runs_ends_the_job_with_exit_code_2(cluster, job_env, synth_imdb, tmp_path,
                                                                          mistake):
    """The trainer stops with its documented 2 before it writes a status.json of its own (a config error; a
    directory whose lock a live run holds, here this test's process): the job ends with that 2, read from the
    trainer's exit report, not the launchers' catch-all 1. An sbatch option after the config is named by the
    script itself, before any launcher."""
    import socket

    args = [str(CONFIG), *overrides(synth_imdb)]
    held = tmp_path / "held"
    if mistake == "a misspelt override":
        args.append("model.hiden_dim=8")
        said = "config error: the override model.hiden_dim=8: model.hiden_dim: unknown key"
    elif mistake == "a run directory another run holds":
        held.mkdir()
        (held / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                   "heartbeat": time.time() + 3600}))
        args.append(f"output_dir={held}")
        said = f"{held} is in use by a live run (host {socket.gethostname()}, pid {os.getpid()}"
    else:
        args.append("--nodes=2")
        said = "--nodes=2: after the script come the config file (no --config) and key=value overrides"
    job = sbatch(job_env, tmp_path, [], "train.sbatch", args)
    fields, text = wait_done(job), job_logs(tmp_path)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", text[-3000:]
    assert said in text and not (held / "status.json").exists()
    refused = f"this launch was refused: another live run holds {held} (its run.lock"
    assert (refused in text) == (mistake == "a run directory another run holds"), text[-3000:]


def test_a_time_limit_near_the_stop_signals_lead_is_warned_about(cluster, job_env, tmp_path):
    """USR1 comes 180 s before the time limit: with --time=2 it comes as the job starts, and every attempt would
    checkpoint and requeue at once. The job's log says so before the launch (a dry run here); a 10-minute limit is
    not warned about."""
    logs = {}
    for minutes in (2, 10):
        work = tmp_path / f"time-{minutes}"
        work.mkdir()
        job = sbatch({**job_env, "DISTSENT_DRY_RUN": "1"}, work, [f"--time={minutes}"], "train.sbatch", [str(CONFIG)])
        fields, logs[minutes] = wait_done(job), job_logs(work)
        assert fields["JobState"] == "COMPLETED", logs[minutes]
    assert "warning: --time 00:02:00 leaves at most 0 s per attempt before USR1" in logs[2]
    assert "accelerate launch" in logs[10] and "warning" not in logs[10]


def test_a_refused_relaunch_of_a_finished_run_fails_the_job_and_keeps_the_record(two_node_run, job_env, synth_imdb,
                                                                                   tmp_path):
    """The finished two-node run's output_dir submitted again, with a data path that does not exist: the job fails,
    saying the launch was refused, and status.json still says finished."""
    _, run_dir, _ = two_node_run
    finished = (run_dir / "status.json").read_text()
    assert json.loads(finished)["state"] == "finished"
    bad = [a for a in overrides(synth_imdb) if not a.startswith("data.path=")] + [
        f"data.path={tmp_path / 'nowhere'}", f"output_dir={run_dir}"]
    job = sbatch(job_env, tmp_path, [], "train.sbatch", [str(CONFIG), *bad])
    fields, text = wait_done(job), job_logs(tmp_path)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", text[-3000:]
    assert f"this launch was refused (see the log above); the run in {run_dir} stays finished" in text
    assert (run_dir / "status.json").read_text() == finished


def test_sweep_file_line_per_task_and_node_rank_per_task(cluster, tmp_path):
    """Without running anything (DISTSENT_DRY_RUN): task i takes line i of the overrides file, the run directory
    is named after the array task, and the node rank is left for each srun task's own shell to expand."""
    (tmp_path / "sweep.txt").write_text("optim.lr=0.1\noptim.lr=0.2 model.bidirectional=true 'log.wandb.notes=lr "
                                        "sweep' log.wandb.tags='[a, b]' 'x=$(touch ran)'\nx=\"unclosed\n"
                                        "optim.lr=0.3 # a comment\n  # a comment\noptim.lr=0.4 output_dir=x\n")
    env = clean_env({"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
                     "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "n[1-2],gpu7", "SLURM_CPUS_ON_NODE": "4",
                     "SLURM_SUBMIT_DIR": str(tmp_path), "DISTSENT_HOME": str(REPO), "DISTSENT_DRY_RUN": "1",
                     "DISTSENT_CPU_PROCS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": ""})
    proc = subprocess.run(["bash", str(SLURM_DIR / "sweep.sbatch"), "--file", "sweep.txt", str(CONFIG), "x.y=1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"output_dir={tmp_path}/runs/smoke-4240_2 log.wandb.group=smoke-4240 x.y=1 optim.lr=0.2 " \
           f"model.bidirectional=true 'log.wandb.notes=lr sweep' 'log.wandb.tags=[a, b]' 'x=$(touch ran)'" in out
    assert not (tmp_path / "ran").exists()  # quotes are read, nothing in the line is run
    assert "--num_machines 3 --num_processes 6 --main_process_ip n1 --main_process_port 24242" in out
    assert "--nodes=3 --ntasks=3 --ntasks-per-node=1" in out and "--cpus-per-task=4" in out
    assert 'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"\' distsent-node' in out  # expanded per node
    env["SLURM_ARRAY_TASK_ID"] = "3"
    proc = subprocess.run(["bash", str(SLURM_DIR / "sweep.sbatch"), "--file", "sweep.txt", str(CONFIG)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "line 3 of" in proc.stderr and "unmatched double quote" in proc.stderr
    for task, why in ((4, "'#' is not key=value (a comment goes on a line of its own)"), (5, "a comment"),
                      (6, "output_dir=x: every task has a run directory of its own"), (7, "missing")):
        env["SLURM_ARRAY_TASK_ID"] = str(task)
        proc = subprocess.run(["bash", str(SLURM_DIR / "sweep.sbatch"), "--file", "sweep.txt", str(CONFIG)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and f"line {task} of" in proc.stderr and why in proc.stderr, proc.stderr
    env["SLURM_ARRAY_TASK_ID"] = "0"  # --array=0-N, as for seeds: there is no line 0
    proc = subprocess.run(["bash", str(SLURM_DIR / "sweep.sbatch"), "--file", "sweep.txt", str(CONFIG)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "array task 0: with --file, task i reads line i; the first is 1" in proc.stderr
    # arguments in the wrong order: named as such, not as a missing file or unknown overrides
    proc = subprocess.run(["bash", str(SLURM_DIR / "sweep.sbatch"), str(CONFIG), "--file", "sweep.txt"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--file goes before the config" in proc.stderr, proc.stderr
    proc = subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), "--nodes=2", str(CONFIG)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--nodes=2: after the script come the config file (no --config)" in proc.stderr
    assert "sbatch's own options go before the script" in proc.stderr
    for args in (["--config", str(CONFIG)], [str(CONFIG), "output_dir=runs/one"]):  # distsent-train's syntax; a
        proc = subprocess.run(["bash", str(SLURM_DIR / "sweep.sbatch"), *args],  # directory for every task
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and ("(no --config)" in proc.stderr or "a run directory of its own" in
                                         proc.stderr), proc.stderr
    # the site's precision becomes the run's (the shipped configs' `auto` would win over the launch config's);
    # an override on the command line wins over it
    proc = subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), str(CONFIG), "train.seed=3"],
                          env={**env, "DISTSENT_MIXED_PRECISION": "bf16"}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "train.mixed_precision=bf16 train.seed=3" in proc.stdout, proc.stderr
    proc = subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), str(CONFIG)],  # the trainer's auto: not the
                          env={**env, "DISTSENT_MIXED_PRECISION": "auto"}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)  # launcher's, which knows no, bf16 and fp16 only
    assert proc.returncode == 0 and "train.mixed_precision=auto" in proc.stdout, proc.stderr
    assert "--mixed_precision" not in proc.stdout
    proc = subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), str(CONFIG), "output_dir=~/runs/x"],
                          env={**env, "HOME": str(tmp_path / "home")}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)  # a quoted ~: expanded as the trainer expands it
    assert proc.returncode == 0 and f"run directory {tmp_path}/home/runs/x" in proc.stdout, proc.stderr


def test_the_launch_is_given_torchruns_stop_settings_a_yaml_safe_run_directory_and_no_early_signal(tmp_path):
    """The script run as a job's shell would run it, outside Slurm (its SLURM_* variables set by hand; no scontrol
    knows the job). A dry run shows torchrun's settings: the stop signals it forwards and a shutdown timeout well
    past torchrun's 30 s, after which it kills ranks still validating or checkpointing. A config named "lstm #3"
    gets a run directory the trainer reads whole (YAML would cut it at the #), a YAML-quoted output_dir is read
    unquoted; a bad process count is named. A stop signal that comes before the launch (a slow environment
    activation here) starts no launch: srun drops a signal sent before its tasks run, and the run would go on past
    its job's end with no checkpoint; the job goes to be requeued instead."""
    config = tmp_path / "lstm #3.yaml"
    shutil.copy(CONFIG, config)
    env = clean_env({"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1",
                     "SLURM_SUBMIT_DIR": str(tmp_path), "DISTSENT_HOME": str(REPO), "CUDA_VISIBLE_DEVICES": ""})

    def script(*args, **extra):
        return subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), *args], env={**env, **extra}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    proc = script(str(config), DISTSENT_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=180 srun" \
        in proc.stdout
    from distsent.configfile import parse_override

    step = shlex.split(proc.stdout.splitlines()[-1])
    given = next(a for a in step if a.startswith("output_dir="))
    assert parse_override(given) == ("output_dir", f"{tmp_path}/runs/lstm #3-4242"), given
    proc = script(str(config), "output_dir='runs/my run'", DISTSENT_DRY_RUN="1")
    assert proc.returncode == 0 and f"run directory {tmp_path}/runs/my run\n" in proc.stdout, proc.stdout
    proc = script(str(config), DISTSENT_DRY_RUN="1", DISTSENT_PROCS_PER_NODE="two")
    assert proc.returncode == 2 and "processes per node 'two'" in proc.stderr, proc.stderr
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f"#!/bin/sh\ntouch {tmp_path}/launched\n")
    (fake / "srun").chmod(0o755)
    proc = script(str(config), PATH=f"{fake}{os.pathsep}{env['PATH']}", DISTSENT_ENV_ACTIVATE="kill -USR1 $$")
    assert "SIGUSR1 came before the launch (no step trained)" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 75 and not (tmp_path / "launched").exists()  # no job to requeue here: 75, resubmit


def test_a_script_submitted_by_a_relative_path_finds_its_checkout_from_another_working_directory(cluster, job_env,
                                                                                                 tmp_path):
    """sbatch copies the script to its spool: the checkout is found through the job's Command, the path as given to
    sbatch (here relative to where sbatch ran, with the job working elsewhere: --chdir) followed by the arguments,
    in a checkout whose path has a space. A dry run: the launch step names the checkout's launch config."""
    home = tmp_path / "a checkout"
    shutil.copytree(SLURM_DIR, home / "slurm")
    shutil.copytree(REPO / "launch", home / "launch")
    submit, work = tmp_path / "submit", tmp_path / "work"
    submit.mkdir(), work.mkdir()
    script = os.path.relpath(home / "slurm" / "train.sbatch", submit)
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={work}", script, str(CONFIG), "log.wandb.notes=a b"],
                          env={**job_env, "DISTSENT_DRY_RUN": "1"}, cwd=submit, capture_output=True, text=True,
                          timeout=60)
    job = proc.stdout.strip().split(";")[0]
    assert job, proc.stderr
    assert wait_done(job)["JobState"] == "COMPLETED", job_logs(work)
    assert f"--config_file '{home}/launch/multi_node.yaml'" in job_logs(work), job_logs(work)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    checker = shellcheck()
    proc = subprocess.run([checker, "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def shellcheck() -> str:
    path = shutil.which("shellcheck")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "shellcheck"]
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
        path = shutil.which("shellcheck")
    if path is None:
        pytest.skip("shellcheck is not installed and cannot be installed here (needs root and apt-get)")
    return path
