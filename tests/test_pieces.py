"""In-process unit tests of the trainer's pieces: schedule, train state, resume identity, crash-safe files,
checkpoint manager, metrics. Each runs in well under a second, so a change gets feedback before the slow runs."""

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, binary_score, direct_cmd, read_jsonl, run, tiny_overrides, train_rows
from distsent import checkpoint as ckpt
from distsent import files, randomstate
from distsent.build import build_scheduler, lr_factor
from distsent.config import ConfigError, DataConfig, ExperimentConfig, resume_identity
from distsent.configfile import load_config, save_config
from distsent.metrics import EvalMetrics
from distsent.resume import resume_path
from distsent.state import TrainState


# --- schedule ----------------------------------------------------------------------------------------------------

def test_schedule_warmup_then_cosine_to_the_floor():
    cfg = load_config(None, ["optim.warmup_steps=10", "optim.schedule=cosine", "optim.min_lr_ratio=0.1"])
    assert [lr_factor(cfg, s, 110) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(cfg, 10, 110) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_factor(cfg, 110, 110) == pytest.approx(0.1) and lr_factor(cfg, 500, 110) == pytest.approx(0.1)
    linear = load_config(None, ["optim.schedule=linear"])
    assert lr_factor(linear, 25, 100) == pytest.approx(0.75)
    assert lr_factor(load_config(None, []), 77, 100) == 1.0  # constant: the tutorial's Adam 1e-3


def test_scheduler_applies_the_factor_to_the_optimizer():
    cfg = load_config(None, ["optim.lr=0.5", "optim.warmup_steps=4", "optim.schedule=linear"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(cfg, opt, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.375, 0.25, 0.125])


# --- train state -------------------------------------------------------------------------------------------------

def test_train_state_round_trips_through_json_in_place():
    state = TrainState(step=7, epoch=1, batch_in_epoch=3, best_val_acc=0.75, best_step=5, evals_since_best=2,
                       run_id="abc", world_size_changes=[{"step": 4, "old_world_size": 1, "new_world_size": 2}])
    held = TrainState()  # the trainer and the checkpoint manager share one object: it must change in place
    held.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert held == state
    old = {k: v for k, v in state.state_dict().items() if k != "stopped_early"}  # a checkpoint of an earlier version
    held = TrainState()
    held.load_state_dict(old)
    assert held.stopped_early is False and held.step == 7
    with pytest.raises(ValueError, match="unknown train state keys"):
        TrainState().load_state_dict({"stepz": 1})


def test_record_eval_counts_evaluations_since_the_best():
    state = TrainState(step=10)
    assert state.record_eval(0.6) and (state.best_step, state.evals_since_best) == (10, 0)
    state.step = 20
    assert not state.record_eval(0.6) and state.evals_since_best == 1  # equal is not better
    state.step = 30
    assert state.record_eval(0.7) and (state.best_val_acc, state.best_step, state.evals_since_best) == (0.7, 30, 0)


# --- resume identity ---------------------------------------------------------------------------------------------

def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return value + "-changed"


def _identity_fields(cfg):
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if dataclasses.is_dataclass(sub):
            for f in dataclasses.fields(sub):
                if f.metadata.get("resume"):
                    yield section.name, f.name


def test_every_identity_setting_is_checked_on_resume(tmp_path):
    cfg = ExperimentConfig()
    fields = list(_identity_fields(cfg))
    assert ("model", "hidden_dim") in fields and ("train", "seed") in fields and ("data", "max_len") in fields
    saved = resume_identity(cfg)
    ckpt.check_compatible(saved, resume_identity(cfg), tmp_path)  # unchanged: accepted
    for section, name in fields:
        other = ExperimentConfig()
        setattr(getattr(other, section), name, _changed(getattr(getattr(other, section), name)))
        with pytest.raises(ckpt.CheckpointError, match=f"{section}.{name}: checkpoint"):
            ckpt.check_compatible(saved, resume_identity(other), tmp_path)
    # settings outside the identity may change (more epochs, another learning rate)
    other = ExperimentConfig()
    other.train.epochs, other.optim.lr = 9, 0.5
    ckpt.check_compatible(saved, resume_identity(other), tmp_path)


def test_a_setting_newly_marked_as_identity_is_checked_without_other_code(tmp_path, monkeypatch):
    field = DataConfig.__dataclass_fields__["test_limit"]
    monkeypatch.setattr(field, "metadata", {**field.metadata, "resume": True})
    saved = resume_identity(ExperimentConfig())
    assert saved["data"]["test_limit"] == 0
    with pytest.raises(ckpt.CheckpointError, match="data.test_limit: checkpoint 0, config 3"):
        ckpt.check_compatible(saved, resume_identity(ExperimentConfig(data=DataConfig(test_limit=3))), tmp_path)


def test_the_cache_keys_come_from_the_same_declarations():
    cfg = DataConfig()
    assert set(cfg.stage_settings("split")) == {
        "limit", "test_limit", "val_fraction", "split_seed", "text_column", "label_column", "label_names",
        "hub_config", "hub_train_split", "hub_validation_split", "hub_test_split"}
    assert set(cfg.stage_settings("vocab")) == {"min_freq", "lowercase", "strip_html"}
    assert set(cfg.stage_settings("cut")) == {"max_len", "truncate"}
    # a setting added later enters the key only when set: entries prepared before it stay valid
    assert DataConfig(stratify=True).stage_settings("split") == {**cfg.stage_settings("split"), "stratify": True}
    assert DataConfig(symbols=True).stage_settings("vocab") == {**cfg.stage_settings("vocab"), "symbols": True}


def test_identity_of_checkpoints_from_an_earlier_version_is_still_understood(tmp_path):
    cfg = ExperimentConfig()
    current = resume_identity(cfg)
    # the earlier layout: the two train keys of that time at the top; no classes, select_metric, class_weights or
    # model.members
    earlier_model = {k: v for k, v in current["model"].items() if k != "members"}
    earlier_model["pretrained_embeddings"] = ""  # the path then, whether vectors were used now
    # nor data.min_freq / data.lowercase (the run's tokenizer.json, kept on a resume, had them), data.stratify or
    # data.symbols
    earlier_data = {k: v for k, v in current["data"].items() if k not in ("min_freq", "lowercase", "stratify",
                                                                          "symbols")}
    flat = {"model": earlier_model, "data": earlier_data,
            **{k: current["train"][k] for k in ("global_batch_size", "seed")}}
    current = {**current, "label_names": ["negative", "positive"], "data_content": "0123abcd"}
    ckpt.check_compatible(flat, current, tmp_path)  # no data_content recorded then: not compared
    with pytest.raises(ckpt.CheckpointError, match="data_content: checkpoint 'ffff', config '0123abcd'"):
        ckpt.check_compatible({**flat, "data_content": "ffff"}, current, tmp_path)
    # a run with vectors, whose file has moved since: the same identity (a run without them is refused)
    with_vectors = {**flat, "model": {**earlier_model, "pretrained_embeddings": "/old/place/glove.txt"}}
    moved = resume_identity(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, pretrained_embeddings="/new/place/glove.txt")))
    ckpt.check_compatible(with_vectors, {**current, "model": moved["model"]}, tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="model.pretrained_embeddings: checkpoint True, config False"):
        ckpt.check_compatible(with_vectors, current, tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="data.symbols: checkpoint False, config True"):  # none then
        ckpt.check_compatible(flat, {**current, "data": {**current["data"], "symbols": True}}, tmp_path)
    flat["seed"] = 3
    with pytest.raises(ckpt.CheckpointError, match="train.seed: checkpoint 3, config 0"):
        ckpt.check_compatible(flat, current, tmp_path)
    # the vocabulary settings it lacks: as the run's config.yaml has them, if it has one
    flat["seed"], step = 0, tmp_path / "run" / "checkpoints" / "step-00000003"
    step.mkdir(parents=True)
    changed = {**current, "data": {**current["data"], "min_freq": 4}}
    ckpt.check_compatible(flat, changed, step)  # no config.yaml: nothing to compare with
    save_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, min_freq=1)), tmp_path / "run" /
                "config.yaml")
    with pytest.raises(ckpt.CheckpointError, match="data.min_freq: checkpoint 1, config 4"):
        ckpt.check_compatible(flat, changed, step)


def test_threads_follow_the_cores_and_the_slurm_allocation():
    from distsent.torchsettings import default_threads

    assert default_threads(16, 2, None) == 8 and default_threads(16, 4, "") == 4
    assert default_threads(16, 2, "4") == 2  # Slurm gave this task 4 of the node's 16 cores: 2 per process
    assert default_threads(2, 2, "1") == 1 and default_threads(8, 1, "32") == 8  # never more than it can run on


def test_sizes_that_make_a_run_say_little_are_warned_about():
    from distsent.build import layout_warning
    from distsent.data import size_warnings
    from distsent.sampler import Layout

    labels = np.arange(1600) % 2
    assert size_warnings(labels[:1440], labels[1440:], ["negative", "positive"], 32) == []
    assert [w.split(":")[0] for w in size_warnings(labels[:11], labels[:1], ["negative", "positive"], 32)] == [
        "validation has no text of class 'positive'", "validation has 1 texts",
        "train.global_batch_size 32 is larger than the 11 training texts"]
    # a class of one training text seen nowhere else, named like another: a mistyped label ('sadnes'), not a class
    train, held_out = np.r_[labels[:1440] * 2, 1], labels[1440:] * 2
    assert size_warnings(train, held_out, ["anger", "sadnes", "sadness"], 32, held_out) == [
        "class 'sadnes' (1 training text) appears nowhere in validation or test and is named like 'sadness': a "
        "mistyped label?"]
    # a rare class named unlike the others, or classes named by data.label_names (a typo there is refused): a class
    for names, fixed in ((["anger", "surprise", "sadness"], False), (["anger", "sadnes", "sadness"], True)):
        assert [w.split(":")[0] for w in size_warnings(train, held_out, names, 32, held_out, fixed)] == [
            f"validation has no text of class '{names[1]}'"]
    assert [w.split(":")[0] for w in size_warnings(train, held_out, ["anger", "sadnes", "sadness"], 32,
                                                    np.r_[held_out, 1])] == ["validation has no text of class 'sadnes'"]
    # a micro-batch cap the per-process batch divides badly: the same steps through tiny micro-batches
    assert layout_warning(Layout.build(74, 2, 32), 32).startswith(
        "train.micro_batch_size 32: the 37 texts of each process divide only into 37 micro-batches of 1")
    assert layout_warning(Layout.build(64, 2, 32), 32) is None and layout_warning(Layout.build(48, 2, 16), 16) is None
    assert layout_warning(Layout.build(74, 2, 0), 0) is None
    # a recipe's warmup on a small data set: the learning rate never reaches its peak
    from distsent.build import schedule_warning
    from distsent.configfile import load_config

    emotion = load_config(REPO / "configs" / "emotion.yaml")  # warmup 100 steps
    assert schedule_warning(emotion, 4000) is None
    assert schedule_warning(emotion, 80).startswith("optim.warmup_steps=100 is not below the run's 80 steps: the "
                                                    "learning rate never reaches optim.lr=0.002 and the cosine decay")


