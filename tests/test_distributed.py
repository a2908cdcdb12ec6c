"""Real multi-process runs through `accelerate launch` (DDP over gloo on CPU), and a short run on real IMDB."""

import json
import re
import subprocess
import sys

import pytest

from conftest import (REAL_IMDB, REPO, direct_cmd, free_port, launch_cmd, read_jsonl, run, run_env, tiny_overrides,
                      train_rows)

pytestmark = pytest.mark.slow


def test_two_process_run_trains_and_agrees(tmp_path, synth_imdb, cache_env):
    run_dir = tmp_path / "run"
    proc = run(launch_cmd(2, tiny_overrides(run_dir, synth_imdb, **{"train.debug_records": "true"})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr and "global batch 32 = 2 x 16 x 1" in proc.stderr
    # stderr is a file here, as under sbatch: the progress bar is drawn at start and end (and every 30 s), not at
    # each of the 90 log rows
    assert len(re.findall(r"\d+/90 \[", proc.stderr)) <= 3, proc.stderr[-3000:]
    assert "broadcast_buffers" not in proc.stderr, proc.stderr[-3000:]  # a warning no user can act on (see build.py)

    digests = [read_jsonl(run_dir / "debug" / f"weights-rank{r}.jsonl")[-1]["sha256"] for r in (0, 1)]
    assert digests[0] == digests[1], "DDP ranks ended with different parameters"

    rows = read_jsonl(run_dir / "metrics.jsonl")
    val = [r for r in rows if "val/acc" in r]
    assert len(val) == 2 and val[-1]["val/acc"] > 0.8 and val[-1]["val/n"] == 160  # every review counted once
    test = [r for r in rows if "test/acc" in r]
    assert test and test[0]["test/n"] == 400 and test[0]["test/acc"] > 0.75
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, len(train_steps) + 1))
    # which reviews each process scored: the 2-process test pass must give what one process gives on the whole
    # test split with the same model (a process scoring another's share keeps the count right but not the loss)
    proc = subprocess.run([sys.executable, "-m", "distsent.evaluate", "--model", str(run_dir / "best"), "--split",
                           "test"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads(proc.stdout.splitlines()[0])
    assert alone["n"] == 400 and (alone["tp"], alone["fp"], alone["tn"], alone["fn"]) == tuple(
        test[0][f"test/{k}"] for k in ("tp", "fp", "tn", "fn"))
    assert test[0]["test/loss"] == pytest.approx(alone["loss"], abs=1e-5)
    assert test[0]["test/roc_auc"] == pytest.approx(alone["roc_auc"], abs=1e-5)
    for name in ("config.yaml", "tokenizer.json", "status.json", "best/model.safetensors", "best/tokenizer.json",
                 "best/config.yaml"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"

    # the two ranks trained on disjoint halves that together cover each epoch
    seen = [read_jsonl(run_dir / "debug" / f"samples-rank{r}.jsonl") for r in (0, 1)]
    for epoch in (0, 1):
        ids = [[i for row in rank if row["epoch"] == epoch for i in row["ids"]] for rank in seen]
        assert not set(ids[0]) & set(ids[1])
        assert len(ids[0]) + len(ids[1]) == 1440 and len(set(ids[0]) | set(ids[1])) == 1440


def test_best_recipe_trains_in_two_processes_and_predicts(tmp_path, synth_imdb, synth_splits, cache_env):
    """configs/imdb_best.yaml, shrunk: bidirectional LSTM + max pooling + the n-gram head, through DDP and back."""
    from safetensors import safe_open

    import numpy as np
    import torch

    from distsent.tokenizer import encode
    from distsent.predict import Predictor

    run_dir = tmp_path / "best-recipe"
    overrides = tiny_overrides(run_dir, synth_imdb, **{"model.ngram_buckets": 4096,
                                                        "model.hidden_dim": 16, "train.eval_every": 0,
                                                        "optim.warmup_steps": 0})
    proc = run(launch_cmd(2, overrides, config="configs/imdb_best.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    test = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "test/acc" in r][0]
    assert test["test/n"] == 400 and test["test/acc"] > 0.75 and test["test/samples_per_s"] > 0
    # each head's logged accuracy is what that head of the exported model scores on the test reviews
    predictor = Predictor.load(run_dir / "best")
    texts, labels = synth_splits["test"]
    split = encode(predictor.tokenizer, texts, predictor.cfg.data.max_len, predictor.cfg.data.truncate)
    with torch.no_grad():
        heads = predictor.model(*map(torch.from_numpy, split.batch(np.arange(len(texts)))), heads=True)
    right = ((heads > 0) == torch.tensor(labels).bool().unsqueeze(1)).float().mean(0).tolist()
    # (one review of slack: here all 400 are padded to one batch, in the run each process sorted its own)
    assert [test["test/acc_rnn"], test["test/acc_ngram"]] == pytest.approx(right, abs=1 / 400 + 1e-9)
    # distsent-evaluate reports the same metrics, each head's accuracy included
    scored = run([sys.executable, "-m", "distsent.evaluate", "--model", str(run_dir / "best"), "--split", "test"])
    assert scored.returncode == 0, scored.stderr[-3000:]
    evaluated = json.loads(scored.stdout)
    for key in ("acc", "acc_rnn", "acc_ngram", "macro_f1", "roc_auc"):
        assert evaluated[key] == pytest.approx(test[f"test/{key}"], abs=1e-6), key
    with safe_open(str(run_dir / "best" / "model.safetensors"), "pt") as f:
        ratio = f.get_tensor("ngrams.ratio")  # the naive-Bayes ratios travel with the model
        assert ratio.shape[0] > 4096 and ratio.abs().max() > 0
    out = Predictor.load(run_dir / "best").predict(["good0 good1 good2", "bad0 bad1 bad2"])
    assert [r["label"] for r in out] == ["positive", "negative"]


STALLED_PEER = """
import sys, time, torch, torch.distributed as dist
from datetime import timedelta
from distsent import together
dist.init_process_group("gloo", timeout=timedelta(seconds=120))
together.set_group_timeout(2)  # dist.timeout_s=2
get_backend, dist.get_backend = dist.get_backend, lambda group=None: "nccl"  # as on GPUs: a gloo group of its own
group = together.cpu_group()
dist.get_backend = get_backend
assert group is not dist.group.WORLD
if dist.get_rank() == 1:
    time.sleep(60)  # a peer that hangs
t0 = time.monotonic()
try:
    dist.all_reduce(torch.zeros(1), group=group)
except RuntimeError:
    print(f"gave up after {time.monotonic() - t0:.0f} s", flush=True)
"""


def test_the_agreements_own_group_waits_dist_timeout_s_for_a_stalled_peer(tmp_path):
    """On GPUs the stop agreements run on a gloo group of their own (the world group is NCCL's); it must give up after
    dist.timeout_s like the world group, not after PyTorch's default 30 minutes. Stood in for on CPUs by reporting
    the gloo world group as NCCL's."""
    script = tmp_path / "stalled.py"
    script.write_text(STALLED_PEER)
    env = run_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"})
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=45)
    finally:
        procs[1].kill()
    assert re.fullmatch(r"gave up after [0-9] s\n", out), err[-2000:]


def test_bad_config_fails_before_training(tmp_path, synth_imdb, cache_env):
    proc = run(direct_cmd([*tiny_overrides(tmp_path / "r", synth_imdb), "model.hiden_dim=3"]))
    assert proc.returncode == 2 and "model.hiden_dim: unknown key" in proc.stderr
    assert not (tmp_path / "r").exists()
    # two processes: the error once (the launcher's summary names it for each process from its error file)
    proc = run(launch_cmd(2, [*tiny_overrides(tmp_path / "r", synth_imdb), "model.hiden_dim=3"]))
    assert proc.returncode == 1 and proc.stderr.count("distsent-train: config error:") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("traceback : config error: the override model.hiden_dim=3") == 2


def test_a_random_state_only_one_process_cannot_read_stops_both_with_one_line_each(tmp_path, synth_imdb, cache_env):
    """Each process restores its own random state: process 1's unreadable (its file replaced and the manifest
    sealed again, so that the checkpoint verifies) stops it with its error and process 0 with one line pointing at
    it, not with a gloo error out of the next collective. A manifest without a process's random state is refused."""
    import torch

    from distsent import checkpoint as ckpt
    from distsent import files

    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": 6, "checkpoint.every": 3})
    assert run(launch_cmd(2, args)).returncode == 0
    latest = ckpt.find_latest(run_dir / "checkpoints")
    # the main process writes both files, from states sent to it: each process's own (their streams differ)
    states = [torch.load(latest / ckpt.rng_file(rank), weights_only=True)["torch"] for rank in (0, 1)]
    assert not torch.equal(*states)
    (latest / "rng-rank00001.pt").write_bytes(b"not a torch file")
    manifest = json.loads((latest / files.MANIFEST).read_text())
    files.seal(latest, **{k: v for k, v in manifest.items() if k != "files"})
    proc = run(launch_cmd(2, args))  # a relaunch after the end restores the checkpoint, then tests again
    assert proc.returncode == 1 and "distsent-train: PeerFailed: process 1 could not restore" in proc.stderr, \
        proc.stderr[-3000:]
    assert "distsent-train: CheckpointError: " in proc.stderr and "rng-rank00001.pt: not a random state" in proc.stderr
    # both exit 2, a clear error, and no traceback of the unpickler or of gloo
    assert proc.stderr.count("exitcode  : 2") == 2
    assert proc.stderr.count("Traceback (most recent call last)") == 1  # the launcher's own (ChildFailedError)
    assert "Connection" not in proc.stderr and "gloo" not in proc.stderr.lower()
    (latest / "rng-rank00001.pt").unlink()
    files.seal(latest, **{k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(ckpt.CheckpointError, match="the manifest lists no rng-rank00001.pt"):
        ckpt.verify(latest)


def test_bf16_on_cpu_trains(tmp_path, synth_imdb, cache_env):
    run_dir = tmp_path / "bf16"
    proc = run(direct_cmd(tiny_overrides(run_dir, synth_imdb, **{"train.mixed_precision": "bf16", "train.epochs": 1})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision bf16" in proc.stderr
    assert [r for r in read_jsonl(run_dir / "metrics.jsonl") if "test/acc" in r]


def test_a_fresh_start_builds_its_vocabulary_from_its_data(tmp_path, synth_imdb, cache_env):
    """A tokenizer.json left in the run directory by a start that failed before its first checkpoint (on other data,
    say) is not reused: only a resume keeps the run's vocabulary."""
    from distsent.config import DataConfig
    from distsent.tokenizer import load_tokenizer, train_tokenizer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stray = train_tokenizer(["zebra"] * 3, DataConfig(min_freq=1, strip_html=True))  # the same rules as the run's
    (run_dir / "tokenizer.json").write_text(stray.to_str())
    proc = run(direct_cmd(tiny_overrides(run_dir, synth_imdb, **{"train.max_steps": 2})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    vocab = load_tokenizer(run_dir / "tokenizer.json").get_vocab()
    assert "zebra" not in vocab and len(vocab) > 100


def test_a_second_launch_into_a_live_run_directory_is_refused(tmp_path, synth_imdb, cache_env):
    """Two launches into one run directory (a second sbatch with the same output_dir=): the second stops before
    writing anything, naming the owner, on all its processes; the first runs on undisturbed."""
    from test_resume import start, wait_for_step

    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, synth_imdb, **{"train.epochs": 4})
    first = start(1, args, launcher=False)
    wait_for_step(run_dir, 5, first)
    owner = json.loads((run_dir / "run.lock").read_text())
    second = run(launch_cmd(2, args))
    assert second.returncode != 0 and "is in use by a live run" in second.stderr, second.stderr[-3000:]
    assert f"pid {owner['pid']}" in second.stderr
    # a launch stopped by its config before it could take the lock (fp16 on a CPU) leaves the live run's status
    third = run(direct_cmd(args + ["train.mixed_precision=fp16"]))
    assert third.returncode == 2 and "fp16 needs a GPU" in third.stderr, third.stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["pid"]) == ("running", owner["pid"])
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    steps = [r["step"] for r in train_rows(run_dir)]
    assert steps == list(range(1, 181))  # one writer: every step once
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert not (run_dir / "run.lock").exists()  # released when the run ended
    # with no live owner, the same refused launch is recorded for a scheduler to read (slurm/train.sbatch), but not
    # over a finished run's status
    assert run(direct_cmd(args + ["train.mixed_precision=fp16"])).returncode == 2
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    (run_dir / "status.json").write_text(json.dumps({"state": "preempted", "exit_code": 75}))
    assert run(direct_cmd(args + ["train.mixed_precision=fp16"])).returncode == 2
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


def test_bad_data_stops_every_process_with_one_clear_line(tmp_path, cache_env):
    """The main process prepares the data first; when it cannot, the others stop with it and say where the cause
    is, instead of failing out of a collective with a gloo traceback."""
    from conftest import make_reviews, write_parquet

    texts, labels = make_reviews(40, 4)
    labels[17] = 3  # a class the training data never shows
    data = write_parquet(tmp_path / "data", {"train": make_reviews(200, 3), "test": (texts, labels)})
    proc = run(launch_cmd(2, tiny_overrides(tmp_path / "run", data)))
    assert proc.returncode != 0
    cause = "test.parquet: row 17 has label 3, which is not one of the classes"
    assert proc.stderr.count(f"distsent-train: DataError: {data / cause}") == 1, proc.stderr[-3000:]
    assert "process 0 could not prepare the data (it prints its error)" in proc.stderr
    # the launcher's summary names the cause too, as the root cause: the failing process ended first
    root = proc.stderr.split("Root Cause")[1]
    assert "exitcode  : 2" in root and f"traceback : DataError: {data / cause}" in root
    # recorded for schedulers too (slurm/train.sbatch exits with it), though the trainer never started
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 2 and cause in status["error"]
    assert not (tmp_path / "run" / "run.lock").exists()  # a start that failed leaves the directory free
    assert "Connection closed by peer" not in proc.stderr and "gloo" not in proc.stderr.lower()


def test_auto_precision_says_what_it_chose(tmp_path, synth_imdb, cache_env):
    from distsent.precision import resolve

    run_dir = tmp_path / "auto"
    # train.deterministic rides along: its settings must not break a CPU run
    proc = run(direct_cmd(tiny_overrides(run_dir, synth_imdb, **{"train.mixed_precision": "auto", "train.epochs": 1,
                                                                 "train.deterministic": "true"})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen, why = resolve("auto", "cpu")
    assert f"mixed precision auto -> {chosen}: {why}" in proc.stderr
    assert f"mixed precision {chosen}" in proc.stderr  # the start-up line shows what Accelerate runs


@pytest.mark.skipif(not REAL_IMDB.is_dir(), reason="the local IMDB copy (../shared/data/imdb) is not here")
def test_real_imdb_short_run_then_predict(tmp_path, cache_env):
    run_dir = tmp_path / "real"
    # the data named as the README's first command names a local copy
    proc = run(launch_cmd(2, [f"output_dir={run_dir}", "data.limit=3000", "data.test_limit=1000", "train.epochs=2",
                              "data.truncate=tail"]), timeout=600, env={"DISTSENT_DATA_PATH": str(REAL_IMDB)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    test = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "test/acc" in r][0]
    assert test["test/n"] == 1000
    # the model folder names its data: evaluated from elsewhere, without the variable, it reads the same test split
    env = {k: v for k, v in run_env().items() if k != "DISTSENT_DATA_PATH"}
    again = subprocess.run([sys.executable, "-m", "distsent.evaluate", "--model", str(run_dir / "best"), "--split",
                            "test"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.splitlines()[0])["n"] == 1000
    out = subprocess.run([sys.executable, "-m", "distsent.predict", "--model", str(run_dir / "best"),
                          "An absolute masterpiece, I loved every minute of it.",
                          "Dreadful. The worst film I have seen in years, a total waste of time.",
                          "It was fine, nothing special."], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 3 and all(r["label"] in ("positive", "negative") and 0.5 <= r["probability"] <= 1
                                   for r in lines)


def test_two_machines_with_caches_of_their_own_prepare_the_data_once_each(tmp_path, synth_imdb):
    """Two launchers on this host as two machines (`accelerate launch --num_machines 2`, two processes each), each
    with its own $DISTSENT_CACHE, as with the cache on each node's local disk: on the second machine one process
    prepares the data and says so, and its other process reads what that one wrote (not both at once, each with
    the memory it takes); both caches end with the same entry, and the four processes train."""
    run_dir, port = tmp_path / "run", free_port()
    args = tiny_overrides(run_dir, synth_imdb, **{"train.epochs": 1})
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/cpu_2proc.yaml"),
               "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "4", "--main_process_ip",
               "127.0.0.1", "--main_process_port", str(port), "-m", "distsent.train", "--config",
               str(REPO / "configs/smoke.yaml"), *args]
        env = run_env({"DISTSENT_CACHE": str(tmp_path / f"cache{rank}")})
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    err = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], err[0][-3000:] + err[1][-3000:]
    assert "4 process(es) on 2 machine(s)" in err[0]
    said = f"no token cache for it under {tmp_path / 'cache1'}"
    assert err[0].count("no token cache for it") == 0 and err[1].count(said) == 1, err[1][-3000:]
    entries = [sorted(str(p.relative_to(tmp_path / f"cache{r}")) for p in (tmp_path / f"cache{r}").rglob("*.npy"))
               for r in (0, 1)]
    assert entries[0] and entries[0] == entries[1]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
