"""Which checkpoint a run resumes from (checkpoint.resume), and what a resume does with the run's other checkpoints
and best model: a resume that starts a new line (a rollback to an older checkpoint of the run, or a branch from
another run's) is recorded in the train state (TrainState.resumed_from), so that a relaunch continues it."""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
from itertools import count
from pathlib import Path

from . import files
from .checkpoint import CheckpointError, by_step, check_compatible, check_kind, find_latest, in_run, verify
from .config import resume_identity
from .files import WriteError
from .together import fail_together, from_main

log = logging.getLogger(__name__)

OLD_DIR = re.compile(r"^\.step-(\d{8})\.old$")  # a checkpoint replaced by a new save of its step, until done
LINE = "line.json"  # checkpoints/line.json: the line a rollback started (see settle)


def check_config_against_run(cfg, root: Path, label_names: list[str]) -> Path | None:
    """distsent-train --check: CheckpointError if the start would refuse the checkpoint it resumes from (chosen as
    resume_path chooses it, but without reading any checkpoint's weights) or that checkpoint was trained with another
    config, in the config's part of the run's identity (the model, the seed, ...) or in the data's classes
    (`label_names`, as read now; the data's content needs the tokenized data). Writes nothing; returns the
    checkpoint (None: a fresh start)."""
    path = resume_path(cfg.checkpoint, root, verify_files=False)
    if path is not None:
        current = {**resume_identity(cfg), "label_names": label_names}
        check_compatible(json.loads((path / "state.json").read_text())["identity"], current, path, only=current,
                         branch=not in_run(path, root))
    return path


def _foreign(named: Path, root: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint.resume={named.resolve()} is another run's checkpoint, but {root.parent} holds "
                           f"checkpoints of its own: start the new run from it in a new output_dir")


def chosen_checkpoint(cfg, acc, root: Path) -> Path | None:
    """Collective: resume_path, decided once, by the main process (another could see a checkpoint as broken that it
    does not); an explicitly named checkpoint that is broken fails here, before the slow start-up."""
    found, failure = None, None
    if acc.is_main_process:
        try:
            found = resume_path(cfg, root)
        except CheckpointError as exc:
            failure = exc
    fail_together(acc, failure, "find the checkpoint to resume from")
    return from_main(acc, found)


def resume_path(cfg, root: Path, verify_files: bool = True) -> Path | None:
    """The checkpoint to restore (None: a fresh start), decided on checkpoint.resume; CheckpointError where the
    start must be refused. verify_files=False (--check): a checkpoint "verifies" if its state.json reads, its
    files are not checked.
    'auto': the latest checkpoint under `root` that verifies; none there: a fresh start; some, none valid: refused.
    'never': a fresh start, refused where the run directory holds an earlier run.
    A path: the run's latest instead if that descends from this same path already (a relaunch of the command);
    else the path, which must verify, and if it is another run's, `root` must hold no checkpoints of its own."""
    if cfg.resume == "never":
        run_dir = root.parent
        earlier = [p.name for p in (root, run_dir / "best", run_dir / "metrics.jsonl") if p.exists()]
        if earlier:
            raise CheckpointError(f"checkpoint.resume=never: {run_dir} holds an earlier run ({', '.join(earlier)}); "
                                  f"a fresh start there would mix the two runs' checkpoints, metrics and best model. "
                                  f"Use a new output_dir, remove that run first, or resume it (checkpoint.resume=auto)")
        return None
    latest = find_latest(root) if verify_files else _newest_readable(root)
    if cfg.resume == "auto":
        if latest is None and by_step(root):
            raise CheckpointError(f"{root}: no checkpoint there verifies (each one's problem is logged above); a "
                                  f"fresh start would mix a new run into that one's records. Repair or remove them, "
                                  f"or use a new output_dir")
        return latest
    named = Path(cfg.resume).expanduser().resolve()
    if latest is not None and resumed_from(latest) == resume_tag(named, root):
        # carried out by an earlier launch of this command (a requeued job): continue, not start over from it
        if verify_files:
            log.info("checkpoint.resume=%s was resumed from already: continuing from this run's latest, %s", named,
                     latest)
        return latest
    if verify_files:
        verify(named)
    else:
        check_kind(named)
        if not _state_reads(named):
            raise CheckpointError(f"{named}: its state.json cannot be read")
    if not in_run(named, root) and by_step(root):
        raise _foreign(named, root)
    return named