def test_resume_never_refuses_a_directory_holding_an_earlier_run(tmp_path):
    from distsent.config import CheckpointConfig

    never = CheckpointConfig(resume="never")
    assert resume_path(never, tmp_path / "checkpoints") is None  # nothing there: a fresh start
    for earlier in ("metrics.jsonl", "best", "checkpoints"):  # a run killed before its first checkpoint counts
        run_dir = tmp_path / earlier
        run_dir.mkdir()
        if earlier == "metrics.jsonl":
            (run_dir / earlier).write_text("{}\n")
        else:
            (run_dir / earlier).mkdir()
        with pytest.raises(ckpt.CheckpointError, match=f"holds an earlier run \\({earlier}\\)"):
            resume_path(never, run_dir / "checkpoints")


def test_ctrl_c_once_flags_a_stop_twice_interrupts_and_the_handlers_come_back():
    """StopFlag in this process: the first SIGINT only flags a stop, the second raises KeyboardInterrupt (the
    handler from before), restore() puts every handler back; a SIGINT ignored at start stays ignored. Python's own
    SIGINT handler is set first: a test run started in the background by a shell without job control (`cmd &` in a
    script) starts with SIGINT ignored, and StopFlag then rightly leaves it so."""
    import threading

    from distsent.preemption import StopFlag

    def ctrl_c():
        # to this (the main) thread, whose Python handler then runs before the sleep goes on (PEP 475); os.kill lets
        # the kernel pick any thread (a library's), and the handler then waits for the main thread's next check
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(0.05)

    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    flag = StopFlag(["SIGUSR1", "SIGINT"])
    try:
        ctrl_c()
        assert flag.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()
    finally:
        flag.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)) == before
    hup = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # started by nohup
    try:
        assert StopFlag(["SIGINT", "SIGHUP"]).signals == [] and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, started_with)
        signal.signal(signal.SIGHUP, hup)



def test_only_a_launcher_ties_the_run_to_its_parent(tmp_path):
    """The parent-death signal is for runs under a launcher; a run started from a shell (nohup) must outlive it,
    also when the user's shell sets an ACCELERATE_* variable of its own. Asked of the real `accelerate launch`."""
    probe = tmp_path / "probe.py"
    probe.write_text("from distsent.preemption import _started_by_launcher\n"
                     "print('launcher', _started_by_launcher())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    shell = subprocess.run([sys.executable, str(probe)], env={**env, "ACCELERATE_LOG_LEVEL": "info"},
                           capture_output=True, text=True, timeout=120)
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               str(probe)], env=env, capture_output=True, text=True, timeout=120)
    assert "launcher False" in shell.stdout, shell.stdout + shell.stderr
    assert "launcher True" in launched.stdout, launched.stdout + launched.stderr

# --- crash-safe files --------------------------------------------------------------------------------------------

WRITER = """
import sys
from distsent.files import atomic_write
path, n = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
i = 0
while True:
    atomic_write(path, bytes([66 + i % 2]) * n)
    i += 1
"""


def test_atomic_write_killed_at_random_moments_leaves_old_or_new_whole(tmp_path):
    target, n = tmp_path / "state.json", 8_000_000
    target.write_bytes(b"A" * n)
    rng = np.random.default_rng(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(n)], stdout=subprocess.PIPE,
                                cwd=REPO)
        proc.stdout.readline()
        time.sleep(float(rng.uniform(0.05, 0.4)))
        proc.send_signal(signal.SIGKILL)  # a real crash: no cleanup code runs
        proc.wait()
        data = target.read_bytes()
        assert len(data) == n and data.count(data[:1]) == n, "a reader saw a partly written file"


def test_atomic_write_that_fails_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    files.atomic_write(target, "old")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_sealed_folder_detects_damage_and_recovers_an_interrupted_swap(tmp_path, monkeypatch):
    folder = tmp_path / "best"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"x" * 100)
    synced, fsync_path = [], files.fsync_path
    monkeypatch.setattr(files, "fsync_path", lambda p: synced.append((p, (folder / files.MANIFEST).exists())) or
                        fsync_path(p))
    files.seal(folder, kind="test")
    # the files, then the folder once its manifest is in: a crash after the folder is renamed into place (on a
    # filesystem that does not keep metadata in order) cannot leave it without its manifest
    assert synced == [(folder / "a.bin", False), (folder, True)]
    assert files.verify(folder, required=("a.bin",))["kind"] == "test"
    (folder / "a.bin").write_bytes(b"x" * 50)
    with pytest.raises(files.IntegrityError, match="a.bin: 50 bytes, the manifest says 100"):
        files.verify(folder)
    (folder / "a.bin").write_bytes(b"y" * 100)
    with pytest.raises(files.IntegrityError, match="corrupted"):
        files.verify(folder)
    with pytest.raises(files.IntegrityError, match="a.bin: a file, not a folder"):  # predict --model <a file>
        files.verify(folder / "a.bin")
    # a crash between publish()'s two renames: the new folder is not in place yet, the previous one is kept aside
    os.rename(folder, tmp_path / ".best.old")
    rename = os.rename

    def read_only(*args):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "rename", read_only)  # where it cannot be put back: one line naming it
    with pytest.raises(files.WriteError, match=f"cannot write {folder}: Read-only file system"):
        files.recover(folder)
    monkeypatch.setattr(os, "rename", rename)
    files.recover(folder)
    assert (folder / "a.bin").is_file()


# --- checkpoint manager, in process ------------------------------------------------------------------------------

def test_checkpoint_manager_saves_and_restores_everything(tmp_path):
    from accelerate import Accelerator

    from distsent.metrics import TrainSums

    acc = Accelerator(cpu=True)
    cfg = load_config(None, ["checkpoint.every=5", "checkpoint.keep_last=2"])
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    sched = build_scheduler(cfg, opt.optimizer, 100)
    state, sums = TrainState(world_size=1), TrainSums(acc)
    manager = ckpt.CheckpointManager(tmp_path, cfg.checkpoint, acc, model, opt,
                                     {"train_state": state, "log_sums": sums, "scheduler": sched, "scaler": None})
    identity = {**resume_identity(cfg), "vocab_sha256": "v"}
    assert [s for s in range(1, 16) if manager.due(s)] == [5, 10, 15]
    for step in (5, 10, 15):
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        sched.step()
        state.step = step
        sums.add(loss=torch.tensor(1.5, dtype=torch.float64))
        manager.save(step, identity)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000010", "step-00000015"]
    weights, torch_random = model.weight.detach().clone(), torch.rand(3)
    latest = resume_path(cfg.checkpoint, tmp_path / "checkpoints")
    assert latest.name == "step-00000015"

    with torch.no_grad():
        model.weight.zero_()
    state.step, fresh_sums = 0, TrainSums(acc)
    manager.stateful["log_sums"] = fresh_sums
    manager.restore(latest, identity, seed=0)
    assert torch.equal(model.weight, weights) and state.step == 15
    assert fresh_sums.totals()["loss"] == 4.5 and sched.last_epoch == 3
    assert torch.equal(torch.rand(3), torch_random)  # the random stream continues where the checkpoint left it
    with pytest.raises(ckpt.CheckpointError, match="vocab_sha256"):
        manager.restore(latest, {**identity, "vocab_sha256": "w"}, seed=0)
    # a copy named after a later step (cp -a step-15 step-20) is no checkpoint of step 20: skipped, by name
    copy = shutil.copytree(latest, tmp_path / "checkpoints" / "step-00000020")
    with pytest.raises(ckpt.CheckpointError, match="step-00000020: holds step 15, not the step its name says"):
        ckpt.verify(copy)
    assert resume_path(cfg.checkpoint, tmp_path / "checkpoints") == latest
    # a state this version does not know (a newer version's), sealed as written: one line naming the file
    saved = json.loads((copy / "state.json").read_text())
    saved["train_state"].update(step=20, grad_accum_phase=0)
    (copy / "state.json").write_text(json.dumps(saved))
    files.seal(copy, step=20)
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000020/state.json: its train_state cannot be restored "
                                                   r"by this version of distsent \(ValueError: unknown train state"):
        manager.restore(copy, identity, seed=0)


def test_a_stray_folder_and_an_io_error_while_sealing_a_checkpoint(tmp_path, monkeypatch):
    """A folder named like a partial checkpoint but not one (`.tmp-step-x`) is left alone by pruning (it stopped
    every save with a ValueError); an I/O error while the checkpoint is read back for its manifest (stood in for:
    root reads every file here) is a WriteError naming the folder, which is removed; the earlier checkpoint stays."""
    import errno

    from accelerate import Accelerator

    from distsent.files import WriteError

    acc = Accelerator(cpu=True)
    cfg = load_config(None, ["checkpoint.keep_last=1"])
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    manager = ckpt.CheckpointManager(tmp_path, cfg.checkpoint, acc, model, opt, {"train_state": TrainState()})
    identity = resume_identity(cfg)
    (tmp_path / "checkpoints" / ".tmp-step-x").mkdir(parents=True)
    manager.save(5, identity)
    manager.save(6, identity)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".tmp-step-x", "step-00000006"]

    def unreadable(folder, **fields):
        raise OSError(errno.EIO, "Input/output error")

    def unremovable(root, keep_last):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt, "prune", unremovable)  # published: older checkpoints that stay are not a failed save
    ckpt.verify(manager.save(7, identity))
    monkeypatch.setattr(ckpt.files, "seal", unreadable)
    with pytest.raises(WriteError, match=r"\.tmp-step-00000010: .*Input/output error"):
        manager.save(10, identity)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".tmp-step-x", "step-00000006",
                                                                           "step-00000007"]


