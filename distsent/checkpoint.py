"""Checkpoints: atomic save, verified load, latest-by-step lookup and retention.

Layout of `<run>/checkpoints/step-NNNNNNNN/`:
  model.safetensors   model weights (the same on every process under DDP, written once)
  optimizer.pt        optimizer state (tensors and numbers only: loaded with torch.load(weights_only=True))
  rng-rankNNNNN.pt    each process's python / numpy / torch (/ CUDA) random states
  state.json          train state: step, epoch, global batches done in the epoch, best metric, scheduler, scaler,
                      world size, tracker run id, and what a resume must keep unchanged (model shape, vocabulary)
  manifest.json       written last: size and sha256 of every file above; a folder without it is incomplete
A checkpoint is written under `.tmp-step-NNNNNNNN/` and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupted, or does not fit this run; the message names it."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- random states ---------------------------------------------------------------------------------------------

def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                                 has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save ------------------------------------------------------------------------------------------------------

def save(root: Path, step: int, accelerator, model, optimizer, state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` collectively (every process calls this) and prune old ones; returns its path."""
    final, tmp = step_dir(root, step), root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index:05d}.pt")
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()  # every rank's files are in place
    if accelerator.is_main_process:
        files = sorted(p for p in tmp.iterdir() if p.name != MANIFEST)
        for p in files:
            _fsync(p)
        manifest = {"step": step, "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        if final.exists():  # the same step saved again (e.g. an epoch end that is also a periodic step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of interrupted writes."""
    complete = [p for _, p in _by_step(root) if (p / MANIFEST).is_file()]
    for old in complete[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    newest = _by_step(root)[0][0] if complete else -1
    for tmp in root.glob(".tmp-step-*"):
        if int(tmp.name.rsplit("-", 1)[1]) <= newest:
            shutil.rmtree(tmp, ignore_errors=True)


def _by_step(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders, newest step first (by the number in the name, never by file times)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


# --- verify and load -------------------------------------------------------------------------------------------

def verify(path: Path) -> dict:
    """The checkpoint's state.json, after checking every file against the manifest; CheckpointError if not."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete (no {MANIFEST}: the write was interrupted)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / MANIFEST}: unreadable ({exc})") from None
    for name, meta in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: content does not match its checksum (corrupted)")
    for needed in ("model.safetensors", "optimizer.pt", "state.json"):
        if needed not in manifest.get("files", {}):
            raise CheckpointError(f"{path}: the manifest lists no {needed}")
    return json.loads((path / "state.json").read_text())


def find_latest(root: Path) -> Path | None:
    """The newest checkpoint that verifies; broken or incomplete ones are skipped with a warning naming them."""
    for _, path in _by_step(root):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def load_weights(path: Path, model, optimizer) -> None:
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(path / "model.safetensors"))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot be loaded into this model: {exc}") from exc


def load_rng(path: Path, rank: int) -> None:
    set_rng_state(torch.load(path / f"rng-rank{rank:05d}.pt", weights_only=True))


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    """Refuse a resume whose config changes what the checkpoint's weights or data position mean."""
    problems = []
    for key in ("model", "vocab_sha256", "global_batch_size", "seed", "data"):
        if saved.get(key) != current.get(key):
            if isinstance(saved.get(key), dict) and isinstance(current.get(key), dict):
                for k in sorted(set(saved[key]) | set(current[key])):
                    if saved[key].get(k) != current[key].get(k):
                        problems.append(f"{key}.{k}: checkpoint {saved[key].get(k)!r}, config {current[key].get(k)!r}")
            else:
                problems.append(f"{key}: checkpoint {saved.get(key)!r}, config {current.get(key)!r}")
    if problems:
        raise CheckpointError(f"{path} was trained with a different setup and cannot be resumed with this config: "
                              + "; ".join(problems) + ". Use a new output_dir or checkpoint.resume=never.")
