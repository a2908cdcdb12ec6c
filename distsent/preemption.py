"""Preemption: stop signals set a flag; all processes agree on it at a step boundary, checkpoint, and exit."""

from __future__ import annotations

import ctypes
import logging
import os
import signal

import torch

log = logging.getLogger(__name__)

# Exit status of a process that stopped on a signal after writing its checkpoint (EX_TEMPFAIL: try again later).
EXIT_PREEMPTED = 75
_PR_SET_PDEATHSIG = 1


class StopFlag:
    """Catches the stop signals. The handler only records the signal: saving happens in the training loop."""

    def __init__(self, signal_names: list[str]):
        self.received: int | None = None
        for name in signal_names:
            signal.signal(getattr(signal, name), self._handle)
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            self._stop_with_launcher()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: will checkpoint and stop at the next step boundary", signal.Signals(signum).name)
        self.received = signum

    @staticmethod
    def _stop_with_launcher() -> None:
        """If `accelerate launch` (torchrun) dies of a signal it does not forward, get SIGTERM instead of running on
        orphaned: the ranks then checkpoint and stop together."""
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):  # not Linux
            pass

    def agreed(self, accelerator) -> bool:
        """True on every process if any process received a stop signal (one tiny all-reduce per step)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else 1], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