def test_model_folder_is_verified_before_prediction(model_dir, tmp_path):
    import shutil

    from distsent.predict import Predictor

    folder = tmp_path / "best"
    shutil.copytree(model_dir, folder)
    assert Predictor.load(folder).predict(["good0 movie"])[0]["label"] in ("positive", "negative")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the weights: no crash, no silent wrong answer
    weights.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(folder), "x"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "model.safetensors: content does not match its checksum" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "distsent.evaluate", "--model", str(folder), "--split", "test"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "model.safetensors: content does not match its checksum" in proc.stderr
    # a folder written before model folders had a manifest still loads
    legacy = tmp_path / "legacy"
    shutil.copytree(model_dir, legacy)
    (legacy / files.MANIFEST).unlink()
    assert Predictor.load(legacy).predict(["good0 movie"])[0]["label"] in ("positive", "negative")


def test_a_step_the_fp16_scaler_skips_is_left_out_of_the_gradient_norm():
    from accelerate import Accelerator

    from distsent.metrics import TrainSums

    sums = TrainSums(Accelerator(cpu=True))
    for norm in (3.0, 0.5, float("inf"), float("nan")):  # the last two: overflowed fp16 steps, skipped
        sums.add_step(torch.tensor(norm, dtype=torch.float64), 1.0, 1.0)
    sums.add(skipped=2.0)
    row = sums.row(1.0, 10)
    assert (row["grad_norm"], row["clip_fraction"], row["skipped_steps"]) == (1.75, 0.5, 2.0)
    json.dumps(row, allow_nan=False)  # metrics.jsonl stays strict JSON
    # restored from a checkpoint between two log rows: the loss and accuracy of the steps before it carry over, but
    # the tokens do not (a resumed launch's throughput is over its own samples and seconds)
    sums.add(loss=torch.tensor(6.0), samples=4.0, correct=torch.tensor(3.0), tokens=torch.tensor(400.0))
    resumed = TrainSums(Accelerator(cpu=True))
    resumed.load_state_dict(sums.state_dict())
    resumed.add(loss=torch.tensor(2.0), samples=4.0, correct=torch.tensor(1.0), tokens=torch.tensor(200.0))
    row = resumed.row(2.0, 4)
    assert (row["train/loss"], row["train/acc"], row["throughput/tokens_per_s"]) == (1.0, 0.5, 100.0)


def test_gpu_random_state_is_this_processs_device_alone(monkeypatch):
    """A process saves its own GPU's random state, not every visible GPU's by number, and an earlier version's list
    is used only where the node has as many GPUs as when it was written; else (or from a CPU checkpoint) the GPU is
    seeded from the process's stream. torch.cuda is stood in for: there is no GPU here (test_gpu has the real one)."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: seen.update(state=int(s[0])))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda n: seen.update(seed=n))
    state = randomstate.rng_state()
    assert state["cuda"].tolist() == [7]
    randomstate.set_rng_state(state, 123)
    assert seen == {"state": 7}
    seen.clear()
    randomstate.set_rng_state({**state, "cuda": [torch.tensor([5], dtype=torch.uint8), torch.tensor([6], dtype=torch.uint8)]},
                       123)
    assert seen == {"state": 6}  # the current device's entry
    for cuda in ([torch.tensor([5], dtype=torch.uint8)] * 4, None):  # written on a 4-GPU node; on a CPU
        seen.clear()
        randomstate.set_rng_state({k: v for k, v in {**state, "cuda": cuda}.items() if v is not None}, 123)
        assert seen == {"seed": 123}


# --- metrics -----------------------------------------------------------------------------------------------------

def test_metrics_against_hand_computed_values():
    p = [0.9, 0.25, 0.62, 0.41]
    y = [1, 0, 0, 1]  # predictions 1, 0, 1, 0: one of each cell of the confusion matrix
    m = binary_score(p, y)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (1, 1, 1, 1, 4)
    assert m["acc"] == 0.5 and m["f1"] == 0.5
    assert m["roc_auc"] == pytest.approx(0.75)  # positives (0.9, 0.41) above negatives (0.25, 0.62) in 3 of 4 pairs
    # each review alone in its confidence bin (0.9, 0.75, 0.62, 0.59): ECE = mean |correct - confidence|
    assert m["ece"] == pytest.approx((0.1 + 0.25 + 0.62 + 0.59) / 4, abs=1e-6)
    assert m["loss"] == pytest.approx(-(math.log(0.9) + math.log(0.75) + math.log(0.38) + math.log(0.41)) / 4)


def test_reliability_table_adds_up_to_the_ece():
    rng = np.random.default_rng(3)
    truth = rng.random(5000)
    y = (rng.random(5000) < truth).astype(int)
    m = binary_score(1 / (1 + ((1 - truth) / truth) ** 3), y)  # overconfident on purpose: logits 3x too large
    table = m["reliability"]
    assert sum(b["n"] for b in table) == 5000
    ece = sum(b["n"] / 5000 * abs(b["accuracy"] - b["confidence"]) for b in table)
    assert ece == pytest.approx(m["ece"], abs=1e-12) and m["ece"] > 0.05
    # confident reviews (|logit| >= 17, within 3e-8 of 1) were rounded into the ECE's 1.0 bin but not the table's:
    # 50 right at 0.95 and 50 at logit 20 with 5 wrong make one bin, mean confidence 0.975, accuracy 0.95
    p = np.r_[np.full(50, 0.95), np.full(50, 1 / (1 + math.exp(-20)))]
    m = binary_score(p, np.r_[np.ones(95), np.zeros(5)].astype(int))
    assert [b["n"] for b in m["reliability"]] == [100] and m["ece"] == pytest.approx(0.025, abs=1e-8)


METRICS_RANKS = """
import json, sys, torch, torch.distributed as dist
from distsent.metrics import EvalMetrics
from distsent.resume import resume_path
dist.init_process_group("gloo")
m = EvalMetrics("cpu", ["negative", "positive"])
if dist.get_rank() == 0:  # a split of two reviews dealt to two processes by length can leave one with none
    m.update(torch.tensor([2.0, -1.0]), torch.tensor([1, 0]))
out = {k: v for k, v in m.compute().items() if k in ("n", "acc", "roc_auc", "ece")}
open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w").write(json.dumps(out))  # not stdout: the ranks' lines mix
del m
dist.destroy_process_group()  # before exit, as the trainer does: gloo's threads otherwise abort the interpreter
"""


def test_metrics_of_two_processes_when_one_has_no_reviews(tmp_path):
    """Every state is synced over gloo, typed the same on both sides (ROC-AUC's were not: gloo aborted)."""
    script = tmp_path / "ranks.py"
    script.write_text(METRICS_RANKS)
    # --standalone: torchrun takes a free port itself
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ece = ((1 - torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))) + (1 - torch.sigmoid(torch.tensor(1.0)))) / 2
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(rows) == 2 and all(r["n"] == 2 and r["acc"] == 1.0 and r["roc_auc"] == 1.0 for r in rows)
    assert all(r["ece"] == pytest.approx(float(ece), abs=1e-6) for r in rows)


def test_eval_metrics_per_head_accuracy_and_logits_not_mistaken_for_probabilities():
    m = EvalMetrics("cpu", ["negative", "positive"], ("rnn", "ngram"))
    labels = torch.tensor([1, 0, 1, 0])
    # the rnn head's logits all lie in [0, 1]: read as probabilities, rows 0, 1 and 3 would count as negative
    heads = torch.tensor([[0.3, -2.0], [0.2, -1.0], [0.9, 3.0], [0.1, 1.0]])
    m.update(heads.sum(1), labels, heads)
    out = m.compute()
    assert out["acc_rnn"] == 0.5 and out["acc_ngram"] == 0.5  # rnn calls every row positive; ngram rows 2 and 3
    assert (out["n"], out["tp"], out["fp"], out["tn"], out["fn"]) == (4, 1, 1, 1, 1)  # the summed logit


# --- precision that fits the machine ------------------------------------------------------------------------------

def test_auto_precision_picks_fp32_where_bf16_is_not_native(monkeypatch):
    from distsent import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})  # an AVX2-only processor
    assert precision.resolve("auto", "cpu")[0] == "no"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision, "cpu_supports_bf16_rnn", lambda: True)
    assert precision.resolve("auto", "cpu")[0] == "bf16"
    monkeypatch.setattr(precision, "cpu_supports_bf16_rnn", lambda: False)  # flags, but oneDNN cannot run it
    assert precision.resolve("auto", "cpu")[0] == "no"
    # a GPU: CUDA autocast would run cuDNN's LSTM in fp16 under bf16 (checked on a GPU in test_gpu), so fp16 with
    # the gradient scaler, for a GRU too
    assert precision.resolve("auto", "cuda")[0] == "fp16" and not precision.bf16_rnn_runs_on("cuda")
    assert precision.resolve("auto", "cuda", "gru")[0] == "fp16"
    from accelerate.state import PartialState

    PartialState(cpu=True)  # an earlier run in this process, on the CPU: Accelerate keeps that device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine (stood in for)
    assert precision.run_device() == "cpu"
    monkeypatch.setattr(PartialState, "_shared_state", {})  # none yet
    assert precision.run_device() == "cuda"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # launched with use_cpu (launch/cpu_1proc.yaml): its CPU decides
    assert precision.run_device() == "cpu"
    assert precision.resolve("fp16", "cuda") == ("fp16", "as configured")


def test_auto_precision_runs_a_gru_in_fp32_on_the_cpu(monkeypatch):
    """CPU autocast has no bf16 GRU (checked here: it returns fp32), so bf16 would only add casts around it."""
    from distsent import precision

    gru = torch.nn.GRU(4, 4, batch_first=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gru(torch.zeros(1, 2, 4))[0].dtype == torch.float32
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision, "cpu_supports_bf16_rnn", lambda: True)
    assert precision.resolve("auto", "cpu", "gru")[0] == "no" and precision.resolve("auto", "cpu")[0] == "bf16"
    assert precision.resolve("bf16", "cpu", "gru")[0] == "bf16"  # asked for: as configured


