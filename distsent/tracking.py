"""Run records: metrics.jsonl, status.json, the launch topology and Accelerate's trackers (W&B with its media,
TensorBoard, ...) on the main process; per-process debug records.

A tracker that fails mid-run, or cannot start for a passing reason (the network), is dropped with a warning: logging
never stops training. A W&B start that wandb refuses for its setup (online with no API key, a malformed key) stops the
run at its start, before a step is trained, rather than leaving a long run with no dashboard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from .files import WriteError, atomic_write, writing
from .preemption import EXIT_PREEMPTED

log = logging.getLogger(__name__)


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the JSON lines logged at or before `step` (a resumed run redoes what came after), less any test
    results (a resumed run tests again at its end, also when it had finished)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill: dropped
            row = json.loads(line)
            if row.get("step", 0) <= step and not any(key.startswith("test/") for key in row):
                kept.append(line)
    atomic_write(path, "".join(k + "\n" for k in kept))


def software_versions() -> dict:
    """Library versions and the project's git commit (with a -dirty mark), for the run's config."""
    import importlib.metadata as md
    import subprocess

    out = {}
    for pkg in ("distsent", "torch", "accelerate", "datasets", "tokenizers", "torchmetrics", "wandb", "safetensors",
                "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["git_commit"] = (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def status_state(run_dir: Path) -> str | None:
    """The state in a run directory's status.json, if it has a readable one."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((run_dir / "status.json").read_text()).get("state")
    return None


def write_status(run_dir: Path, **fields) -> None:
    """status.json tells schedulers and people how the run ended: running, preempted, finished or failed.

    On a full disk the atomic write (a new file) can fail where rewriting the existing small file in place still
    fits in its own blocks: tried second, so that a run stopped by a full disk can still say so."""
    path, text = run_dir / "status.json", json.dumps({**fields, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1)
    try:
        atomic_write(path, text)
    except WriteError:
        if not path.is_file():
            raise
        with writing(path), open(path, "r+") as f:
            f.write(text)
            f.truncate()


def launch_topology(accelerator, layout, start_step: int, resumed_from: str = "") -> dict:
    """How the run was launched (processes, machines, batch layout, threads, software, Slurm job, the data and cache
    places given by the environment, the step it starts from, and the checkpoint.resume its line started from: a
    rollback's or a branch's W&B run beside the one it left), logged with the config so that a dashboard shows what
    produced each curve."""
    import torch

    topo = {"num_processes": accelerator.num_processes, "num_machines": num_machines(),
            "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
            "micro_batch": layout.micro_batch, "accum_steps": layout.accum_steps,
            "threads_per_process": torch.get_num_threads(), "python": sys.version.split()[0], **software_versions(),
            "start_step": start_step, "resumed_from": resumed_from}
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT",
                "DISTSENT_DATA_PATH", "DISTSENT_CACHE"):
        if var in os.environ:
            topo[var.lower()] = os.environ[var]
    return topo


