"""W&B: real offline runs, read back from the run's .wandb log with `wandb leet inspect --json` (no mocks of wandb)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EMOTIONS, REPO, direct_cmd, launch_cmd, make_emotions, read_jsonl, run, tiny_overrides, write_csv
from test_resume import start, stop_at

pytestmark = pytest.mark.slow

WANDB_CLI = str(Path(sys.executable).parent / "wandb")
TRAIN_KEYS = {"train/loss", "train/acc", "lr", "grad_norm", "clip_fraction", "throughput/samples_per_s",
              "throughput/tokens_per_s", "epoch"}
VAL_KEYS = {"val/loss", "val/acc", "val/f1"}


def wandb_args(run_dir, data, **extra):
    return tiny_overrides(run_dir, data, **{"log.trackers": "[wandb]", "log.wandb.mode": "offline",
                                            "train.log_every": 5, "checkpoint.every": 10, **extra})


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def records(offline_dir: Path) -> list[dict]:
    out = subprocess.run([WANDB_CLI, "leet", "inspect", "--json", str(offline_dir)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def history(recs: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in recs if r["type"] == "history"]


def summary(offline_dir: Path) -> dict:
    out = subprocess.run([WANDB_CLI, "leet", "inspect", "--summary", "--json", str(offline_dir)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_two_process_run_writes_one_complete_wandb_run(tmp_path, synth_imdb, cache_env):
    run_dir = tmp_path / "run"
    proc = run(launch_cmd(2, wandb_args(run_dir, synth_imdb)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (offline,) = offline_runs(run_dir)  # exactly one W&B run, written by the main process only
    recs = records(offline)
    config = [r for r in recs if r["type"] == "config"][0]["config"]["update"]
    assert config["model"]["hidden_dim"] == 32 and config["train"]["global_batch_size"] == 32
    launch = config["launch"]
    assert launch["num_processes"] == 2 and launch["device"].startswith("cpu") and launch["mixed_precision"] == "no"
    assert launch["torch"] and launch["accelerate"] and launch["git_commit"]
    rows = history(recs)
    steps = [r["_step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    keys = set().union(*rows)
    assert TRAIN_KEYS | VAL_KEYS <= keys, keys
    for media in ("val/confusion_matrix", "val/examples"):  # tables are stored as files, referenced by key
        assert any(k.startswith(media) for k in keys), (media, keys)
    train_steps = [r["_step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(5, 91, 5))
    s = summary(offline)
    flat = json.dumps(s)
    assert "best/val_acc" in flat and "test/acc" in flat
    assert (run_dir / "best" / "model.safetensors").is_file()
    models = [r["artifact"] for r in recs if r["type"] == "artifact" and r["artifact"].get("type") == "model"]
    assert len(models) == 1 and "best" in models[0]["aliases"]


def test_a_multiclass_run_logs_its_class_names_and_examples_of_every_class(tmp_path, cache_env):
    """Four classes, the validation file sorted by label: the confusion matrix and the per-class table carry the
    class names, and the examples table shows reviews of more than one class; the test evaluation's too. The config
    holds the W&B settings in effect (WANDB_* over the YAML); a rollback's new W&B run names where it started."""
    texts, labels = make_emotions(200, 2)
    val = sorted(zip(texts, labels), key=lambda pair: pair[1])
    data = write_csv(tmp_path / "data", {"train": make_emotions(800, 0), "validation": tuple(zip(*val)),
                                         "test": make_emotions(100, 1)})
    run_dir = tmp_path / "run"
    args = wandb_args(run_dir, data, **{"train.epochs": 1, "train.select_metric": "macro_f1",
                                        "log.wandb.tags": "[yaml]", "checkpoint.keep_last": 5})
    proc = run(direct_cmd(args), env={"WANDB_TAGS": "env1,env2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (offline,) = offline_runs(run_dir)
    for split, n in (("val", 200), ("test", 100)):
        tables = {}
        for f in (offline / "files" / "media" / "table" / split).glob("*.table.json"):
            tables.setdefault(f.name.split("_")[0], []).append(json.loads(f.read_text()))
        per_class, confusion, examples = tables["per"][-1], tables["confusion"][-1], tables["examples"][-1]
        assert [row[0] for row in per_class["data"]] == EMOTIONS  # class, precision, recall, f1, support
        assert {row[0] for row in confusion["data"]} == set(EMOTIONS)  # actual, predicted, count
        assert sum(row[2] for row in confusion["data"]) == n
        assert len(examples["data"]) == 16 and {row[1] for row in examples["data"]} == set(EMOTIONS)
    config = [r for r in records(offline) if r["type"] == "config"][0]["config"]["update"]
    assert config["log"]["wandb"]["tags"] == ["env1", "env2"] and config["launch"]["resumed_from"] == ""
    # a rollback: a new W&B run, whose config names the checkpoint its line started from
    proc = run(direct_cmd([*args, f"checkpoint.resume={run_dir / 'checkpoints' / 'step-00000010'}"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rollback = offline_runs(run_dir)[-1]
    config = [r for r in records(rollback) if r["type"] == "config"][0]["config"]["update"]
    assert config["launch"]["resumed_from"] == "step-00000010"
    ids = {[r for r in records(d) if r["type"] == "run"][0]["run"]["run_id"] for d in (offline, rollback)}
    assert len(ids) == 2
    # the line's latest checkpoint named (nothing newer to roll back): its W&B run goes on; a relaunch of that
    # command, after it trained on, continues from its own latest checkpoint, not from the one named
    latest = max(run_dir.glob("checkpoints/step-*"))
    for _ in range(2):
        proc = run(direct_cmd([*args, "train.epochs=2", f"checkpoint.resume={latest}"]))
        assert proc.returncode == 0, proc.stderr[-3000:]
    rollback_id = [r for r in records(rollback) if r["type"] == "run"][0]["run"]["run_id"]
    assert [launch["run_id"] for launch in read_jsonl(run_dir / "launches.jsonl")][1:] == [rollback_id] * 3
    assert max(run_dir.glob("checkpoints/step-*")) > latest


def test_resumed_run_continues_the_same_wandb_run(tmp_path, synth_imdb, cache_env):
    run_dir = tmp_path / "run"
    args = wandb_args(run_dir, synth_imdb, **{"train.epochs": 3, "model.hidden_dim": 64, "data.max_len": 96})
    stop_at(run_dir, 50, start(1, args))
    stopped = json.loads((run_dir / "status.json").read_text())["step"]
    proc = run(direct_cmd(args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = offline_runs(run_dir)
    ids = {[r for r in records(d) if r["type"] == "run"][0]["run"]["run_id"] for d in (first, second)}
    assert len(ids) == 1, "the resumed job must log into the same W&B run id"
    steps1 = [r["_step"] for r in history(records(first)) if "train/loss" in r]
    steps2 = [r["_step"] for r in history(records(second)) if "train/loss" in r]
    assert max(steps1) <= stopped < min(steps2)
    assert sorted(steps1 + steps2) == list(range(5, 136, 5))  # continuing steps, none twice, none lost
    # W&B knows how each launch ended: the first was preempted (exit 75), not "finished"
    exits = [[r["exit"]["exit_code"] for r in records(d) if r["type"] == "exit"] for d in (first, second)]
    assert exits == [[75], [0]]
    assert any(r["type"] == "preempting" for r in records(first))

    # a relaunch after the end (a requeue, say) tests again: nothing goes to W&B's history below the step it has
    # reached (W&B would drop it with a warning), the test results reach the summary, metrics.jsonl stays in order
    again = run(direct_cmd(args))
    assert again.returncode == 0 and "Tried to log to step" not in again.stderr, again.stderr[-3000:]
    third = offline_runs(run_dir)[-1]
    assert third != second and not history(records(third))
    assert summary(third)["summary"]["test/acc"] == summary(second)["summary"]["test/acc"]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == sorted(steps) and steps[-1] == 135


def test_a_relaunch_that_evaluates_at_the_step_it_resumed_from_keeps_that_row_out_of_wandb_history(
        tmp_path, synth_imdb, cache_env):
    """Stopped before its first evaluation, relaunched with train.max_steps below that step: the run is over, its
    model is evaluated at the checkpoint's step, which W&B's history has passed. The rows go to metrics.jsonl and the
    test results to W&B's summary; W&B's history gets nothing (W&B would drop it with a warning)."""
    run_dir = tmp_path / "run"
    args = wandb_args(run_dir, synth_imdb, **{"model.hidden_dim": 64, "data.max_len": 96})
    stop_at(run_dir, 12, start(1, args, launcher=False), group=True)  # the first evaluation: step 45
    stopped = json.loads((run_dir / "status.json").read_text())["step"]
    proc = run(direct_cmd([*args, "train.max_steps=10"]))
    assert proc.returncode == 0 and "Tried to log to step" not in proc.stderr, proc.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/acc" in r or "test/acc" in r] == [stopped, stopped]
    relaunch = offline_runs(run_dir)[-1]
    assert not history(records(relaunch)) and "test/acc" in summary(relaunch)["summary"]


@pytest.mark.parametrize("how", ["disabled", "unwritable", "unreachable"])
def test_wandb_off_or_broken_never_stops_training(how, tmp_path, synth_imdb, cache_env):
    run_dir = tmp_path / "run"
    extra, env = {"train.epochs": 1}, {}
    if how == "disabled":
        extra["log.wandb.mode"] = "disabled"
    elif how == "unwritable":  # W&B cannot create its folder: the run dir's "wandb" is a file
        run_dir.mkdir()
        (run_dir / "wandb").write_text("not a folder")
    else:  # online with a well-formed key and a W&B server that does not answer (a closed local port): an outage
        extra["log.wandb.mode"] = "online"
        env = {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "10"}
    proc = run(direct_cmd(wandb_args(run_dir, synth_imdb, **extra)), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert [r for r in read_jsonl(run_dir / "metrics.jsonl") if "test/acc" in r]
    if how != "disabled":
        assert "could not start" in proc.stderr and "training goes on" in proc.stderr


def test_online_mode_without_an_api_key_stops_every_process_before_training(tmp_path, synth_imdb, cache_env):
    """No key (no WANDB_API_KEY, no ~/.netrc) for an online run: wandb refuses at once, and a run that went on would
    train for hours with no dashboard. Both processes stop at the start, nothing trained or checkpointed."""
    run_dir, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    proc = run(launch_cmd(2, wandb_args(run_dir, synth_imdb, **{"log.wandb.mode": "online"})),
               env={"HOME": str(home), "WANDB_API_KEY": "", "NETRC": str(home / "none")})
    # the launcher exits 1 for any failed process; the process that met the error exited 2 (a clear error)
    assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    # one line from each process: the error on the main one, a pointer to it on the other
    assert proc.stderr.count("distsent-train: ConfigError: W&B could not start (UsageError: No API key") == 1
    assert "wandb login" in proc.stderr and "distsent-train: PeerFailed: process 0 could not start W&B" in proc.stderr
    assert not list(run_dir.glob("checkpoints/*")) and not (run_dir / "best").exists()
    assert "train/loss" not in ((run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else "")
    assert not (run_dir / "launches.jsonl").exists()  # a launch that trained nothing is not one of the run's


def test_a_relaunch_that_wandb_refuses_leaves_a_finished_runs_results(tmp_path, synth_imdb, cache_env):
    """A finished run relaunched (a requeue, say) online without an API key stops before it trains: its
    metrics.jsonl keeps the test results it had (they were dropped as the launch opened, before W&B refused it),
    and status.json still says finished."""
    run_dir, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    args = wandb_args(run_dir, synth_imdb, **{"train.max_steps": 10})
    assert run(direct_cmd(args)).returncode == 0
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert "test/acc" in metrics
    proc = run(direct_cmd([*args, "log.wandb.mode=online"]),
               env={"HOME": str(home), "WANDB_API_KEY": "", "NETRC": str(home / "none")})
    assert proc.returncode == 2 and "W&B could not start" in proc.stderr, proc.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_api_key_never_reaches_the_run_directory(tmp_path, synth_imdb, cache_env):
    secret = "0123456789abcdef0123456789abcdef01234567"
    run_dir = tmp_path / "run"
    proc = run(direct_cmd(wandb_args(run_dir, synth_imdb, **{"train.epochs": 1})), env={"WANDB_API_KEY": secret})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert secret not in proc.stdout + proc.stderr
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("CUDA error: an illegal memory access")])
def test_a_launch_stopped_by_any_error_ends_its_wandb_run_and_status_with_that_exit_code(tmp_path, synth_imdb,
                                                                                       cache_env, error):
    """Not only preemption and write failures: a Ctrl-C outside the stop signals, or an error no part of distsent
    raises (a library's), reaches W&B as the launch's exit code, not "finished" with 0, and status.json as failed,
    named, with that code (under the Python API no command line writes it after fit()). The error is raised inside
    step 4 by a wrapped train_step, the only stand-in here (a second Ctrl-C cannot be timed into a step)."""
    from distsent.configfile import load_config
    from distsent.preemption import StopFlag
    from distsent.together import INTERRUPTED
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    trainer = Trainer(load_config(REPO / "configs" / "smoke.yaml", wandb_args(run_dir, synth_imdb)), stop=StopFlag([]))
    step = trainer.train_step

    def failing_in_step_4(batch):
        if trainer.state.step == 3:
            raise error
        step(batch)

    trainer.train_step = failing_in_step_4
    try:
        with pytest.raises(type(error)):
            trainer.fit()
    finally:
        trainer.close()
    code = 130 if isinstance(error, KeyboardInterrupt) else 1
    (offline,) = offline_runs(run_dir)
    assert [r["exit"]["exit_code"] for r in records(offline) if r["type"] == "exit"] == [code]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 3 and status["exit_code"] == code
    assert status["error"] == ("RuntimeError: CUDA error: an illegal memory access" if code == 1 else
                               INTERRUPTED)


def test_a_relaunch_of_a_finished_run_that_fails_leaves_both_records_finished(tmp_path, synth_imdb, cache_env):
    """A relaunch after the end (a requeue, say) resumes the same W&B run, then cannot write its launch record (a
    directory stands in its place) before it marks the run running: status.json keeps 'finished', and so does the
    W&B run (exit 0), where it said failed (74) while status.json said finished. A rollback to an earlier checkpoint
    that fails the same way began a new line of the run (a new W&B run, later checkpoints set aside): both say
    failed."""
    from distsent.configfile import load_config
    from distsent.files import WriteError
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    args = wandb_args(run_dir, synth_imdb, **{"train.max_steps": 20})
    with Trainer(load_config(REPO / "configs" / "smoke.yaml", args), stop=StopFlag([])) as trainer:
        trainer.fit()
    (run_dir / "launches.jsonl").unlink()
    (run_dir / "launches.jsonl").mkdir()
    for resume in ("auto", str(run_dir / "checkpoints" / "step-00000010")):
        cfg = load_config(REPO / "configs" / "smoke.yaml", [*args, f"checkpoint.resume={resume}"])
        with Trainer(cfg, stop=StopFlag([])) as trainer, pytest.raises(WriteError):
            trainer.fit()
    # the three W&B folders by run id (their names order launches of the same second by id, not by time)
    exits: dict[str, list] = {}
    for d in offline_runs(run_dir):
        recs = records(d)
        run_id = next(r["run"]["run_id"] for r in recs if r["type"] == "run")
        exits.setdefault(run_id, []).extend(r["exit"]["exit_code"] for r in recs if r["type"] == "exit")
    assert sorted(exits.values()) == [[0, 0], [74]]  # the run and its relaunch; the rollback's new run
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 74 and "launches.jsonl" in status["error"]


def test_a_launch_failing_as_it_opens_its_records_ends_its_wandb_run_and_status(tmp_path, synth_imdb, cache_env):
    """After W&B has started, the run's config.yaml cannot be written (a directory stands in its place): the launch
    stops with the write error, and W&B and status.json both learn it (they were left to wandb's exit hook)."""
    from distsent.configfile import load_config
    from distsent.files import EXIT_WRITE, WriteError
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "smoke.yaml", wandb_args(run_dir, synth_imdb))
    with Trainer(cfg, stop=StopFlag([])) as trainer, pytest.raises(WriteError, match="config.yaml"):
        trainer.fit()
    assert not (run_dir / "run.lock").exists()  # the with block closed the run
    threads = torch.get_num_threads()  # as before the Trainer
    torch.set_num_threads(other := 1 if threads != 1 else 2)  # another Trainer's, say: a second close() keeps it
    trainer.close()
    assert torch.get_num_threads() == other and not (run_dir / "launches.jsonl").exists()
    torch.set_num_threads(threads)
    (offline,) = offline_runs(run_dir)
    assert [r["exit"]["exit_code"] for r in records(offline) if r["type"] == "exit"] == [EXIT_WRITE]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "config.yaml" in status["error"] and status["step"] == 0