def _newest_readable(root: Path) -> Path | None:
    """The newest checkpoint under `root` whose state.json reads (for a check that reads no weights); the others
    are named, as find_latest names those that do not verify."""
    for _, path in by_step(root):
        if _state_reads(path):
            return path
        log.warning("skipping checkpoint: %s: its state.json cannot be read", path)
    return None


def _state_reads(path: Path) -> bool:
    try:
        state = json.loads((path / "state.json").read_text())
        return isinstance(state["identity"], dict) and isinstance(state["train_state"], dict)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def resumed_from(path: Path) -> str:
    """The checkpoint.resume a run's checkpoint descends from (TrainState.resumed_from), "" if none."""
    return json.loads((path / "state.json").read_text())["train_state"].get("resumed_from", "")


def resume_tag(path: Path, root: Path) -> str:
    """How a run records the checkpoint.resume it carried out (TrainState.resumed_from): one of its own checkpoints
    by name, so that a relaunch is recognised after the run directory moved or is mounted elsewhere; another
    run's by its absolute path."""
    return path.name if in_run(path, root) else str(path.expanduser().resolve())


def set_aside_newer(root: Path, step: int, delete: bool) -> list[str]:
    """The run's checkpoints after `step`, which it resumes before: deleted (a rollback abandons them) or, where
    they were skipped as broken, renamed `<name>.broken` to be looked at (kept as they were, pruning would count
    them among the newest). Either way neither `auto` nor pruning takes them for the run's own any more."""
    moved = []
    with files.writing(root):
        for s, path in by_step(root):
            if s > step:
                if delete:
                    shutil.rmtree(path)
                else:
                    path.rename(_free_name(path, ".broken"))
                moved.append(path.name)
        for old in root.glob(".step-*.old"):  # a crash's leftover that find_latest would otherwise put back
            if (m := OLD_DIR.match(old.name)) and int(m.group(1)) > step:
                shutil.rmtree(old)
    return moved


def _free_name(path: Path, suffix: str) -> Path:
    """`path` + suffix, or + suffix-2, -3, ... where that is taken (the same step may have broken before)."""
    candidates = (path.with_name(f"{path.name}{suffix}{f'-{k}' if k > 1 else ''}") for k in count(1))
    return next(c for c in candidates if not c.exists())


def settle(acc, state, resume: str, resume_from: Path, run_dir: Path, ended: bool = False) -> bool:
    """Collective, after `resume_from` was restored into `state`: make it this run's. checkpoint.resume naming a
    path, carried out now, starts a new line from one of this run's older checkpoints (a rollback: the newer ones
    are deleted) or from another run's (a branch: a best model of its own); either is a new W&B run (W&B would drop
    a rollback's rows below the steps the old line logged). Checkpoints newer than the one resumed are otherwise
    ones `auto` skipped as broken: set aside. And best/ must hold the restored state's best model (a rollback, or a
    kill between writing best/ and the checkpoint, can leave a later one there); otherwise no model is best yet
    and the next evaluation writes it. Returns whether this launch begins a new W&B run (a branch, or a rollback
    carried out now). A damaged best/ of a run that trains on is lost, and the next evaluation writes it anew (one
    that has `ended` stops at its test, naming the file)."""
    root = run_dir / "checkpoints"
    named = resume_tag(Path(resume), root) if resume not in ("auto", "never") else ""
    new_line = bool(named) and state.resumed_from != named
    branch = not in_run(resume_from, root)
    failure, line = None, None
    if acc.is_main_process:
        try:
            started = _started_line(root / LINE, state.step)
            # the run's latest checkpoint named, no line begun from it yet: nothing rolls back, its W&B run goes on
            new_line = new_line and (branch or started is not None or any(s > state.step for s, _ in by_step(root)))
            if named and not (branch or new_line or started):  # a line recorded at an earlier step: what follows
                with files.writing(root / LINE):  # no longer descends from it alone, and a rollback to it begins anew
                    (root / LINE).unlink(missing_ok=True)
            line = None if branch else _record_line(root, state.step, named if new_line else "")
            _tidy(root, run_dir, state.step, rollback=new_line)
        except WriteError as exc:
            failure = exc
    fail_together(acc, failure, f"set aside the checkpoints after step {state.step}")
    line, new_line = from_main(acc, (line, new_line))
    best = _exported_step(run_dir / "best", check=not ended) if acc.is_main_process else None  # read once
    _adopt(state, named, new_line, branch, line, from_main(acc, best))
    return (new_line and branch) or bool(line and line.get("new"))


