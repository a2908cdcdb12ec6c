"""Each process's random states (python, numpy, torch, its own GPU's), saved in checkpoints and restored on resume,
and the per-process streams derived from (seed, step, rank) where no saved state fits."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                                 has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own GPU alone (Accelerate has made it the current device): every process sees all of its
        # node's GPUs, and a resume with another number of GPUs per node must not restore states by device number
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, stream: int) -> None:
    """Restore one process's saved random states. `stream` (stream_seed()) seeds its GPU where the checkpoint holds
    no state for it: written on a CPU, or by an earlier version with another number of GPUs per node."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = state.get("cuda")
        if isinstance(cuda, list):  # earlier versions saved every visible GPU's state, by device number
            cuda = cuda[torch.cuda.current_device()] if len(cuda) == torch.cuda.device_count() else None
        if cuda is None:
            torch.cuda.manual_seed(stream)
        else:
            torch.cuda.set_rng_state(cuda)


def stream_seed(seed: int, step: int, rank: int) -> int:
    """A process's random stream seed derived from (seed, step, rank)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little")


def seed_dropout(seed: int, step: int, rank: int) -> None:
    """Per-process random stream re-derived from (seed, step, rank): used at the start, and after a resume on a
    different number of processes, where saved per-process streams cannot map onto the new processes."""
    torch.manual_seed(stream_seed(seed, step, rank))