@pytest.mark.skipif("avx512_bf16" not in open("/proc/cpuinfo").read(), reason="this CPU has no native bf16")
def test_auto_precision_is_bf16_on_this_cpu_with_native_bf16():
    from distsent import precision

    assert precision.resolve("auto", "cpu")[0] == "bf16"


def test_every_shipped_config_chooses_its_precision_by_the_machine():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(path).train.mixed_precision == "auto", path.name


# --- early stopping, a real run ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_early_stopping_stops_after_patience_and_a_rerun_does_not_train_on(synth_imdb, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, synth_imdb, **{"train.epochs": 30, "train.eval_every": 5, "train.log_every": 7,
                                                  "train.early_stop_patience": 3, "optim.lr": 0.03})
    proc = run(direct_cmd(args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    val = [r for r in rows if "val/acc" in r]
    best = max(range(len(val)), key=lambda i: (val[i]["val/acc"], -i))  # the first best
    assert len(val) == best + 1 + 3, "stops at the third evaluation in a row without a better model"
    assert all(r["val/acc"] <= val[best]["val/acc"] for r in val[best:])
    steps = train_rows(run_dir)[-1]["step"]
    assert steps < 30 * 45 and "stopping early" in proc.stderr
    assert steps == val[-1]["step"], "the last steps before the stop get their training row"
    assert json.loads((run_dir / "best" / "meta.json").read_text())["step"] == val[best]["step"]
    assert [r for r in rows if "test/acc" in r]
    proc = run(direct_cmd(args))  # the same command again: resumes, sees the stop, does not train further
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert train_rows(run_dir)[-1]["step"] == steps


# --- one live run per run directory ------------------------------------------------------------------------------

def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, monkeypatch, caplog):
    import socket

    from distsent.runlock import RunLock, RunLockedError

    lock_file = tmp_path / "run.lock"
    host, now = socket.gethostname(), time.time()
    live = {"host": host, "pid": os.getppid(), "started": now, "slurm_job_id": "", "heartbeat": now}
    lock_file.write_text(json.dumps(live))
    with pytest.raises(RunLockedError, match=f"in use by a live run \\(host {host}, pid {os.getppid()}"):
        RunLock(tmp_path).acquire()
    assert json.loads(lock_file.read_text()) == live  # refused without touching anything
    # another container on this host, in a pid namespace of its own: its pid says nothing here, even where it is
    # this process's, so only its heartbeat can free it
    lock_file.write_text(json.dumps({**live, "pid": os.getpid(), "pid_namespace": 1}))
    with pytest.raises(RunLockedError, match="in use by a live run"):
        RunLock(tmp_path).acquire()
    # a second launch in the same Slurm allocation, on the host where the run lives or on another: refused too
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for host_held in (host, "elsewhere"):
        lock_file.write_text(json.dumps({**live, "host": host_held, "slurm_job_id": "77", "slurm_restart": 1}))
        with pytest.raises(RunLockedError, match="Slurm job 77"):
            RunLock(tmp_path).acquire()
    lock_file.write_text("")  # a launch killed as it took the lock: no owner to name, and not yet stale
    with pytest.raises(RunLockedError, match=r"run.lock names no run \(empty or unreadable, written 0 s ago"):
        RunLock(tmp_path).acquire()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead_cases = [
        ({**live, "pid": gone.pid}, "on this host is gone"),  # kill -9, then a restart on the same machine
        ({**live, "pid": os.getpid()}, "is this process's own"),  # a restart in a container given the same pid
        ({**live, "host": "elsewhere", "heartbeat": now - 120}, r"heartbeat is 12\d s old"),  # a lost node
        ({**live, "host": "elsewhere", "slurm_job_id": "77", "slurm_restart": 0}, "earlier attempt of this Slurm "
                                                                                   "job"),  # requeued: restart 1
        ({**live, "host": "elsewhere", "slurm_job_id": "77"}, "earlier attempt of this Slurm job"),  # no count kept
    ]
    for held, why in dead_cases:
        lock_file.write_text(json.dumps(held))
        lock = RunLock(tmp_path, heartbeat_s=0.05)
        with caplog.at_level("WARNING"):
            lock.acquire()
        assert re.search(why, caplog.text)
        mine = json.loads(lock_file.read_text())
        assert (mine["pid"], mine["slurm_job_id"]) == (os.getpid(), "77")
        time.sleep(0.2)
        assert json.loads(lock_file.read_text())["heartbeat"] > mine["heartbeat"]  # kept fresh
        lock.release()
        assert not lock_file.exists()


def test_two_launches_taking_over_one_dead_lock_at_once_leave_one_owner(tmp_path):
    """Two launches at the same instant find a dead run's lock: both take it over, the last write wins, and the
    other, reading it back, is refused as by any live run (it did not go on to train beside the winner)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": gone.pid,
                                                   "started": 0, "heartbeat": time.time()}))
    start = time.time() + 2.0  # both past their imports, then at once
    code = ("import sys, time\n"
            "from distsent.runlock import RunLock, RunLockedError\n"
            "lock = RunLock(sys.argv[1])\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "try:\n"
            "    lock.acquire()\n"
            "except RunLockedError as exc:\n"
            "    print('refused:', exc, flush=True)\n"
            "    sys.exit()\n"
            "print('held', flush=True)\n"
            "time.sleep(1.0)\n"
            "lock.release()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(2)]
    outs = sorted(p.communicate(timeout=30)[0] for p in procs)
    assert outs[0] == "held\n" and outs[1].startswith("refused:") and "in use by a live run" in outs[1], outs


def test_a_stalled_run_whose_lock_was_taken_over_stops_refreshing_it(tmp_path):
    """A run stopped past the lock's staleness (Slurm suspend, kill -STOP, a paused VM; here a real SIGSTOP) loses
    its directory to a new launch; once it continues, its heartbeat must see the new owner's lock and give up
    (the trainer then stops at its next step, without writing) instead of writing its own back over it."""
    from distsent.runlock import RunLock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from distsent.runlock import RunLock\n"
        "lock = RunLock(sys.argv[1], heartbeat_s=0.1, stale_s=0.5)\n"
        "lock.acquire()\n"
        "print('held', flush=True)\n"
        "while lock.lost is None:\n"
        "    time.sleep(0.05)\n"
        "print(lock.lost, flush=True)\n"
        "lock.release()\n"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(1.0)
        new = RunLock(tmp_path, heartbeat_s=0.1, stale_s=0.5)
        new.acquire()  # its heartbeat is stale: taken over
        os.kill(holder.pid, signal.SIGCONT)
        out, _ = holder.communicate(timeout=20)
        assert f"was taken over by another launch (host {new.me['host']}, pid {os.getpid()})" in out
        time.sleep(0.3)
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()  # not written back over
        new.release()
        assert not (tmp_path / "run.lock").exists()
    finally:
        holder.kill()


def test_the_run_lock_is_released_when_sharing_the_decision_fails(tmp_path, monkeypatch):
    """The main process has taken the lock, then the collective that tells the others fails (a peer lost at that
    moment: from_main is replaced by one that raises, the only stand-in here, since a peer cannot be made to die
    inside that one collective): the lock must not outlive the failed start."""
    from types import SimpleNamespace

    from distsent import build

    def peer_lost(acc, value):
        assert (tmp_path / "run.lock").exists()  # taken before the decision is shared
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(build, "from_main", peer_lost)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        build.lock_run_dir(tmp_path, SimpleNamespace(is_main_process=True))
    assert not (tmp_path / "run.lock").exists()


# --- the non-finite guard, in process ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_non_finite_gradient_stops_the_run_before_anything_is_written(synth_imdb, tmp_path, cache_env):
    """A NaN cannot be made to appear on demand in real training, so a gradient hook injects one at step 5 (the only
    stand-in here). The run must stop at its next check with the step and quantity named, write no checkpoint,
    metrics row or best/ from the poisoned weights, leave the earlier checkpoint intact and say 'failed'."""
    from distsent.metrics import NonFiniteError
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
        "checkpoint.every": 4, "train.log_every": 3, "train.eval_every": 6}))
    trainer = Trainer(cfg, stop=StopFlag([]))  # no signal handlers in the test process
    try:
        trainer.raw_model.fc.weight.register_hook(
            lambda g: g * float("nan") if trainer.state.step == 4 else g)  # the backward of step 5
        with pytest.raises(NonFiniteError, match="gradient norm at step 5"):
            trainer.fit()
    finally:
        trainer.close()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 3 and "step 5" in status["error"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000004"]
    ckpt.verify(run_dir / "checkpoints" / "step-00000004")
    assert [r["step"] for r in train_rows(run_dir)] == [3] and not (run_dir / "best").exists()


def test_a_nan_loss_in_an_earlier_micro_batch_stops_the_run_at_its_step(synth_imdb, tmp_path, cache_env):
    """With gradient accumulation, a NaN loss in a step's first micro-batch (injected: the only stand-in) stops the
    run naming that step, also when a gradient scaler owns the NaN gradients (fp16, which needs a GPU: the watch is
    set as a scaler sets it), which would only skip the step: the loss of every micro-batch is watched."""
    from distsent.metrics import NonFiniteError
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(tmp_path / "run", synth_imdb, **{
        "train.micro_batch_size": 16, "train.log_every": 4, "train.max_steps": 6}))  # 2 micro-batches per step
    trainer = Trainer(cfg, stop=StopFlag([]))
    try:
        assert trainer.layout.accum_steps == 2
        trainer.watch.watch_grads = False
        head_losses, calls = trainer.raw_model.head_losses, []

        def nan_in_step_3s_first(*args):
            calls.append(trainer.state.step)
            losses = head_losses(*args)
            return losses * float("nan") if calls.count(2) == 1 and trainer.state.step == 2 else losses

        trainer.raw_model.head_losses = nan_in_step_3s_first
        with pytest.raises(NonFiniteError, match="training loss at step 3:"):
            trainer.fit()
    finally:
        trainer.close()


def test_status_json_tells_an_error_as_the_command_line_does(synth_imdb, tmp_path, cache_env, monkeypatch, capsys):
    """An error met inside fit() (a damaged best/ found by the test pass, stood in for by a _test that raises it) is
    recorded by the trainer; status.json's error is the line distsent-train prints, its type named."""
    from distsent.files import IntegrityError
    from distsent.train import main
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"

    def damaged(self, runlog):
        raise IntegrityError(f"{run_dir / 'best' / 'model.safetensors'}: content does not match its checksum")

    monkeypatch.setattr(Trainer, "_test", damaged)
    assert main(["--config", str(REPO / "configs" / "smoke.yaml"),
                 *tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": 2})]) == 2
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("distsent-train: "))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 2 and status["error"].startswith("IntegrityError: ")
    assert line == f"distsent-train: {status['error']}"


def test_stop_reason_takes_exit_codes_from_distsent_errors_only():
    """A library's exception may carry an exit_code of its own (negative, None): such an error exits 1, named, with
    its traceback printed by the command line; distsent's errors keep theirs."""
    from distsent.metrics import NonFiniteError
    from distsent.together import INTERRUPTED, is_own, stop_reason

    class ProcessExited(RuntimeError):  # as torch.multiprocessing's, whose exit_code is the signal, negative
        exit_code = -9

    assert stop_reason(ProcessExited("rank 1 died")) == ("ProcessExited: rank 1 died", 1)
    assert not is_own(ProcessExited()) and is_own(NonFiniteError())
    assert stop_reason(NonFiniteError("non-finite loss")) == ("NonFiniteError: non-finite loss", 3)
    assert stop_reason(SystemExit(None))[1] == 1 and stop_reason(KeyboardInterrupt()) == (INTERRUPTED, 130)


@pytest.mark.parametrize("before", ["running", "finished"])
def test_a_failed_restore_under_the_python_api_is_recorded_unless_the_run_had_finished(
        synth_imdb, tmp_path, cache_env, monkeypatch, before):
    """fit() restores the checkpoint it resumes from: where that fails (stood in for by a restore that raises), a run
    whose launch died (status running, its pid gone) is recorded failed, under the Python API too; a finished run's
    record stays as it is (the relaunch never ran)."""
    from distsent import checkpoint as ckpt
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": 2}))
    with Trainer(cfg, stop=StopFlag([])) as trainer:
        trainer.fit()
    (run_dir / "status.json").write_text(json.dumps({"state": before, "step": 2, "pid": 999999}))

    def failing(self, *args):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(ckpt.CheckpointManager, "restore", failing)
    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": 4}))
    with Trainer(cfg, stop=StopFlag([])) as trainer:
        with pytest.raises(RuntimeError):
            trainer.fit()
    status = json.loads((run_dir / "status.json").read_text())
    if before == "finished":
        assert status == {"state": "finished", "step": 2, "pid": 999999}
    else:
        assert status["state"] == "failed" and status["exit_code"] == 1 and "illegal memory access" in status["error"]


def test_a_rollback_that_fails_while_settling_is_recorded_failed(synth_imdb, tmp_path, cache_env, monkeypatch):
    """A rollback of a finished run to an earlier checkpoint has begun its new line (the newer checkpoints deleted)
    before it puts best/ back; where that fails (a full disk, stood in for by an OSError from the recovery), the
    run is no longer the finished one: status.json says failed, at the step rolled back to."""
    import errno

    import distsent.resume
    from distsent.files import WriteError
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": 20, "checkpoint.every": 10})
    with Trainer(load_config(REPO / "configs" / "smoke.yaml", args), stop=StopFlag([])) as trainer:
        trainer.fit()

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(distsent.resume.files, "recover", full_disk)
    cfg = load_config(REPO / "configs" / "smoke.yaml",
                      [*args, f"checkpoint.resume={run_dir / 'checkpoints' / 'step-00000010'}"])
    with Trainer(cfg, stop=StopFlag([])) as trainer, pytest.raises(WriteError):
        trainer.fit()
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["exit_code"], status["step"]) == ("failed", 74, 10)
    assert not (run_dir / "checkpoints" / "step-00000020").exists()


def test_a_damaged_best_model_of_a_run_that_trains_on_is_written_anew(synth_imdb, tmp_path, cache_env, caplog):
    """best/ damaged between launches (a flipped byte) is found at the resume, not at the end of the training that
    follows (where every relaunch would stop at the test again): the best model so far is lost, said so, and the
    next evaluation writes best/ anew."""
    from distsent import files
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    for steps in (6, 9):
        args = tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": steps, "checkpoint.every": 3,
                                                      "train.eval_every": 3})
        with Trainer(load_config(REPO / "configs" / "smoke.yaml", args), stop=StopFlag([])) as trainer, \
                caplog.at_level("WARNING"):
            trainer.fit()
        if steps == 6:
            weights = run_dir / "best" / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 0xFF]))
    assert f"{weights}: content does not match its checksum (corrupted): the best model so far is lost" in caplog.text
    assert files.verify(run_dir / "best") and json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_under_fp16_the_scaler_owns_inf_gradients_but_a_nan_loss_still_stops_the_run():
    """fp16 (auto's choice on a GPU) has a gradient scaler, which skips steps with inf/NaN gradients: the watch
    leaves those to it, but a non-finite loss (computed in fp32 before any scaling) still stops the run. fp16 needs
    a GPU: an accelerator with a scaler is stood in for by a namespace (one process: gather is the identity)."""
    from types import SimpleNamespace

    from distsent.metrics import NonFiniteError, NonFiniteWatch

    fp16 = SimpleNamespace(scaler=object(), device=torch.device("cpu"), gather=lambda t: t)
    watch = NonFiniteWatch(fp16)
    watch.see(1, torch.tensor(0.7), torch.tensor(float("inf")))  # the scaler skips this step and lowers its scale
    watch.check()
    watch.see(2, torch.tensor(float("nan")), torch.tensor(1.0))
    with pytest.raises(NonFiniteError, match="training loss at step 2"):
        watch.check()
    fp32 = NonFiniteWatch(SimpleNamespace(scaler=None, device=torch.device("cpu"), gather=lambda t: t))
    fp32.see(3, torch.tensor(0.7), torch.tensor(float("inf")))
    with pytest.raises(NonFiniteError, match="gradient norm at step 3"):
        fp32.check()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["step 6", "step 6, unnoticed", "the test", "the step-4 checkpoint"])
