"""Training entry point.

Workstation, N processes (DDP on gloo for CPU, NCCL for GPUs):
    accelerate launch --config_file launch/cpu_2proc.yaml -m distsent.train --config configs/imdb_lstm.yaml
One process, no launcher:
    distsent-train --config configs/smoke.yaml output_dir=runs/smoke train.epochs=2
Any config key can be overridden as key.sub=value. `--help-config` lists every key; `--check` checks a config, its
overrides and its data without training (before queueing a job, say).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from . import skip_final_collection
from .config import ConfigError
from .configfile import describe, load_config
from .files import IntegrityError
from .records import DataError

PEER_EXIT_DELAY_S = 2.0
# a file to write this launch's exit status into (slurm/train.sbatch sets it: `accelerate launch` and torchrun end
# with 1 whatever their processes' status, and status.json is the run's, which a refused launch leaves as it was)
EXIT_REPORT_ENV = "DISTSENT_EXIT_REPORT"


def main(argv: list[str] | None = None) -> int:
    skip_final_collection()
    code = 1  # an exception that escapes (its traceback is printed)
    try:
        code = _main(argv)
    except SystemExit as exc:  # a preempted run's 75; argparse's 2 (an unknown option) or 0 (--help)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        raise
    except KeyboardInterrupt:  # a Ctrl-C outside the run (loading, --check, shutting down): no traceback
        print("distsent-train: interrupted (Ctrl-C)", file=sys.stderr)
        code = 130
    finally:
        report = os.environ.get(EXIT_REPORT_ENV)
        if report and os.environ.get("RANK", "0") == "0":  # one process: the others stop with the same status
            with contextlib.suppress(OSError):
                Path(report).write_text(f"{code}\n")
    return code


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="distsent-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action=_Once, help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and "
                        "what it does; with --config (and overrides), with the values they give")
    parser.add_argument("--check", action="store_true",
                        help="check the config, its overrides and the data (read as training reads it), then exit "
                             "without training: 0 if they are usable, 2 with the error")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)  # overrides on both sides of an option (... --check key=value)
    try:
        cfg = load_config(args.config, args.overrides) if args.config or args.overrides or not args.help_config \
            else None
    except ConfigError as exc:
        return fail(f"config error: {exc}", 2, once_per_machine=True)  # every process reads the same config
    if args.help_config:
        try:
            print("\n".join(describe(values=cfg)), flush=True)
        except BrokenPipeError:  # `| head` stopped reading: no traceback (the handling Python's docs give)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.check:
        return check(cfg)

    from .preemption import StopFlag

    stop = StopFlag(cfg.dist.stop_signals)  # before the slow start-up: a stop signal during it is kept, not fatal
    from .build import close_process_group
    from .runlock import RunLock, RunLockedError
    from .together import PeerFailed
    from .trainer import Trainer

    # RANK from the launcher, not PartialState(): the Trainer must be first to set up the distributed state
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("accelerate", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    trainer = None
    try:
        trainer = Trainer(cfg, stop=stop)
        trainer.fit()
    except RunLockedError as exc:  # the directory is another live run's: its status.json stays as it is
        return fail(f"{type(exc).__name__}: {exc}", 2)
    except (Exception, KeyboardInterrupt) as exc:  # not SystemExit: a preempted run's exit 75 is already set
        message, code = explain(exc)
        # status.json unless another live run holds the directory (this one stopped before it took the lock, or
        # another launch took it over while this one was stalled)
        lock = trainer.lock if trainer is not None else None
        ours = lock.check() is None if lock is not None else RunLock(Path(cfg.output_dir)).live_owner() is None
        if isinstance(exc, PeerFailed):
            # the launcher's summary names as root cause the error file with the earliest timestamp, in whole
            # seconds: this one is written a moment after the failing process's, so that it never ties or wins;
            # the launcher's SIGTERM to the rest meanwhile changes nothing
            stop.ignore()
            time.sleep(PEER_EXIT_DELAY_S)
        return fail(message, code, cfg if ours else None, trainer)
    finally:  # also when the start-up failed after the process group was created
        trainer.close() if trainer is not None else close_process_group()
    return 0


class _Once(argparse.Action):
    """An option given once: a second --config would silently replace the first (argparse keeps the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): one config file "
                         "per run; change its values with key.sub=value overrides")
        setattr(namespace, self.dest, values)