def _record_line(root: Path, step: int, rollback: str) -> dict | None:
    """The line that started from this run's checkpoint `step` (LINE), if one did; a rollback (`rollback`: its
    checkpoint.resume) starting now is recorded first, with a new W&B run id: every attempt of it until its first
    checkpoint then shares that run."""
    line = _started_line(root / LINE, step)
    if rollback and (not line or line["resumed_from"] != rollback):
        line = {"step": step, "resumed_from": rollback, "run_id": secrets.token_hex(4)}
        files.atomic_write(root / LINE, json.dumps(line))
        return {**line, "new": True}  # not in the file: a relaunch of this line continues its W&B run
    return line


def _tidy(root: Path, run_dir: Path, step: int, rollback: bool) -> None:
    """The checkpoints after `step` deleted (a rollback) or set aside, and best/ as its last publish left it."""
    moved = set_aside_newer(root, step, delete=rollback)
    if moved:
        log.warning("%s: %s", "rolled back: deleted the newer checkpoints" if rollback else
                    "set aside the newer checkpoints, which did not verify, as <name>.broken", ", ".join(moved))
    with files.writing(run_dir / "best"):  # a crash inside its publish: put the previous one back
        files.recover(run_dir / "best")


def _adopt(state, named: str, new_line: bool, branch: bool, line: dict | None, best_step: int | None) -> None:
    """The restored state as this line's: its W&B run and line, its early stopping, its best model."""
    if new_line and branch:  # a run of its own: a new W&B run
        state.resumed_from, state.run_id = named, ""
    elif line and (new_line or (not named and line["resumed_from"] != state.resumed_from)):
        # a new line, or one that stopped before its first checkpoint relaunched with `auto`: the checkpoint it
        # started from still names the abandoned line, whose W&B run has passed these steps
        state.resumed_from, state.run_id = line["resumed_from"], line["run_id"]
    elif named and not branch:  # the latest named (nothing rolled back): its relaunches continue, as the command's
        state.resumed_from = named
    if branch:
        state.stopped_early = False
    if branch or best_step != state.best_step:
        state.best_val_acc, state.best_step, state.evals_since_best = -1.0, -1, 0


def _started_line(path: Path, step: int) -> dict | None:
    """The line a rollback started from checkpoint `step` (LINE: its checkpoint.resume and W&B run id), if the
    checkpoint being resumed is that one; None otherwise or where the record cannot be read."""
    try:
        line = json.loads(path.read_text())
        return line if line["step"] == step else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _exported_step(folder: Path, check: bool) -> int | None:
    """The step of the model in a best/ folder, or None if there is none to read; with `check`, None for a damaged
    one too (otherwise it is reported by its check at the test)."""
    if check and (folder / files.MANIFEST).is_file():
        try:
            files.verify(folder)
        except files.IntegrityError as exc:
            log.warning("%s: the best model so far is lost; the next evaluation writes best/ anew", exc)
            return None
    try:
        return json.loads((folder / "meta.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