def test_a_run_whose_directory_was_taken_over_stops_without_writing(synth_imdb, tmp_path, cache_env, monkeypatch,
                                                                    moment):
    """The lock's heartbeat found another launch's lock (test_a_stalled_run_whose_lock_was_taken_over_...; set here
    during step 6 or during the test-set evaluation after the last step, the only stand-in: a real takeover needs a
    minute-long stall), or the lock file was taken before any heartbeat noticed (during step 6 too, or while the
    step-4 checkpoint's files were being written): the run stops with RunLockedError, writing no checkpoint, metrics
    row, best model or status from then on (step 6 is a logging and an evaluation step; the checkpoint under way is
    not published), and leaves the new owner's lock."""
    from distsent import checkpoint
    from distsent.preemption import StopFlag
    from distsent.runlock import RunLockedError
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
        "checkpoint.every": 4, "train.log_every": 3, "train.eval_every": 6, "train.max_steps": 8}))
    trainer = Trainer(cfg, stop=StopFlag([]))
    step, evaluate = trainer.train_step, trainer.evaluate

    def take_over(heartbeat_noticed=True):
        if heartbeat_noticed:
            trainer.lock.lost = RunLockedError("taken over")
        (run_dir / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time()}))

    def taken_over_in_step_6(batch):
        step(batch)
        if trainer.state.step == 5:
            take_over(heartbeat_noticed=moment == "step 6")

    def taken_over_in_the_test(split):
        if split is trainer.data.test:
            take_over()
        return evaluate(split)

    def taken_over_in_the_checkpoint(module, weights_bytes=checkpoint._weights_bytes):
        take_over(heartbeat_noticed=False)  # the save reads the lock file itself, before sealing
        return weights_bytes(module)

    if moment.startswith("step 6"):
        trainer.train_step = taken_over_in_step_6
    elif moment == "the test":
        trainer.evaluate = taken_over_in_the_test
    else:
        monkeypatch.setattr(checkpoint, "_weights_bytes", taken_over_in_the_checkpoint)
    try:
        with pytest.raises(RunLockedError, match="taken over"):  # by another launch (host elsewhere, pid 1)
            trainer.fit()
    finally:
        trainer.close()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if moment.startswith("step 6"):
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000004"]
        assert [r["step"] for r in train_rows(run_dir)] == [3] and not (run_dir / "best").exists()
        assert max(r["step"] for r in rows) == 3  # no step-6 row, no evaluation
    elif moment == "the step-4 checkpoint":  # the partial folder is left as it is: nothing is published
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [".tmp-step-00000004"]
        assert not (run_dir / "best").exists()
        assert max(r["step"] for r in rows) == 3
    else:
        assert [r["step"] for r in rows if "val/acc" in r] == [6, 8] and not any("test/acc" in r for r in rows)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"  # the new owner's to write
    assert json.loads((run_dir / "run.lock").read_text())["host"] == "elsewhere"


