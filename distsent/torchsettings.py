"""Process-wide torch settings a run makes: its threads (the machine's cores shared among its processes, within a
Slurm allocation) and denormal flushing (build.build_accelerator: deterministic algorithms); and, at its end, each
such setting put back as it was, so that a notebook's next cell or run starts from its own."""

from __future__ import annotations

import os

import torch

from .config import ExperimentConfig
from .tracking import local_processes


def process_settings() -> dict:
    """The process-wide settings a run changes (threads, denormals, deterministic algorithms), as they are now: the
    run puts them back at its end (`restore_process_settings`), so that a notebook's next cell or run starts from
    its own. "accelerate": whether Accelerate's state was set up already (another Trainer alive in this process)."""
    from accelerate.state import AcceleratorState

    return {"threads": torch.get_num_threads(), "flush_denormal": torch.tensor([1e-40]).mul(1).item() == 0.0,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "accelerate": AcceleratorState._shared_state != {}}


def restore_process_settings(saved: dict) -> None:
    """Put back what process_settings() read, and forget the run's Accelerate state (its mixed precision) unless it
    was there before the run: a next run in this process may use another one (Accelerate refuses to change it
    otherwise). The distributed state, whose process group close_process_group() destroyed, is Accelerate's to keep."""
    from accelerate.state import AcceleratorState

    torch.set_num_threads(saved["threads"])
    torch.set_flush_denormal(saved["flush_denormal"])
    torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["warn_only"])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved["cudnn"]
    if saved["cublas"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if not saved["accelerate"]:  # set up by this run, not by another Trainer still alive in this process
        AcceleratorState._reset_state()  # what Accelerate's own test utilities call between runs


def setup_threads(cfg: ExperimentConfig) -> None:
    """Flush denormals (see TrainConfig.flush_denormal) and share the cores among this machine's processes."""
    torch.set_flush_denormal(cfg.train.flush_denormal)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cfg.train.threads or default_threads(cores, local_processes(),
                                                                os.environ.get("SLURM_CPUS_PER_TASK")))


def default_threads(cores: int, local_processes: int, slurm_cpus: str | None) -> int:
    """Threads per process: the cores this process may run on, or fewer where Slurm allocated fewer (a node
    without CPU binding lets every job see all cores: each rank then ran a thread per core against the others, 10-19x
    slower on a shared node), divided among the node's processes."""
    if slurm_cpus and slurm_cpus.isdigit():
        cores = min(cores, int(slurm_cpus))
    return max(1, cores // local_processes)