def local_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def num_machines() -> int:
    return max(1, int(os.environ.get("WORLD_SIZE", "1")) // local_processes())


def example_predictions(model, split, tokenizer, accelerator, n: int = 16) -> list[tuple[str, int, list[float]]]:
    """(text as the model reads it, true class, class probabilities) for n reviews spread evenly over a split (a
    file sorted by label would otherwise show one class only)."""
    import numpy as np
    import torch

    idx = np.unique(np.linspace(0, len(split) - 1, num=min(n, len(split))).round().astype(np.int64))
    ids, lengths = (torch.from_numpy(a).to(accelerator.device) for a in split.batch(idx))
    was_training = model.training
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        probs = model.probabilities(model(ids, lengths).float()).tolist()
    model.train(was_training)
    return [(tokenizer.decode(split.tokens[split.offsets[i]: split.offsets[i + 1]].tolist(), skip_special_tokens=False),
             int(split.labels[i]), p) for i, p in zip(idx, probs)]


def eval_media(wandb, metrics: dict, classes: list[str], examples: list[tuple[str, int, list[float]]],
               split: str = "val") -> dict:
    """W&B media of one evaluation of `split` (val, test): the confusion matrix with the class names, a per-class
    table (precision, recall, F1, support) and a table of examples (text as the model reads it, label, prediction,
    probabilities)."""
    truth, preds = [], []
    for i, row in enumerate(metrics["confusion"]):
        for j, count in enumerate(row):
            truth += [i] * count
            preds += [j] * count
    per_class = wandb.Table(columns=["class", "precision", "recall", "f1", "support"])
    for name in classes:
        per_class.add_data(name, metrics[f"precision/{name}"], metrics[f"recall/{name}"], metrics[f"f1/{name}"],
                           metrics[f"support/{name}"])
    examples_table = wandb.Table(columns=["text", "label", "predicted", "probability", "correct",
                                          *[f"p_{name}" for name in classes]])
    for text, label, probs in examples:
        best = max(range(len(probs)), key=probs.__getitem__)
        examples_table.add_data(text, classes[label], classes[best], probs[best], best == label, *probs)
    return {f"{split}/confusion_matrix": wandb.plot.confusion_matrix(y_true=truth, preds=preds, class_names=classes),
            f"{split}/per_class": per_class, f"{split}/examples": examples_table}


# W&B settings a job can override through the environment (they win over the YAML, as cluster users expect).
WANDB_ENV = {"project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "name": "WANDB_NAME", "group": "WANDB_RUN_GROUP",
              "notes": "WANDB_NOTES", "mode": "WANDB_MODE"}


def wandb_settings(cfg, run_dir: Path) -> dict:
    """The effective W&B settings: the YAML's log.wandb, overridden by WANDB_* environment variables."""
    w = cfg.log.wandb
    out = {key: os.environ.get(env) or getattr(w, key) for key, env in WANDB_ENV.items()}
    out["name"] = out["name"] or run_dir.name
    tags = os.environ.get("WANDB_TAGS")
    out["tags"] = [t for t in tags.split(",") if t] if tags else list(w.tags)
    return out


def wandb_init_kwargs(cfg, run_dir: Path, run_id: str) -> dict:
    """wandb.init arguments: the run id saved in checkpoints and resume="allow", so a resumed job continues it."""
    settings = wandb_settings(cfg, run_dir)
    kwargs = {"id": run_id, "resume": "allow", "dir": str(run_dir), "mode": settings["mode"], "name": settings["name"]}
    for key in ("entity", "group", "notes", "tags"):
        if settings[key]:
            kwargs[key] = settings[key]
    return kwargs


def _wandb_setup_error(exc: Exception) -> bool:
    """wandb's errors for its setup, which a retry does not mend: no API key (UsageError), a malformed one
    (AuthenticationError), a setting it refuses (UsageError, or pydantic's ValidationError). A key the server
    refuses, or a network that is down, is a CommError: it only warns, as it cannot be told from an outage."""
    errors = sys.modules.get("wandb.errors")  # raised by wandb, so already imported if it is one of its errors
    pydantic = sys.modules.get("pydantic")  # wandb's settings validate with it: a value it refuses
    return errors is not None and (isinstance(exc, (errors.UsageError, errors.AuthenticationError))
                                   or (pydantic is not None and isinstance(exc, pydantic.ValidationError)))


class RunLog:
    """Writes metrics to <run>/metrics.jsonl and forwards them to the Accelerate trackers; main process only. Each
    launch that starts training appends its topology (config["launch"]: processes, device, mixed precision,
    threads, software, Slurm job, the step it starts from) and W&B run id to <run>/launches.jsonl: what produced
    the rows, without W&B too."""

    def __init__(self, cfg, run_dir: Path, accelerator, run_id: str, resume_step: int | None, config: dict,
                 lock=None, history_after: int = -1):
        self.accelerator, self.run_dir, self.launch = accelerator, run_dir, config.get("launch", {})
        self.main = accelerator.is_main_process
        self.lock = lock  # the run directory's (runlock.RunLock)
        self.path = run_dir / "metrics.jsonl"
        self.trackers_on = False
        self.run_id = run_id
        self.failure: WriteError | None = None  # metrics.jsonl could not be written: the trainer stops at its step
        self.start_error: Exception | None = None  # W&B refused its setup: every process stops before training
        # a W&B run that goes on has the steps up to the checkpoint resumed from (history_after): a row at one of
        # them (a relaunch after the end testing again, a model evaluated at that step) goes to metrics.jsonl only;
        # W&B would drop it
        self.history_after = history_after
        self.resume_step = resume_step  # rows after it are dropped when the launch begins (begin())
        if not self.active:
            return
        self.cfg = cfg
        if cfg.log.trackers:
            settings = wandb_settings(cfg, run_dir)
            # the W&B settings in effect (WANDB_* win over the YAML), so that the dashboard's filters find the run
            config = {**config, "log": {**config["log"], "wandb": {**config["log"]["wandb"], **settings}}}
            try:
                accelerator.init_trackers(settings["project"], config=config,
                                          init_kwargs={"wandb": wandb_init_kwargs(cfg, run_dir, run_id)})
                self.trackers_on = True
            except Exception as exc:  # a tracker failing must not stop training, unless it is set up wrong
                if _wandb_setup_error(exc):
                    from .config import ConfigError

                    fix = ("log in (`wandb login`, or a valid WANDB_API_KEY in the job's environment), set "
                           "log.wandb.mode=offline (`wandb sync` later)" if settings["mode"] == "online" else "fix it")
                    self.start_error = ConfigError(f"W&B could not start ({type(exc).__name__}: {exc}): {fix}, or "
                                                   "set log.trackers=[]; no step was trained in this launch")
                    return
                log.warning("trackers %s could not start (%s: %s); training goes on, metrics go to %s",
                            cfg.log.trackers, type(exc).__name__, exc, self.path)

    def begin(self) -> None:
        """metrics.jsonl without the rows this launch logs again: those after the step resumed from (-1, a fresh
        start: those of an attempt that died before its first checkpoint) and the test results. Only once W&B has
        started: a relaunch that stops before (W&B refused) leaves a finished run's results as they were."""
        if self.active and self.resume_step is not None:
            try:
                drop_rows_after(self.path, self.resume_step)
            except WriteError as exc:
                self.failure = exc

    @property
    def active(self) -> bool:
        """The main process, while the run directory is this run's: a run whose lock another launch took over
        writes nothing more (it stops at the end of its step, or of its test evaluation). The lock file is read
        each time (RunLock.check), not only at the heartbeat: a process just back from a stall has not had one."""
        return self.main and not (self.lock and self.lock.check())

    def log(self, metrics: dict, step: int) -> None:
        """A row of metrics.jsonl, and of the trackers' history if `step` is past the one resumed from."""
        if not self.active:
            return
        self._append(self.path, {"step": step, **metrics})
        if self.trackers_on and step > self.history_after:
            try:  # numbers only: the confusion matrix goes to W&B as a plot (log_wandb)
                self.accelerator.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=step)
            except Exception as exc:
                log.warning("tracker logging failed at step %d (%s: %s); trackers are off for the rest of the run",
                            step, type(exc).__name__, exc)
                self.trackers_on = False

    def record_launch(self) -> None:
        """This launch's line in launches.jsonl: written with the run's config.yaml, once W&B (if any) has started."""
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        self._append(self.run_dir / "launches.jsonl", {"time": now, "run_id": self.run_id, **self.launch})
        if self.failure is not None:
            raise self.failure

    def _append(self, path: Path, row: dict) -> None:
        """One JSON line; a failed write leaves no partial line and stops the run at its step (self.failure)."""
        if self.failure is not None:
            return
        size = path.stat().st_size if path.is_file() else 0
        try:
            with writing(path), open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except WriteError as exc:
            self.failure = exc
            with contextlib.suppress(OSError):
                os.truncate(path, size)

    def _wandb_run(self):
        if not self.trackers_on:
            return None
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                return tracker.run
        return None

    def log_wandb(self, build, step: int) -> None:
        """W&B-only media (tables, plots): `build(wandb)` returns the values, built only when W&B is on."""
        run = self._wandb_run() if self.active else None
        if run is None or step <= self.history_after:
            return
        try:
            import wandb

            run.log(build(wandb), step=step)
        except Exception as exc:
            log.warning("W&B media logging failed at step %d (%s: %s)", step, type(exc).__name__, exc)

    def log_eval_media(self, metrics: dict, data, split: str, model, step: int) -> None:
        """W&B's confusion matrix, per-class table and examples of an evaluation of `split` (val, test) of `data`."""
        self.log_wandb(lambda wandb: eval_media(wandb, metrics, data.label_names, example_predictions(
            model, getattr(data, split), data.tokenizer, self.accelerator), split), step)

    def log_model(self, folder: Path, name: str, metadata: dict) -> None:
        """Upload a model folder as a W&B artifact (in offline mode it is staged for `wandb sync`)."""
        run = self._wandb_run() if self.active else None
        if run is None or not self.cfg.log.wandb.log_model:
            return
        try:
            import wandb

            artifact = wandb.Artifact(name, type="model", metadata=metadata)
            artifact.add_dir(str(folder))
            run.log_artifact(artifact, aliases=["best", "latest"])
        except Exception as exc:
            log.warning("W&B artifact upload failed (%s: %s)", type(exc).__name__, exc)

    def summary(self, values: dict) -> None:
        """Run-level values (best and test metrics) for trackers that have a summary."""
        run = self._wandb_run() if self.active else None
        if run is None:
            return
        try:
            run.summary.update(values)
        except Exception as exc:
            log.warning("tracker summary failed (%s: %s)", type(exc).__name__, exc)

    def finish(self, exit_code: int = 0) -> None:
        """Close the trackers; W&B learns how the run ended (a preempted run is marked so, a failed one shows its
        exit code, not "finished"). Not Accelerate's end_training(): it also destroys the process group, which
        Trainer.close() does after releasing the DDP wrapper."""
        if not (self.active and self.trackers_on):
            return
        for tracker in self.accelerator.trackers:
            try:
                if tracker.name != "wandb":
                    tracker.finish()
                    continue
                if exit_code == EXIT_PREEMPTED:
                    tracker.run.mark_preempting()
                tracker.run.finish(exit_code=exit_code)
            except Exception as exc:
                log.warning("tracker %s did not close cleanly (%s: %s)", tracker.name, type(exc).__name__, exc)


class DebugRecords:
    """train.debug_records: each process appends the ids it trains on to <run>/debug/samples-rankN.jsonl and the
    digest of its final weights to weights-rankN.jsonl, so tests can check sharding and bitwise resumes."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.folder, self.rank, self.enabled = run_dir / "debug", rank, enabled

    def _write(self, kind: str, record: dict) -> None:
        if self.enabled:
            with open(self.folder / f"{kind}-rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def resume(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: their records go."""
        if self.enabled:
            self.folder.mkdir(exist_ok=True)
            drop_rows_after(self.folder / f"samples-rank{self.rank}.jsonl", step)

    def samples(self, step: int, epoch: int, ids) -> None:
        if self.enabled:
            self._write("samples", {"step": step, "epoch": epoch, "ids": ids.tolist()})

    def weights(self, step: int, model) -> None:
        if not self.enabled:
            return
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        self._write("weights", {"step": step, "sha256": h.hexdigest()})