@pytest.mark.parametrize("heartbeat_noticed", [True, False])
def test_a_run_taken_over_that_then_fails_leaves_the_new_owners_status(synth_imdb, tmp_path, cache_env, monkeypatch,
                                                                       capsys, heartbeat_noticed):
    """After its directory was taken over, any error that stops the run (here a best/ found damaged by the test
    evaluation, as a new owner rewriting it could leave it) is reported with its exit code, and status.json stays the
    new owner's: distsent-train records failures only in a directory that is still its own, read from the lock file
    then, whether or not the heartbeat has noticed the takeover yet."""
    from distsent.files import IntegrityError
    from distsent.runlock import RunLockedError
    from distsent.train import main
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"

    def taken_over_then_damaged(self, runlog):
        if heartbeat_noticed:
            self.lock.lost = RunLockedError("taken over")
        (run_dir / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
        (run_dir / "status.json").write_text(json.dumps({"state": "running", "host": "elsewhere"}))
        raise IntegrityError(f"{run_dir / 'best' / 'model.safetensors'}: content does not match its checksum")

    monkeypatch.setattr(Trainer, "_test", taken_over_then_damaged)
    assert main(["--config", str(REPO / "configs" / "smoke.yaml"),
                 *tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": 2})]) == 2
    assert "IntegrityError" in capsys.readouterr().err
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "running", "host": "elsewhere"}


def test_a_resume_trains_with_the_configs_learning_rate_betas_and_weight_decay(synth_imdb, tmp_path, cache_env,
                                                                              caplog):
    """Loading a checkpoint's optimizer and scheduler state brings back the values they were saved with; a resume
    with another optim.name, lr, betas or weight_decay (lowering the rate after a divergence, say) must train with the
    config's, as config.yaml then says, and say what changed, the schedule's new length included (more steps move
    a decaying schedule's end). Unchanged values resume bitwise (test_resume)."""
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    base = {"train.max_steps": 6, "checkpoint.every": 3, "optim.schedule": "linear", "optim.warmup_steps": 2,
            "optim.min_lr_ratio": 0.1, "optim.lr": 0.01, "optim.name": "adamw"}
    for extra in ({}, {"train.max_steps": 12, "optim.lr": 0.5, "optim.weight_decay": 0.3, "optim.betas": "[0.8, 0.9]",
                       "optim.name": "adam", "optim.clip_grad_norm": 0.5}):
        cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{**base, **extra}))
        trainer = Trainer(cfg, stop=StopFlag([]))
        try:
            with caplog.at_level("WARNING"):
                trainer.fit()
            groups = trainer.optimizer.optimizer.param_groups
        finally:
            trainer.close()
    assert "changed settings: optim.lr 0.01 -> 0.5, optim.betas (0.9, 0.999) -> (0.8, 0.9), " \
           "optim.weight_decay 0.0 -> 0.3, the next step's learning rate 0.001 -> 0.32 (the linear schedule over 12 " \
           "steps), optim.name 'adamw' -> 'adam', optim.clip_grad_norm 5.0 -> 0.5, train.max_steps 6 -> 12" \
           in caplog.text  # the rest read against the run's config.yaml
    # Adam, not AdamW: the flag that tells them apart travels in the checkpoint's param groups
    assert all((g["betas"], g["weight_decay"], g["decoupled_weight_decay"]) == ((0.8, 0.9), 0.3, False) for g in groups)
    total = 12  # the schedule of the resumed run: warmup 2, then linear decay over 12 steps to 0.1 x lr
    lrs = {r["step"]: r["lr"] for r in train_rows(run_dir)}
    for step in range(7, 13):  # the rate logged after step s is the one step s + 1 trains with
        assert lrs[step] == pytest.approx(0.5 * lr_factor(cfg, step, total)), step
    assert lrs[6] == pytest.approx(0.01 * lr_factor(cfg, 6, 6))
    caplog.clear()  # relaunched past its end with another rate: tested again, not resumed (no step trains)
    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
        **base, "train.max_steps": 12, "optim.lr": 0.4, "optim.weight_decay": 0.3, "optim.betas": "[0.8, 0.9]",
        "optim.name": "adam", "optim.clip_grad_norm": 0.5}))
    with Trainer(cfg, stop=StopFlag([])) as trainer, caplog.at_level("WARNING"):
        trainer.fit()
    assert "testing the ended run again at step 12 with changed settings: optim.lr 0.5 -> 0.4" in caplog.text

def test_check_refuses_a_config_the_runs_checkpoint_would_refuse(synth_imdb, tmp_path, cache_env, capsys,
                                                                  monkeypatch):
    """distsent-train --check into a run directory compares the config with the checkpoint the run would resume
    from, as the start will (a job queued with another model for an existing run said "config OK", then failed on
    its nodes); the same config, or a setting a resume may change, passes."""
    from distsent.train import main

    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "smoke.yaml"),
            *tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": 2, "checkpoint.every": 2})]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["--check", *args, "train.max_steps=4", "optim.lr=0.01"]) == 0
    assert "config OK" in (out := capsys.readouterr().out)  # and what the start would do
    assert f"(resumes from {run_dir / 'checkpoints' / 'step-00000002'}; status.json: finished)" in out, out
    import socket

    (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                  "started": time.time(), "heartbeat": time.time()}))
    assert main(["--check", *args]) == 0  # the config is fine; the launch would be refused while that run lives
    assert f"a live run holds it now (host {socket.gethostname()}, pid {os.getppid()})" in capsys.readouterr().out
    (run_dir / "run.lock").unlink()
    assert main(["--check", *args, "model.hidden_dim=24", "train.seed=5"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'checkpoints' / 'step-00000002'} was trained with a different setup" in err
    assert "model.hidden_dim: checkpoint 32, config 24" in err and "train.seed: checkpoint 0, config 5" in err, err
    assert "Use a new output_dir for the new setup." in err
    # the same checkpoint named from a new directory: that directory is already new; the advice says what a branch is
    branch = [f"output_dir={tmp_path / 'new'}", f"checkpoint.resume={run_dir / 'checkpoints' / 'step-00000002'}"]
    assert main(["--check", *args, "model.hidden_dim=24", *branch]) == 2
    err = capsys.readouterr().err
    assert "model.hidden_dim: checkpoint 32, config 24. checkpoint.resume continues another run's training with " \
           "its setup: it does not start training on other data or settings" in err, err
    # the data's classes, as read now (their order here: the labels 0 / 1 named otherwise)
    assert main(["--check", *args, "data.label_names=[positive,negative]"]) == 2
    err = capsys.readouterr().err
    assert "label_names: checkpoint ['negative', 'positive'], config ['positive', 'negative']" in err
    # an earlier version's identity (the train keys at the top, no later keys) is brought up to date, as a resume does
    state_file = run_dir / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    train = state["identity"].pop("train")
    state["identity"].update(seed=train["seed"], global_batch_size=train["global_batch_size"])
    state_file.write_text(json.dumps(state))
    assert main(["--check", *args]) == 0, capsys.readouterr().err
    # a branch from a mistyped checkpoint into a new directory
    branch = [f"output_dir={tmp_path / 'branch'}", f"checkpoint.resume={tmp_path / 'nowhere'}"]
    assert main(["--check", *args, *branch]) == 2
    assert f"{tmp_path / 'nowhere'}: no such checkpoint folder" in capsys.readouterr().err
    # another run's checkpoint into a directory that holds checkpoints of its own, which the start refuses
    assert main([*args, f"output_dir={tmp_path / 'other'}"]) == 0
    foreign = [f"output_dir={tmp_path / 'other'}", f"checkpoint.resume={state_file.parent}"]
    capsys.readouterr()
    assert main(["--check", *args, *foreign]) == 2
    assert "is another run's checkpoint, but" in capsys.readouterr().err
    # a branch (named with ~, as the start expands it too) relaunched: it continues from its own newest checkpoint
    # whose state.json reads, as the start continues from the newest that verifies
    monkeypatch.setenv("HOME", str(tmp_path))
    branch = [f"output_dir={tmp_path / 'branch'}", "checkpoint.resume=~/other/checkpoints/step-00000002"]
    assert main([*args, *branch, "train.max_steps=6"]) == 0
    (tmp_path / "branch" / "checkpoints" / "step-00000006" / "state.json").unlink()
    capsys.readouterr()
    assert main(["--check", *args, *branch, "train.max_steps=6"]) == 0, capsys.readouterr().err
    # under a launcher the process count is known: a global batch it does not divide is found too
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--check", *args, "train.global_batch_size=31"]) == 2
    assert "train.global_batch_size=31 cannot be split evenly over 2 processes" in capsys.readouterr().err


def test_time_elapsed_goes_on_across_a_resume(synth_imdb, tmp_path, cache_env):
    """time/elapsed_s counts the run's launches, each up to its last checkpoint: a dashboard's time axis does not
    start again at every requeue. The first launch here takes 3 s longer (a stand-in for a long one): the resumed
    launch's evaluations come after it on that axis."""
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    for steps in (4, 8):
        cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
            "train.max_steps": steps, "checkpoint.every": 4, "train.eval_every": 2}))
        trainer = Trainer(cfg, stop=StopFlag([]))
        if steps == 4:
            def slow_step(batch, step=trainer.train_step):
                step(batch)
                time.sleep(0.75)

            trainer.train_step = slow_step
        try:
            trainer.fit()
        finally:
            trainer.close()
    elapsed = [(r["step"], r["time/elapsed_s"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "val/acc" in r]
    assert [step for step, _ in elapsed] == [2, 4, 6, 8]
    assert 3 < elapsed[1][1] < elapsed[2][1] < elapsed[3][1], elapsed


def test_a_resume_does_not_need_the_pretrained_vectors_file(synth_imdb, tmp_path, cache_env, caplog):
    """The vectors initialise a fresh start only; a resume takes the checkpoint's weights. A vectors file moved
    since (to a node-local disk, say) neither blocks the resume nor is read again, and frozen embeddings stay
    frozen; the change of path is logged."""
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    vectors = tmp_path / "vectors.txt"
    vectors.write_text("good0 " + " ".join(["0.25"] * 32) + "\n")
    run_dir = tmp_path / "run"
    embeddings = []
    for steps, path in ((3, vectors), (6, tmp_path / "moved" / "vectors.txt")):
        cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
            "train.max_steps": steps, "checkpoint.every": 3, "model.pretrained_embeddings": path,
            "model.freeze_embeddings": "true", "optim.warmup_steps": 5}))
        trainer = Trainer(cfg, stop=StopFlag([]))
        try:
            with caplog.at_level("WARNING"):
                trainer.fit()
            embeddings.append(trainer.raw_model.embedding.weight.detach().clone())
            good = trainer.data.tokenizer.token_to_id("good0")
        finally:
            trainer.close()
    assert f"model.pretrained_embeddings '{vectors}' -> '{tmp_path / 'moved' / 'vectors.txt'}'" in caplog.text
    # the 3-step start still warns that its warmup outlasts it (the warning moved after the resume's checks, which
    # test_resume's refused relaunch covers); the 6-step resume's warmup ends
    assert caplog.text.count("optim.warmup_steps=5 is not below the run's 3 steps") == 1
    assert "run's 6" not in caplog.text
    assert torch.equal(embeddings[0], embeddings[1])  # frozen through the resume
    assert embeddings[1][good].tolist() == [0.25] * 32