def check(cfg) -> int:
    """--check, once the config and its overrides have loaded: what else can be known before the run's machines are.
    The tracker names and the W&B settings in effect (as wandb validates them); the data, read and checked as
    training reads it (columns, texts, labels and classes, the carve; a hub data set is fetched); for a new run, the
    pretrained vectors' file; a checkpoint.resume=never into a directory that holds a run; the checkpoint a run
    would resume from (chosen as the start chooses it, by its state.json), against the config's part of the run's
    identity (the model, the seed, ...) and the data's classes; under a launcher (WORLD_SIZE set), the global batch
    against its process count. Writes nothing. What depends on the machines otherwise (the process count, a
    precision the device lacks), on the checkpoint's files (its weights) or on the tokenized data (the vocabulary,
    the data's content) is checked when the run starts."""
    from .build import check_new_model, check_trackers, layout_for
    from .checkpoint import by_step
    from .data import size_warnings
    from .labels import shown
    from .resume import check_config_against_run, resume_path
    from .runlock import RunLock
    from .sources import find_source, load_splits
    from .tracking import status_state

    root, resume = Path(cfg.output_dir) / "checkpoints", cfg.checkpoint.resume
    try:
        if root.parent.exists() and not root.parent.is_dir():
            raise ConfigError(f"output_dir {cfg.output_dir}: a file, not a folder")
        there = next(p for p in (root.parent, *root.parent.parents) if p.exists())  # the run makes the rest
        if not os.access(there, os.W_OK | os.X_OK):  # a read-only filesystem, or no permission for this user
            raise ConfigError(f"output_dir {cfg.output_dir}: {there} cannot be written here (a read-only filesystem, "
                              "or no permission)")
        check_trackers(cfg.log)
        world = os.environ.get("WORLD_SIZE", "")
        if world.isdigit() and int(world) > 0:  # under accelerate launch / torchrun: the batch must split over them
            layout_for(cfg, int(world))
        if resume == "never" or (resume == "auto" and not by_step(root)):  # new (a resume keeps its model)
            check_new_model(cfg)
            vectors = cfg.model.pretrained_embeddings
            if vectors and not Path(vectors).expanduser().is_file():
                raise DataError(f"model.pretrained_embeddings: {vectors}: no such file")
        source = find_source(cfg.data)
        splits, names = load_splits(cfg.data)
        start = resume_path(cfg.checkpoint, root) if resume == "never" else \
            check_config_against_run(cfg, root, names)  # `never`: refused where the directory holds a run
    except (ConfigError, DataError, IntegrityError) as exc:  # Integrity: the resume refused
        return fail(f"{type(exc).__name__}: {exc}", 2)
    where = ", ".join(f"{split} {path}" for split, path in source.files.items()) or f"{source.kind} {source.location}"
    sizes = " / ".join(f"{len(splits[s].labels)} {s}" for s in ("train", "val", "test"))
    state = status_state(root.parent) if start is not None else None
    run = f"resumes from {start}" + (f"; status.json: {state}" if state else "") if start is not None else "a new run"
    if owner := RunLock(root.parent).live_owner():  # the start refuses it while that run lives
        run += f"; a live run holds it now (host {owner.get('host')}, pid {owner.get('pid')}): a launch is refused"
    for warning in size_warnings(splits["train"].labels, splits["val"].labels, names, cfg.train.global_batch_size,
                                 splits["test"].labels, bool(cfg.data.label_names)):  # as the run will warn
        print(f"distsent-train: warning: {warning}", file=sys.stderr)
    print(f"distsent-train: config OK; data: {where}: {sizes} texts, {len(names)} classes {shown(names)}; run "
          f"directory {cfg.output_dir} ({run})")
    return 0


def explain(exc: BaseException) -> tuple[str, int]:
    """The one line and exit code for an error that stops the run (together.stop_reason), and for an unexpected one
    (a peer killed in the middle of a collective, a bug) its traceback too."""
    from .together import is_own, stop_reason

    if not is_own(exc) and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
        traceback.print_exception(exc)
    return stop_reason(exc)


def fail(message: str, exit_code: int, cfg=None, trainer=None, once_per_machine: bool = False) -> int:
    """One line on stderr; under `accelerate launch` / torchrun also in the error file its failure summary shows
    for this process (instead of "To enable traceback see ..."). With `cfg`, the main process also records the
    failure in status.json if the trainer did not (a failure during start-up: bad data, a refused checkpoint), so
    that people and schedulers read the documented exit code there, unless that file records a finished run: a
    relaunch that failed before it ran leaves that record as it was (slurm/train.sbatch reads the launch's own exit
    status from $DISTSENT_EXIT_REPORT). A preempted run's record does say failed then (the relaunch could not resume
    it: a damaged checkpoint, edited data, or a config it refuses), and the next launch that resumes it says running.
    once_per_machine: an error every process meets alike is printed by each machine's first process only."""
    if not once_per_machine or os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"distsent-train: {message}", file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    run_dir = Path(cfg.output_dir) if cfg is not None else None
    recorded = trainer is not None and trainer.failure_recorded
    if run_dir is not None and run_dir.is_dir() and not recorded and os.environ.get("RANK", "0") == "0":
        from .tracking import status_state, write_status

        if status_state(run_dir) == "finished":  # a relaunch that failed before it ran: the finished run stays recorded
            print(f"distsent-train: {run_dir} holds a finished run; its status.json is left as it is",
                  file=sys.stderr)
            return exit_code
        with contextlib.suppress(OSError):  # a WriteError too: the error above is what matters
            write_status(run_dir, state="failed", exit_code=exit_code, error=message)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
