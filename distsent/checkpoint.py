"""Checkpoints and model folders: save on schedule, find the latest valid one, restore a run, export best/.

Layout of `<run>/checkpoints/step-NNNNNNNN/`:
  model.safetensors   model weights (the same on every process under DDP, written once)
  ema.safetensors     with train.ema_decay: the moving average of the weights (what is evaluated), written once
  optimizer.pt        optimizer state (tensors and numbers only: loaded with torch.load(weights_only=True))
  rng-rankNNNNN.pt    each process's python / numpy / torch (/ CUDA) random states, sent to the main process
  state.json          train state (step, data position, best model, world size, tracker run id), scheduler,
                      scaler, running log sums, and the run's identity (what a resume must keep unchanged)
  manifest.json       written last: size and sha256 of every file above; a folder without it is incomplete
A checkpoint is written under `.tmp-step-NNNNNNNN/` and renamed into place only when complete. A model folder
(`<run>/best/`: weights, tokenizer.json, config.yaml, meta.json) is sealed by the same kind of manifest.

Why not Accelerator.save_state / load_state: they write into the target folder in place (a kill midway leaves a folder
that looks like a checkpoint), keep no checksums, restore random states by process index (a process without a file goes
on, logged at info level) and GPUs by device number, and know nothing of what the run must keep unchanged. The parts are
the same: safetensors weights, the optimizer's state_dict, each process's random states, the stateful objects'
state_dicts.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import time
from pathlib import Path

import torch

from . import files
from .configfile import save_config, saved_settings
from .files import IntegrityError, WriteError
from .randomstate import rng_state, seed_dropout, set_rng_state, stream_seed
from .runlock import RunLockedError
from .together import fail_together

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_DIR = re.compile(r"^\.tmp-step-(\d{8})$")
MODEL_FILES = ("config.yaml", "tokenizer.json", "model.safetensors")
EMA_FILE = "ema.safetensors"


class CheckpointError(IntegrityError):
    """A checkpoint is incomplete, corrupted, or does not fit this run; the message names it."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def rng_file(rank: int) -> str:
    """The file of process `rank`'s random states in a checkpoint."""
    return f"rng-rank{rank:05d}.pt"


def rng_files(world_size: int) -> list[str]:
    return [rng_file(rank) for rank in range(world_size)]


# --- save ------------------------------------------------------------------------------------------------------

def save(root: Path, step: int, accelerator, model, optimizer, state: dict, keep_last: int,
         averaged=None, lock=None) -> Path:
    """Write checkpoint `step` collectively (every process calls this) and prune old ones; returns its path.
    `averaged`: the moving average of the weights (train.ema_decay), saved beside the weights.

    The main process writes every file: the weights and optimizer are the same on every process under DDP, and the
    other processes' random states are sent to it over the process group, so no file of another machine has to
    show on a shared filesystem before the manifest seals the folder. If it cannot write (a full disk, no
    permission), every process raises (WriteError naming the file there, PeerFailed on the others), the partial
    folder is removed and earlier checkpoints stay as they were: a checkpoint is either complete and published or
    not there at all. `lock`: the run's RunLock, read before writing and before publishing: if another launch has taken
    the directory over (this process was stalled), nothing more is written, published, pruned or tidied in a folder
    whose checkpoints are now the new owner's, and every process raises (RunLockedError, PeerFailed).
    """
    final, tmp = step_dir(root, step), root / f".tmp-step-{step:08d}"
    from accelerate.utils import gather_object  # here: prediction imports this module, and needs no Accelerate

    rng_states = gather_object([_torch_bytes(rng_state())])  # in process order, on every process

    def check_lock():
        if lock is not None and lock.check() is not None:
            raise lock.lost

    def write():
        check_lock()
        shutil.rmtree(tmp, ignore_errors=True)
        with files.writing(tmp):
            tmp.mkdir(parents=True)
        for rank, rng_bytes in enumerate(rng_states):
            files.atomic_write(tmp / rng_file(rank), rng_bytes)
        files.atomic_write(tmp / "model.safetensors", _weights_bytes(accelerator.unwrap_model(model)))
        if averaged is not None:
            files.atomic_write(tmp / EMA_FILE, _weights_bytes(averaged))
        files.atomic_write(tmp / "optimizer.pt", _torch_bytes(optimizer.state_dict()))
        files.atomic_write(tmp / "state.json", json.dumps(state, indent=1))
        check_lock()  # the writing may have stalled: a folder taken over meanwhile gets nothing published or pruned
        with files.writing(tmp):  # reading back for the checksums, renaming: any OSError is a WriteError
            files.seal(tmp, step=step)
            files.publish(tmp, final)  # the same step saved again (an epoch end that is also periodic) replaces
        try:  # published: a checkpoint that could not be pruned is disk space, not a failed save
            prune(root, keep_last)
        except OSError as exc:
            log.warning("%s: could not remove older checkpoints (%s); they stay", root, exc)

    failure = None
    if accelerator.is_main_process:
        try:
            write()
        except (WriteError, RunLockedError) as exc:
            failure = exc
            if lock is None or lock.check() is None:  # a folder taken over: its files are not ours to tidy
                shutil.rmtree(tmp, ignore_errors=True)
    fail_together(accelerator, failure, f"write checkpoint {final}")
    return final


