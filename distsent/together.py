"""Processes stop together: when one process meets a clear error (bad data, a full disk), every process stops at the
same point, that one with its message and the others with one line pointing at it, not with a traceback out of
the next collective it never reached. stop_reason: how such an error is told, alike on stderr, in status.json and
in W&B."""

from __future__ import annotations

EXIT_ERROR = 2  # the exit status of a clear error in the config, the data or a checkpoint
# A KeyboardInterrupt that escapes the loop (a second Ctrl-C, or SIGINT not among dist.stop_signals): exit 130
INTERRUPTED = ("interrupted (Ctrl-C) without a checkpoint; checkpoint.resume=auto (the default) resumes from the "
               "latest one")


def is_own(exc: BaseException) -> bool:
    """An error distsent raises (its exit code and message say what to do: no traceback needed)."""
    return any(cls.__module__.startswith("distsent.") for cls in type(exc).__mro__)


def stop_reason(exc: BaseException) -> tuple[str, int]:
    """The one line and exit code of an error that stops a run: distsent's own errors carry their code (2: config,
    data or checkpoint; 3: non-finite; 74: a write), anything else (a bug, a library's error) exits 1."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, 130
    code = exc.code if isinstance(exc, SystemExit) else getattr(exc, "exit_code", 1) if is_own(exc) else 1
    code = code if isinstance(code, int) and code > 0 else 1  # sys.exit(None), say: the run did not finish
    return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), code


class PeerFailed(RuntimeError):
    """Another process stopped on an error it printed; this one stops with it, with the same exit status."""

    def __init__(self, what: str, exit_code: int = EXIT_ERROR):
        super().__init__(f"{what} (it prints its error); this process stops with it")
        self.exit_code = exit_code


_group = None
_timeout = None  # dist.timeout_s, for that group too: a new group would otherwise wait PyTorch's default 30 minutes


def set_group_timeout(seconds: int) -> None:
    global _timeout
    from datetime import timedelta

    _timeout = timedelta(seconds=seconds)


def cpu_group():
    """A gloo group for the small agreements: with NCCL they would cost a GPU sync each."""
    global _group
    import torch.distributed as dist

    if _group is None:  # created on first use, which every process reaches at the same call
        _group = (dist.group.WORLD if dist.get_backend() == "gloo" else
                  dist.new_group(backend="gloo", timeout=_timeout))
    return _group


def forget_group() -> None:
    global _group
    _group = None


def from_main(acc, value):
    """The main process's `value` on every process (collective when there are several)."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def agree(acc, stop: bool, failure: BaseException | None, what: str) -> bool:
    """Collective, one all-reduce: True if any process wants to stop. If any process has a `failure`, it is raised
    there and PeerFailed("process R could not <what>") on the others, R being the first that failed."""
    if acc.num_processes == 1:
        if failure is not None:
            raise failure
        return stop
    import torch
    import torch.distributed as dist

    # [stop, exit status of each process's failure (0: none)]
    flags = torch.zeros(acc.num_processes + 1, dtype=torch.int64)
    flags[0] = int(stop)
    if failure is not None:  # a clear error's code (2, 74, ...); anything else ends its process with 1 and a traceback
        flags[1 + acc.process_index] = stop_reason(failure)[1]
    dist.all_reduce(flags, group=cpu_group())
    if failure is not None:
        raise failure
    failed = flags[1:].nonzero()
    if len(failed):
        rank = int(failed[0])
        raise PeerFailed(f"process {rank} could not {what}", int(flags[1 + rank]))
    return bool(flags[0])


def fail_together(acc, failure: BaseException | None, what: str) -> None:
    """A barrier that raises on every process if any had a `failure` (see agree)."""
    agree(acc, False, failure, what)