def test_settle_says_which_launches_begin_a_new_wandb_run(tmp_path):
    """A branch, and a rollback carried out now, begin a new W&B run (whose history has no steps yet: a row at the
    resumed step may go there); a plain resume and a relaunch of a rollback line go on with theirs."""
    from types import SimpleNamespace

    from distsent.resume import settle

    def run_dir(name):
        root = tmp_path / name / "checkpoints"
        for step in (2, 4):
            (root / f"step-{step:08d}").mkdir(parents=True)
            (root / f"step-{step:08d}" / "state.json").write_text(json.dumps({"train_state": {"resumed_from": ""}}))
        return root

    def settled(resume, resume_from, root):
        state = SimpleNamespace(step=int(resume_from.name[5:]), resumed_from="", run_id="old", stopped_early=False,
                                best_val_acc=0.5, best_step=2, evals_since_best=0)
        return settle(SimpleNamespace(is_main_process=True, num_processes=1), state, resume, resume_from,
                      root.parent), state.run_id

    own, other = run_dir("own"), run_dir("other")
    assert settled("auto", own / "step-00000004", own) == (False, "old")
    new, rolled_id = settled(str(own / "step-00000002"), own / "step-00000002", own)  # a rollback, now
    assert new and rolled_id != "old" and not (own / "step-00000004").exists()
    assert settled(str(own / "step-00000002"), own / "step-00000002", own) == (False, rolled_id)  # relaunched
    # the line trains on; its latest named: no new W&B run; later, a rollback to step 2 again is a new line once more
    (own / "step-00000004").mkdir()
    (own / "step-00000004" / "state.json").write_text(json.dumps({"train_state": {"resumed_from": "step-00000002"}}))
    assert settled(str(own / "step-00000004"), own / "step-00000004", own) == (False, "old")
    (own / "step-00000006").mkdir()
    new, again_id = settled(str(own / "step-00000002"), own / "step-00000002", own)
    assert new and again_id not in ("old", rolled_id) and not (own / "step-00000006").exists()
    (tmp_path / "branch" / "checkpoints").mkdir(parents=True)  # a new run directory
    assert settled(str(other / "step-00000004"), other / "step-00000004", tmp_path / "branch" / "checkpoints") == (
        True, "")


def test_check_names_each_checkpoint_whose_state_cannot_be_read(tmp_path, caplog):
    """--check's choice of checkpoint (resume_path without reading weights) refuses as the start does, naming the
    checkpoints it skipped, as the start names those that do not verify."""
    from types import SimpleNamespace

    from distsent.resume import resume_path

    root = tmp_path / "checkpoints"
    (root / "step-00000002").mkdir(parents=True)
    (root / "step-00000002" / "state.json").write_text('{"identity": {}}')  # no train state
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint there verifies"):
        resume_path(SimpleNamespace(resume="auto"), root, verify_files=False)
    assert "step-00000002: its state.json cannot be read" in caplog.text


def test_a_rollback_abandons_the_newer_checkpoints_and_a_branch_is_a_run_of_its_own(synth_imdb, tmp_path, cache_env,
                                                                                    caplog):
    """checkpoint.resume naming one of the run's own older checkpoints rolls back: the newer ones are deleted (kept,
    pruning counted them as the newest and `auto` went back to them), best/ is never a model of the abandoned steps,
    and a relaunch of the same command (a requeued job) continues instead of rolling back again. Naming another
    run's checkpoint branches: a W&B run and best model of its own, and relaunches continue the branch, also once
    the origin has pruned that checkpoint; into a directory with checkpoints of its own it is refused."""
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    def fit(run_dir, crash=False, **extra):
        cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
            "train.eval_every": 3, "checkpoint.every": 3, "checkpoint.keep_last": 3, **extra}))
        caplog.clear()
        with caplog.at_level("INFO"):
            trainer = Trainer(cfg, stop=StopFlag([]))
            if crash:  # the process dies at its first step, before any checkpoint of its own
                trainer.train_step = lambda batch: sys.exit("killed")
            try:
                trainer.fit()
            finally:
                trainer.close()

    def steps(run_dir):
        return [int(p.name[5:]) for p in sorted((run_dir / "checkpoints").glob("step-*")) if p.name[5:].isdigit()]

    def run_id(run_dir):
        return json.loads((run_dir / "checkpoints" / f"step-{steps(run_dir)[-1]:08d}" / "state.json").read_text()
                          )["train_state"]["run_id"]

    first = tmp_path / "first"
    fit(first, **{"train.max_steps": 9})
    assert steps(first) == [3, 6, 9]
    first_id = run_id(first)
    own = tmp_path / "own"  # a copy, named by its own newest checkpoint: a line of its own, which a relaunch of
    shutil.copytree(first, own)  # the same command (a requeue) continues, deleting nothing
    newest = {"train.max_steps": 12, "checkpoint.resume": str(own / "checkpoints" / "step-00000009")}
    fit(own, **newest)
    fit(own, **{**newest, "train.max_steps": 15})
    assert "rolled back" not in caplog.text and steps(own) == [9, 12, 15]
    rollback = {"train.max_steps": 5, "checkpoint.every": 1,
                "checkpoint.resume": str(first / "checkpoints" / "step-00000003")}
    with pytest.raises(SystemExit):
        fit(first, crash=True, **rollback)
    assert "rolled back: deleted the newer checkpoints: step-00000009, step-00000006" in caplog.text
    assert steps(first) == [3]
    with pytest.raises(SystemExit):
        fit(first, crash=True, **rollback)  # relaunched: nothing newer left to delete, and still a new line
    # relaunched with auto (the checkpoint it finds, step 3, still names the abandoned line): the new line goes on
    fit(first, **{**rollback, "checkpoint.resume": "auto"})
    assert steps(first) == [3, 4, 5] and run_id(first) != first_id  # a new W&B run: its steps restart at 4
    assert json.loads((first / "best" / "meta.json").read_text())["step"] in (3, 5)
    rolled_id = run_id(first)
    moved = tmp_path / "moved"  # the same command again (a requeue), the run directory mounted elsewhere meanwhile
    first.rename(moved)
    fit(moved, **{**rollback, "train.max_steps": 7, "checkpoint.resume": str(moved / "checkpoints/step-00000003")})
    assert "was resumed from already: continuing from this run's latest" in caplog.text
    assert steps(moved) == [5, 6, 7] and "rolled back" not in caplog.text and run_id(moved) == rolled_id
    moved.rename(first)

    branch, origin = tmp_path / "branch", first / "checkpoints" / "step-00000006"
    with pytest.raises(SystemExit):  # a start into the branch's directory that died early, with another vocabulary
        fit(branch, crash=True, **{"data.min_freq": 200})
    fit(branch, **{"train.max_steps": 8, "checkpoint.resume": str(origin)})  # its leftovers are not the branch's
    assert steps(branch) == [8] and run_id(branch) not in (first_id, run_id(first))
    assert min(r["step"] for r in read_jsonl(branch / "metrics.jsonl")) == 7
    assert json.loads((branch / "best" / "meta.json").read_text())["step"] == 8  # its own, not the origin's
    shutil.rmtree(origin)  # pruned by the origin run meanwhile
    fit(branch, **{"train.max_steps": 9, "checkpoint.resume": str(origin)})
    assert "was resumed from already" in caplog.text and steps(branch) == [8, 9]
    assert [r["step"] for r in train_rows(branch)] == [7, 8, 9]  # each step once
    with pytest.raises(ckpt.CheckpointError, match="another run's checkpoint, but .* holds checkpoints of its own"):
        fit(branch, **{"checkpoint.resume": str(first / "checkpoints" / "step-00000007")})

    # auto, the newest checkpoint damaged: resumed from the one before it, the damaged one set aside (not deleted,
    # and no longer counted among the newest by pruning); every checkpoint damaged: refused, not a fresh start
    weights = branch / "checkpoints" / "step-00000009" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    (branch / "checkpoints" / "step-00000009.broken").mkdir()  # set aside once before: the name is taken
    (branch / "checkpoints" / "step-00000009.broken" / "x").touch()
    fit(branch, **{"train.max_steps": 10, "checkpoint.keep_last": 1})
    assert "set aside the newer checkpoints, which did not verify, as <name>.broken: step-00000009" in caplog.text
    assert steps(branch) == [10] and (branch / "checkpoints" / "step-00000009.broken-2" / "manifest.json").is_file()
    (branch / "checkpoints" / "step-00000010" / "manifest.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint there verifies"):
        fit(branch, **{"train.max_steps": 11})


def test_a_resume_refuses_a_changed_vocabulary_setting(synth_imdb, tmp_path, cache_env, capsys):
    """A resumed run keeps its tokenizer.json: data.min_freq or data.lowercase changed on a relaunch had no effect
    yet went into config.yaml as if it had, so the run's own config no longer reproduced it. The checkpoint records
    them (not config.yaml, which a user or an earlier version may have rewritten)."""
    from distsent.preemption import StopFlag
    from distsent.records import DataError
    from distsent.train import main as train_main
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"

    def fit(**extra):
        cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
            "train.max_steps": 3, "checkpoint.every": 3, **extra}))
        trainer = Trainer(cfg, stop=StopFlag([]))
        try:
            trainer.fit()
        finally:
            trainer.close()

    fit()
    (run_dir / "config.yaml").unlink()  # the check does not depend on it
    with pytest.raises(ckpt.CheckpointError, match="cannot be resumed with this config: data.min_freq: checkpoint 1, "
                                                   "config 4"):
        fit(**{"data.min_freq": 4, "train.max_steps": 5})
    with pytest.raises(DataError, match=r"tokenizer.json: its rules \(lowercase, strip_html, symbols\) = \(True, "
                                        r"True, False\) differ from the config's data.lowercase=False"):  # the saved
        fit(**{"data.lowercase": "false", "train.max_steps": 5})  # tokenizer says
    with pytest.raises(DataError, match="differ from the config's data.lowercase=True, data.strip_html=True, "
                                        "data.symbols=True"):
        fit(**{"data.symbols": "true", "train.max_steps": 5})
    args = ["--check", "--config", str(REPO / "configs" / "smoke.yaml"), *tiny_overrides(run_dir, synth_imdb),
            "data.min_freq=4"]
    assert train_main(args) == 2 and "data.min_freq: checkpoint 1, config 4" in capsys.readouterr().err
    fit(**{"train.max_steps": 5})  # unchanged: it resumes
    assert json.loads((run_dir / "status.json").read_text())["step"] == 5


