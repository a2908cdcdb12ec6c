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


def write_status(run_dir: Path, **fields) -> None:
    """status.json tells schedulers and people how the run ended: running, preempted, finished or failed."""
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps({**fields, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    os.replace(tmp, run_dir / "status.json")


def wandb_init_kwargs(cfg, run_dir: Path, run_id: str) -> dict:
    w = cfg.log.wandb
    kwargs = {"id": run_id, "resume": "allow", "dir": str(run_dir), "mode": os.environ.get("WANDB_MODE", w.mode),
              "name": w.name or run_dir.name}
    for key in ("entity", "group", "notes"):
        if getattr(w, key):
            kwargs[key] = getattr(w, key)
    if w.tags:
        kwargs["tags"] = list(w.tags)
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
        if cfg.log.trackers:
            project = cfg.log.wandb.project
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

    def summary(self, values: dict) -> None:
        """Run-level values (best and test metrics) for trackers that have a summary."""
        if not (self.active and self.trackers_on):
            return
        try:
            for tracker in self.accelerator.trackers:
                if tracker.name == "wandb":
                    tracker.run.summary.update(values)
        except Exception as exc:
            log.warning("tracker summary failed (%s: %s)", type(exc).__name__, exc)

    def finish(self) -> None:
        if self.active and self.trackers_on:
            try:
                self.accelerator.end_training()
            except Exception as exc:
                log.warning("trackers did not close cleanly (%s: %s)", type(exc).__name__, exc)