def _weights_bytes(module) -> bytes:
    from safetensors.torch import save as safetensors_bytes

    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


def _torch_bytes(obj) -> bytes:
    """torch.save into memory: torch.save and safetensors' save_file report a full disk as a RuntimeError that
    names no file; serialized first, every write goes through files.atomic_write (WriteError naming the file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of interrupted writes."""
    complete = [p for _, p in by_step(root) if (p / files.MANIFEST).is_file()]
    for old in complete[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    newest = by_step(root)[0][0] if complete else -1
    for tmp in root.glob(".tmp-step-*"):
        if (m := TMP_DIR.match(tmp.name)) and int(m.group(1)) <= newest:  # not a stray folder of another name
            shutil.rmtree(tmp, ignore_errors=True)
    for old in root.glob(".step-*.old"):
        if old.with_name(old.name[1: -len(".old")]).is_dir():
            shutil.rmtree(old, ignore_errors=True)


def by_step(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders, newest step first (by the number in the name, never by file times)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


# --- verify and load -------------------------------------------------------------------------------------------

def verify(path: Path) -> dict:
    """The checkpoint's state.json, after checking every file against the manifest, which must list the weights,
    the optimizer, the state and each process's random states; CheckpointError if not."""
    path = Path(path)
    check_kind(path)
    try:
        manifest = files.verify(path, required=("model.safetensors", "optimizer.pt", "state.json"))
    except IntegrityError as exc:
        raise CheckpointError(str(exc)) from None
    saved, listed, step = json.loads((path / "state.json").read_text()), manifest["files"], manifest.get("step")
    world = saved.get("train_state", {}).get("world_size", 0)
    if (m := STEP_DIR.match(path.name)) and step is not None and int(m.group(1)) != step:  # a copy, renamed
        raise CheckpointError(f"{path}: holds step {step}, not the step its name says (a copied or renamed folder)")
    if missing := [name for name in rng_files(world) if name not in listed]:
        raise CheckpointError(f"{path}: the manifest lists no {missing[0]} (a random state of one of the {world} "
                              "processes that wrote it)")
    return saved


def check_kind(path: Path) -> None:
    """CheckpointError unless `path` is a folder laid out as a checkpoint (not a run directory, a folder of
    checkpoints or a model folder); its files are not read."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path} is a run directory, not a checkpoint: name one of its checkpoints/step-* "
                              f"folders, or resume it with output_dir={path} and checkpoint.resume=auto")
    if by_step(path) and not (path / "state.json").exists():
        raise CheckpointError(f"{path} is a folder of checkpoints, not a checkpoint: name one of its step-* folders, "
                              f"or resume its run with output_dir={path.parent} and checkpoint.resume=auto")
    if (path / "tokenizer.json").is_file() and not (path / "optimizer.pt").is_file():
        raise CheckpointError(f"{path} is a model folder (such as <run>/best), which has no optimizer state to "
                              f"resume from: name a folder under <run>/checkpoints/")


def find_latest(root: Path) -> Path | None:
    """The newest checkpoint that verifies; broken or incomplete ones are skipped with a warning naming them."""
    for old in Path(root).glob(".step-*.old"):  # a crash while a step was saved again: put the earlier one back
        files.recover(old.with_name(old.name[1: -len(".old")]))
    for _, path in by_step(root):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def load_weights(path: Path, model, optimizer=None, name: str = "model.safetensors") -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(path / name))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as exc:  # Safetensor: a file cut short
        raise CheckpointError(f"{path}: cannot be loaded into this model: {exc}") from exc


def in_run(path: Path, root: Path) -> bool:
    """Whether checkpoint `path` is one of the run's own (under its checkpoints folder `root`)."""
    return path.expanduser().resolve().parent == root.resolve()


def check_compatible(saved: dict, current: dict, path: Path, only=None, branch: bool = False) -> None:
    """Refuse a resume whose identity (config.resume_identity + vocabulary) differs from the checkpoint's, naming
    every differing key. Sections are compared key by key, so a newly marked setting is checked too. `only`: the
    keys to compare, once an earlier version's identity is brought up to date (the config's, before the data's is
    known). `branch`: the checkpoint is another run's, named by checkpoint.resume."""
    saved = _upgrade_identity(saved, current, path)
    problems = []
    for key in sorted(set(saved) | set(current) if only is None else set(only)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            problems += [f"{key}.{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}"
                         for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            why = (" (the tokenized training or validation data differ: edited data, or a change in how it is "
                   "tokenized)") if key == "data_content" else ""
            problems.append(f"{key}: checkpoint {old!r}, config {new!r}{why}")
    if problems:
        advice = ("checkpoint.resume continues another run's training with its setup: it does not start training on "
                  "other data or settings (a fresh run does: checkpoint.resume=auto, the default)") if branch else \
            "Use a new output_dir for the new setup."
        raise CheckpointError(f"{path} was trained with a different setup and cannot be resumed with this config: "
                              + "; ".join(problems) + ". " + advice)


# What checkpoints of earlier versions had, where their identity lacks a key: two classes, selection by accuracy,
# no class weights, no label smoothing, no moving average, a validation carve that ignores the classes, no symbols.
_EARLIER_DEFAULTS = {"label_names": ["negative", "positive"], "model": {"members": 1},
                     "train": {"select_metric": "acc", "class_weights": "none", "label_smoothing": 0.0,
                               "ema_decay": 0.0}, "data": {"stratify": False, "symbols": False}}


def _upgrade_identity(saved: dict, current: dict, path: Path) -> dict:
    """Identities of earlier versions: the train keys at the top (before the identity was grouped by config
    section); keys added since take the value every run had before them, or the checkpoint's run's config.yaml
    has."""
    saved = dict(saved)
    if "train" not in saved and "seed" in saved:
        saved["train"] = {k: saved.pop(k) for k in ("global_batch_size", "seed")}
    for key, default in _EARLIER_DEFAULTS.items():
        if key not in current:
            continue
        if isinstance(default, dict) and isinstance(saved.get(key), dict):
            saved[key] = {k: v for k, v in default.items() if k in current[key]} | saved[key]
        else:
            saved.setdefault(key, default)
    # checkpoints of earlier versions did not record their data's content (nothing to compare it with) nor two of
    # its vocabulary settings: those as the run's config.yaml has them (nothing to compare if it has none)
    saved.setdefault("data_content", current.get("data_content"))
    if isinstance(saved.get("data"), dict) and isinstance(current.get("data"), dict):
        run = saved_settings(path.parent.parent / "config.yaml").get("data")  # <run>/checkpoints/step-N
        vocabulary = {k: current["data"][k] for k in ("min_freq", "lowercase") if k in current["data"]}
        saved["data"] = vocabulary | {k: run[k] for k in vocabulary if isinstance(run, dict) and k in run} \
            | saved["data"]
    model = saved.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained_embeddings"), str):  # the path, before
        saved["model"] = {**model, "pretrained_embeddings": bool(model["pretrained_embeddings"])}
    return saved


# --- the manager the trainer uses ------------------------------------------------------------------------------

class CheckpointManager:
    """Owns `<run>/checkpoints/` for one run: when to save, and how to restore everything (which checkpoint
    to resume from is resume.py's); and writes the run's best model to `<run>/best/`.

    `stateful` maps names to objects with state_dict()/load_state_dict() (scheduler, scaler, train state, log
    sums) that travel in state.json beside the model and optimizer files; `averaged` is the weights' moving
    average (a module, or None), saved in its own weights file; `lock`, the run's RunLock: a save during which
    another launch took the directory over is not published.
    """

    def __init__(self, run_dir: Path, cfg, accelerator, model, optimizer, stateful: dict, averaged=None, lock=None):
        self.root, self.cfg, self.acc, self.lock = Path(run_dir) / "checkpoints", cfg, accelerator, lock
        self.model, self.optimizer, self.stateful, self.averaged = model, optimizer, stateful, averaged

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def save(self, step: int, identity: dict) -> Path:
        """Collective: every process calls it. The stateful objects' state_dict() may be collective too."""
        t0 = time.perf_counter()
        state = {name: obj.state_dict() if obj is not None else None for name, obj in self.stateful.items()}
        path = save(self.root, step, self.acc, self.model, self.optimizer, {**state, "identity": identity},
                    self.cfg.keep_last, self.averaged, self.lock)
        if self.acc.is_main_process:
            log.info("checkpoint %s written in %.2f s", path.name, time.perf_counter() - t0)
        return path

    def export_best(self, model, tokenizer, cfg, meta: dict, write: bool) -> None:
        """Collective: `<run>/best/` written by the process told to `write` (export_model); every process raises
        if it could not be."""
        failure, best = None, self.root.parent / "best"
        if write:
            try:
                export_model(best, model, tokenizer, cfg, meta)
            except WriteError as exc:
                failure = exc
        fail_together(self.acc, failure, f"write {best}")

    def restore(self, path: Path, identity: dict, seed: int) -> None:
        """Load model, optimizer, every stateful object and the random streams from `path`, after checking that
        it fits this run. On another number of processes the data position carries over (the batch plan does not
        depend on it) but the per-process random streams cannot: they are re-derived and the change recorded."""
        saved = verify(path)
        check_compatible(saved["identity"], identity, path, branch=not in_run(path, self.root))
        load_weights(path, self.acc.unwrap_model(self.model), self.optimizer.optimizer)
        if self.averaged is not None:  # the identity (train.ema_decay) says the checkpoint has one
            load_weights(path, self.averaged, name=EMA_FILE)
        for name, obj in self.stateful.items():
            try:  # sealed, so written so: by a version whose state this one does not know
                if obj is not None and saved.get(name) is not None:
                    obj.load_state_dict(saved[name])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{path / 'state.json'}: its {name} cannot be restored by this version of "
                                      f"distsent ({type(exc).__name__}: {exc})") from None
        state, acc = self.stateful["train_state"], self.acc
        if state.world_size == acc.num_processes:
            rng = path / rng_file(acc.process_index)
            try:  # sealed, so written so: what this version cannot load, or holds other keys or types
                saved_rng = torch.load(rng, weights_only=True)
                set_rng_state(saved_rng, stream_seed(seed, state.step, acc.process_index))
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:  # not the GPU's
                raise CheckpointError(f"{rng}: not a random state this version can restore ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        else:
            seed_dropout(seed, state.step, acc.process_index)
            state.world_size_changes.append({"step": state.step, "old_world_size": state.world_size,
                                             "new_world_size": acc.num_processes})
            if acc.is_main_process:
                log.warning("world size changed from %d to %d at step %d: the remaining global batches of the epoch "
                            "are split over the new processes; per-process random streams (dropout) are re-derived "
                            "from (seed, step, rank), so the run is exact in data order but not bitwise",
                            state.world_size, acc.num_processes, state.step)
            state.world_size = acc.num_processes
        if acc.is_main_process:
            log.info("resumed from %s: step %d, epoch %d, %d global batches into the epoch", path, state.step,
                     state.epoch, state.batch_in_epoch)


# --- model folders (<run>/best) --------------------------------------------------------------------------------

def export_model(folder: Path, model, tokenizer, cfg, meta: dict) -> None:
    """Write a self-contained model folder (weights, tokenizer, config, meta), sealed and swapped in atomically."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with files.writing(folder, partial=tmp):  # a failed write removes the partial folder; `folder` is untouched
        tmp.mkdir(parents=True)
        files.atomic_write(tmp / "model.safetensors", _weights_bytes(model))
        files.atomic_write(tmp / "tokenizer.json", tokenizer.to_str(pretty=True))
        save_config(cfg, tmp / "config.yaml")
        files.atomic_write(tmp / "meta.json", json.dumps(meta))
        files.seal(tmp, kind="model")
        files.publish(tmp, folder)


def verify_model_folder(folder: Path) -> None:
    """Check a model folder before loading it: every file against its manifest. Folders written before model
    folders had a manifest are accepted (with a warning) if their files are present."""
    folder = Path(folder)
    files.recover(folder)
    if (folder / "optimizer.pt").is_file() and not (folder / "config.yaml").is_file():
        raise IntegrityError(f"{folder} is a training checkpoint, not a model folder: use the run's best/ (written "
                             f"at every better evaluation)")
    if folder.name == "best" and not folder.exists() and (folder.parent / "checkpoints").is_dir():  # not evaluated yet
        raise IntegrityError(f"{folder}: no such folder: the run has not evaluated yet (best/ is written at its "
                             f"first evaluation, then at every better one)")
    if (folder / files.MANIFEST).is_file() or not folder.is_dir():
        files.verify(folder, required=MODEL_FILES)
        return
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise IntegrityError(f"{folder / name}: missing (expected a model folder such as <run>/best)")
    log.warning("%s has no %s (written by an earlier version): its files cannot be checked", folder, files.MANIFEST)