def test_a_second_run_in_one_process_starts_from_the_process_as_it_was(synth_imdb, tmp_path, cache_env):
    """A notebook's runs: the first left its threads, denormal flushing and deterministic algorithms set, and
    Accelerate's mixed precision fixed (a second run with another precision: "AcceleratorState has already been
    initialized"). close() puts each back."""
    from distsent.preemption import StopFlag
    from distsent.torchsettings import process_settings
    from distsent.trainer import Trainer

    def fit(run_dir, **extra):
        cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
            "train.max_steps": 2, **extra}))
        trainer = Trainer(cfg, stop=StopFlag([]))
        try:
            trainer.fit()
        finally:
            trainer.close()

    import torch
    from accelerate.state import AcceleratorState

    torch.use_deterministic_algorithms(False)  # the notebook's own state, which the first run changes
    AcceleratorState._reset_state()  # a notebook that has set up no Accelerator yet (earlier tests here did)
    before = process_settings()
    if before["threads"] == 1:
        pytest.skip("one thread here: train.threads=1 would change nothing")
    fit(tmp_path / "a", **{"train.threads": 1, "train.deterministic": "true", "train.flush_denormal": "true"})
    assert process_settings() == before
    fit(tmp_path / "b", **{"train.mixed_precision": "bf16"})  # another precision in the same process
    assert json.loads((tmp_path / "b" / "status.json").read_text())["state"] == "finished"
    # a start refused after the Accelerator exists (fp16 on a CPU) puts them back too
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        fit(tmp_path / "c", **{"train.deterministic": "true", "train.mixed_precision": "fp16"})
    assert process_settings() == before
    fit(tmp_path / "d", **{"train.mixed_precision": "no"})
    assert json.loads((tmp_path / "d" / "status.json").read_text())["state"] == "finished"
    # a run that fails beside one still alive leaves that one's Accelerate state alone
    alive = Trainer(load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(tmp_path / "e", synth_imdb, **{
        "train.max_steps": 2, "train.mixed_precision": "no"})), stop=StopFlag([]))
    try:
        with pytest.raises(ValueError, match="AcceleratorState has already been initialized"):  # Accelerate's
            fit(tmp_path / "f", **{"train.mixed_precision": "fp16"})
        alive.fit()
    finally:
        alive.close()
    assert json.loads((tmp_path / "e" / "status.json").read_text())["state"] == "finished"


def test_logged_throughput_leaves_out_the_time_spent_evaluating(synth_imdb, tmp_path, cache_env, monkeypatch):
    """A row after an evaluation counted the evaluation's time as training (the epoch rows never did): with each
    evaluation made to last 1000 s more on the trainer's clock, every row's rate stays that of its steps. The last
    step has a row too (train.log_every does not divide 6)."""
    import types

    from distsent import trainer as trainer_module
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    extra = [0.0]  # seconds added to the trainer's clock by the evaluations so far
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + extra[0])
    monkeypatch.setattr(trainer_module, "time", clock)
    evaluate = Trainer.evaluate

    def slow_evaluate(self, *args, **kwargs):
        extra[0] += 1000.0
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)
    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(
        run_dir, synth_imdb, **{"train.max_steps": 6, "train.eval_every": 2, "train.log_every": 4}))
    trainer = Trainer(cfg, stop=StopFlag([]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "throughput/samples_per_s" in r]
    assert [r["step"] for r in rows] == [4, 6] and extra[0] >= 3000
    assert all(r["throughput/samples_per_s"] > 2 * 32 / 100 for r in rows), rows  # not 64-128 samples per 1000 s


# --- moving average of the weights, a real run -------------------------------------------------------------------

def test_moving_average_of_the_weights_is_kept_saved_and_evaluated(synth_imdb, tmp_path, cache_env):
    """train.ema_decay=d: after step t the average is e_t = d_t e_(t-1) + (1 - d_t) w_t (e_1 = w_1), the decay warmed
    up as d_t = min(d, t / (t + 9)), recomputed here from the raw weights of each step's checkpoint; the checkpoint
    holds it, and best/ (evaluated at the last step) is it."""
    from safetensors.torch import load_file

    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir, d = tmp_path / "run", 0.3
    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
        "train.ema_decay": d, "train.max_steps": 4, "checkpoint.every": 1, "checkpoint.keep_last": 4}))
    trainer = Trainer(cfg, stop=StopFlag([]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    steps = [run_dir / "checkpoints" / f"step-{s:08d}" for s in (1, 2, 3, 4)]
    raw = [load_file(p / "model.safetensors") for p in steps]
    expected = dict(raw[0])
    for t, w in enumerate(raw[1:], 2):
        d_t = min(d, t / (t + 9))  # 0.18, 0.25, then d (0.3)
        expected = {k: d_t * expected[k] + (1 - d_t) * w[k] for k in w}
    saved = load_file(steps[-1] / ckpt.EMA_FILE)
    assert int(saved.pop("n_averaged")) == 4
    assert {k.removeprefix("module."): v for k, v in saved.items()}.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.allclose(saved[f"module.{k}"], v, atol=1e-6), k
        assert not torch.equal(v, raw[-1][k]) or k.startswith("ngrams"), f"{k}: the average is the last weights"
    best = load_file(run_dir / "best" / "model.safetensors")
    assert all(torch.equal(best[k], saved[f"module.{k}"]) for k in expected)


def test_a_binary_ensemble_trains_evaluates_and_predicts(synth_imdb, tmp_path, cache_env):
    """model.members=2 on two classes (the 4-class case runs in test_multiclass): each member's accuracy is logged
    beside the ensemble's, and the exported folder predicts the mean of the members' probabilities."""
    from distsent.predict import Predictor
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
        "model.members": 2, "train.max_steps": 30, "train.eval_every": 30}))
    trainer = Trainer(cfg, stop=StopFlag([]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/acc" in r][-1]
    assert {"val/acc_rnn0", "val/acc_rnn1", "val/roc_auc"} <= val.keys()
    predictor = Predictor.load(run_dir / "best")
    texts = ["a wonderful film", "dull and far too long", "the plot"]
    probs = predictor.probabilities(texts)[0]
    alone = [Predictor(m, predictor.tokenizer, predictor.cfg, predictor.label_names).probabilities(texts)[0]
             for m in predictor.model.members]
    assert not np.allclose(alone[0], alone[1]) and np.allclose(probs, (alone[0] + alone[1]) / 2, atol=1e-6)


@pytest.mark.slow
def test_a_checkpoint_of_an_earlier_version_saved_at_an_epochs_last_step_gets_its_evaluation(synth_imdb, tmp_path,
                                                                                               cache_env):
    """Earlier versions saved a periodic checkpoint at an epoch's last step before that epoch's evaluation (data
    position: the epoch's batches all done). Made here from a checkpoint of this version by rewriting its train state
    (and dropping the evaluation it had logged); the resume must evaluate that epoch, then train the next."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, synth_imdb, **{"checkpoint.every": 45, "checkpoint.keep_last": 3})
    proc = run(direct_cmd(args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = [(r["step"], r["val/acc"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "val/acc" in r]
    assert [s for s, _ in ref] == [45, 90]
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step-00000090")
    state = json.loads((ckpts / "step-00000045" / "state.json").read_text())
    assert state["train_state"]["epoch"] == 1 and state["train_state"]["batch_in_epoch"] == 0
    state["train_state"].update(epoch=0, batch_in_epoch=45, best_val_acc=-1.0, best_step=-1)
    (ckpts / "step-00000045" / "state.json").write_text(json.dumps(state))
    files.seal(ckpts / "step-00000045", step=45)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] <= 45 and "val/acc" not in r]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(run_dir / "best")

    proc = run(direct_cmd(args))
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert [(r["step"], r["val/acc"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "val/acc" in r] == ref
    assert train_rows(run_dir)[-1]["step"] == 90


def test_a_ctrl_c_while_the_run_shuts_down_ends_it_without_a_traceback(monkeypatch, tmp_path, capsys):
    """A second Ctrl-C in the second or so between the checkpoint of a stop and the end of the process (the run lock
    released, the process group destroyed) ends it with exit 130 and one line. The timing cannot be hit reliably in
    a real run, so the trainer here is a stand-in: its fit stops as a preempted run does, its close is interrupted."""
    import distsent.trainer
    from distsent.train import main

    class Interrupted:
        def __init__(self, cfg, stop=None):
            pass

        def fit(self):
            raise distsent.preemption.Preempted()

        def close(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(distsent.trainer, "Trainer", Interrupted)
    assert main(["--config", str(REPO / "configs" / "smoke.yaml"), f"output_dir={tmp_path / 'run'}"]) == 130
    assert capsys.readouterr().err.strip().endswith("distsent-train: interrupted (Ctrl-C)")


@pytest.mark.parametrize("program", ["train", "predict", "evaluate"])
def test_programs_leave_the_final_garbage_collection_out_at_exit(program):
    """Each program freezes what is left at exit, so that the interpreter's last collections skip torch's objects
    (about a second per process); an exit handler registered before the program started runs after that."""
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen' if gc.get_freeze_count() else 'not frozen'))\n"
            f"from distsent.{program} import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('exiting', gc.get_freeze_count())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["exiting 0", "frozen"], proc.stdout[-500:]


def test_status_shows_the_step_of_the_last_checkpoint_while_running(synth_imdb, tmp_path, cache_env):
    """status.json says running from the start and, after each checkpoint, at which step: a scheduler or a person
    reading it mid-run sees how far the run got (it said step 0 until the end)."""
    from distsent.preemption import StopFlag
    from distsent.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(run_dir, synth_imdb, **{
        "checkpoint.every": 3, "train.max_steps": 7}))
    seen = []
    with Trainer(cfg, stop=StopFlag([])) as trainer:
        step = trainer.train_step

        def watched(batch):
            status = json.loads((run_dir / "status.json").read_text())
            seen.append((status["state"], status["step"]))
            step(batch)

        trainer.train_step = watched
        trainer.fit()
    assert seen == [("running", 0)] * 3 + [("running", 3)] * 3 + [("running", 6)]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"

