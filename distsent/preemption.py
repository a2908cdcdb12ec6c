"""Preemption: stop signals set a flag; all processes agree on it at a step boundary, checkpoint, and exit."""

from __future__ import annotations

import ctypes
import logging
import os
import signal

from .together import agree

log = logging.getLogger(__name__)

# Exit status of a process that stopped on a signal after writing its checkpoint (EX_TEMPFAIL: try again later).
EXIT_PREEMPTED = 75
_PR_SET_PDEATHSIG = 1


class Preempted(SystemExit):
    """The run stopped on a signal after writing its checkpoint (exit status 75)."""

    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


class StopFlag:
    """Catches the stop signals. The handler only records the signal: saving happens in the training loop."""

    def __init__(self, signal_names: list[str]):
        self.received: int | None = None
        # a process started with Ctrl-C ignored (a shell's background job) or the hang-up ignored (nohup) keeps
        # ignoring it (under torchrun it is not: torchrun handles both itself and forwards them)
        self.signals = [s for s in (getattr(signal, name) for name in signal_names)
                        if not (s in (signal.SIGINT, signal.SIGHUP) and signal.getsignal(s) == signal.SIG_IGN)]
        self.previous = {s: signal.getsignal(s) for s in self.signals}  # put back by restore()
        for signum in self.signals:
            signal.signal(signum, self._handle)
        if _started_by_launcher():
            self._stop_with_launcher()

    def restore(self) -> None:
        """The handlers from before (a Python session that trained gets its Ctrl-C back)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def ignore(self) -> None:
        """From now on the stop signals do nothing (the process is already stopping)."""
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            again = " (Ctrl-C again: stop at once, without a checkpoint)" if signum == signal.SIGINT else ""
            log.warning("received %s: will checkpoint and stop at the next step boundary%s",
                        signal.Signals(signum).name, again)
        if signum == signal.SIGINT:  # the next Ctrl-C does what it did before: KeyboardInterrupt in Python
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT] or signal.SIG_DFL)
        self.received = signum

    @staticmethod
    def _stop_with_launcher() -> None:
        """If the launcher dies of a signal it does not forward, get SIGTERM instead of running on orphaned: the
        ranks then checkpoint and stop together. (`accelerate launch` with one process forwards no signal at all;
        torchrun forwards only those in PET_SIGNALS_TO_HANDLE.)"""
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):  # not Linux
            pass

    def agreed(self, accelerator, failure: BaseException | None = None, what: str = "") -> bool:
        """True on every process if any process received a stop signal; one tiny all-reduce per step (on the CPU
        over gloo: with NCCL it would force a GPU sync every step). It also carries a write `failure` that happened
        on one process since the last step, raised there and as PeerFailed on the others (together.agree)."""
        return agree(accelerator, self.received is not None, failure, what)


def _started_by_launcher() -> bool:
    """Under `accelerate launch` or torchrun (not a plain shell, where `nohup` users expect to outlive it)."""
    # torchrun sets the first; `accelerate launch` with one process (no torchrun) sets the second, whatever its
    # options. Not any ACCELERATE_* name: users set some (ACCELERATE_LOG_LEVEL) in their shells.
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ
