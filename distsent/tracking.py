"""Run records on the main process: metrics.jsonl, status.json, and Accelerate's trackers (W&B, TensorBoard, ...).

A tracker that cannot start or fails mid-run is dropped with a warning: logging never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the JSON lines logged at or before `step` (a resumed run redoes what came after)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a kill: drop it
            continue
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def software_versions() -> dict:
    """Library versions and the project's git commit (with a -dirty mark), for the run's config."""
    import importlib.metadata as md
    import subprocess

    out = {}
    for pkg in ("distsent", "torch", "accelerate", "datasets", "tokenizers", "wandb", "safetensors", "numpy"):
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


def write_status(run_dir: Path, **fields) -> None:
    """status.json tells schedulers and people how the run ended: running, preempted, finished or failed."""
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps({**fields, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    os.replace(tmp, run_dir / "status.json")


# W&B settings a job can override through the environment (they win over the YAML, as cluster users expect).
_WANDB_ENV = {"project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "name": "WANDB_NAME", "group": "WANDB_RUN_GROUP",
              "notes": "WANDB_NOTES", "mode": "WANDB_MODE"}


def wandb_settings(cfg, run_dir: Path) -> dict:
    """The effective W&B settings: the YAML's log.wandb, overridden by WANDB_* environment variables."""
    w = cfg.log.wandb
    out = {key: os.environ.get(env) or getattr(w, key) for key, env in _WANDB_ENV.items()}
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


class RunLog:
    """Writes metrics to <run>/metrics.jsonl and forwards them to the Accelerate trackers; main process only."""

    def __init__(self, cfg, run_dir: Path, accelerator, run_id: str, resume_step: int | None, config: dict):
        self.accelerator = accelerator
        self.active = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.trackers_on = False
        self.run_id = run_id
        if not self.active:
            return
        if resume_step is not None:
            drop_rows_after(self.path, resume_step)
        self.cfg = cfg
        if cfg.log.trackers:
            project = wandb_settings(cfg, run_dir)["project"]
            try:
                accelerator.init_trackers(project, config=config,
                                          init_kwargs={"wandb": wandb_init_kwargs(cfg, run_dir, run_id)})
                self.trackers_on = True
            except Exception as exc:  # a tracker failing must not stop training
                log.warning("trackers %s could not start (%s: %s); training goes on, metrics go to %s",
                            cfg.log.trackers, type(exc).__name__, exc, self.path)

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.trackers_on:
            try:
                self.accelerator.log(metrics, step=step)
            except Exception as exc:
                log.warning("tracker logging failed at step %d (%s: %s); trackers are off for the rest of the run",
                            step, type(exc).__name__, exc)
                self.trackers_on = False

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
        if run is None:
            return
        try:
            import wandb

            run.log(build(wandb), step=step)
        except Exception as exc:
            log.warning("W&B media logging failed at step %d (%s: %s)", step, type(exc).__name__, exc)

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

    def finish(self) -> None:
        if self.active and self.trackers_on:
            try:
                self.accelerator.end_training()
            except Exception as exc:
                log.warning("trackers did not close cleanly (%s: %s)", type(exc).__name__, exc)
