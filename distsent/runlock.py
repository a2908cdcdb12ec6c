"""One live run per run directory: `<run>/run.lock` names its owner and is kept fresh by a heartbeat; a second launch
is refused before it writes anything, and a lock left by a dead run is taken over.

Advisory file locks (flock) are not reliable across hosts on shared filesystems such as NFS, so liveness is read
from the heartbeat: a lock whose heartbeat is older than `stale_s` belongs to a dead run. Sooner than that, a lock
is also known dead when it was written on this host by a process that no longer exists, or on another host by an
earlier attempt of the same Slurm job (a requeued job runs again under its id).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from .files import WriteError, atomic_write, writing

log = logging.getLogger(__name__)

LOCK = "run.lock"
TAKEOVER_SETTLE_S = 0.25  # a lock taken over is read back after this long: a write of another launch at once


class RunLockedError(RuntimeError):
    """The run directory belongs to a live run; the message names it and how to proceed."""

    exit_code = 2  # carried to the other processes by together.agree


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _pid_namespace() -> int:
    """This process's pid namespace (containers on one host may each have their own), 0 where unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class RunLock:
    def __init__(self, run_dir: Path, heartbeat_s: float = 10.0, stale_s: float = 60.0):
        self.path, self.heartbeat_s, self.stale_s = Path(run_dir) / LOCK, heartbeat_s, stale_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
                   "started": time.time(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                   "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "") or 0)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: RunLockedError | None = None  # set by the heartbeat if another launch took the directory over

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            try:  # being created by another launch this instant, or damaged: its age is its file's
                return {"heartbeat": self.path.stat().st_mtime}
            except OSError:
                return None

    def _why_dead(self, held: dict) -> str | None:
        """Why the holder of `held` is known to be gone, or None if it may be alive."""
        age = time.time() - held.get("heartbeat", 0)
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old"
        # its process can be looked up, whatever job it ran in, where pids mean the same: this host, and not another
        # container's pid namespace on it (locks of earlier versions name no namespace)
        if (held.get("host"), held.get("pid_namespace", self.me["pid_namespace"])) == (
                self.me["host"], self.me["pid_namespace"]):
            if held.get("pid") == self.me["pid"]:  # pids are unique here: the process that held it is gone
                return f"its pid {held['pid']} is this process's own"
            return None if _pid_alive(held.get("pid", -1)) else f"its process {held.get('pid')} on this host is gone"
        if held.get("slurm_job_id") and held["slurm_job_id"] == self.me["slurm_job_id"] and \
                held.get("slurm_restart", -1) < self.me["slurm_restart"]:
            # on another host: a requeued job runs again under its id with a higher restart count (a second launch
            # within one allocation has the same count: a live run; locks of earlier versions name no count)
            return f"it is an earlier attempt of this Slurm job ({held['slurm_job_id']})"
        return None

    def live_owner(self) -> dict | None:
        """The lock's content if a live run other than this process holds it, else None."""
        held = self._read()
        return held if held is not None and self._why_dead(held) is None else None

    def acquire(self) -> None:
        """Take the lock, or RunLockedError naming the live owner; WriteError if it cannot be written (a full
        disk, a read-only filesystem), leaving no empty lock behind to refuse the next launch."""
        held = self._read()
        if held is not None:
            why = self._why_dead(held)
            if why is None:
                age = time.time() - held.get("heartbeat", 0)
                if "pid" not in held:  # no owner to name: a launch writing it this instant, or killed as it did
                    raise RunLockedError(
                        f"{self.path} names no run (empty or unreadable, written {age:.0f} s ago: a launch taking "
                        f"it this instant, or one killed as it did); it is taken over once {self.stale_s:.0f} s "
                        f"old, or delete it if no run is starting there.")
                job = f", Slurm job {held['slurm_job_id']}" if held.get("slurm_job_id") else ""
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
                raise RunLockedError(
                    f"{self.path.parent} is in use by a live run (host {held.get('host')}, pid {held.get('pid')}"
                    f"{job}, started {started}, heartbeat {age:.0f} s ago). Wait for it to end, stop it (it "
                    f"checkpoints, and this command then resumes it), or choose another output_dir. If that run "
                    f"is dead, its lock is taken over once the heartbeat is {self.stale_s:.0f} s old, or delete "
                    f"{self.path}.")
            log.warning("taking over %s from a run that ended without releasing it: %s", self.path, why)
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if held is None:  # created exclusively: of two launches at the same instant, one wins
                try:
                    os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return self.acquire()  # the other launch won: refused now that its lock is there
        try:
            self._write()
        except WriteError:
            if held is None:  # the empty file just created would pass for a live run's for stale_s
                with contextlib.suppress(OSError):
                    self.path.unlink()
            raise
        if held is not None:  # a takeover: two launches may take over one dead run's lock at once, the last write
            time.sleep(TAKEOVER_SETTLE_S)  # wins; the other sees it here and is refused as by any live run
            if not self._mine(self._read() or {}):
                return self.acquire()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _mine(self, held: dict) -> bool:  # the start time too: containers on one host may share a pid (1, say)
        return (held.get("host"), held.get("pid"), held.get("started")) == (
            self.me["host"], self.me["pid"], self.me["started"])

    def _write(self) -> None:
        atomic_write(self.path, json.dumps({**self.me, "heartbeat": time.time()}))

    def check(self) -> RunLockedError | None:
        """`lost`, read from the lock file now rather than at the next heartbeat (a process just back from a stall
        has not had one yet); None while this process holds the lock, or never took it (the other processes)."""
        if self.lost is None and self._thread is not None:
            held = self._read() or {}
            if "pid" in held and not self._mine(held):
                # this process was stalled (suspended, stopped) past stale_s and another launch took the run over:
                # refreshing would make two runs write one directory; the trainer writes nothing more and stops at
                # the end of its step or of its test evaluation, and a checkpoint being written is not published
                self.lost = RunLockedError(
                    f"{self.path.parent} was taken over by another launch (host {held.get('host')}, pid "
                    f"{held['pid']}) while this process was stalled for over {self.stale_s:.0f} s, or as both took "
                    f"over a dead run's lock; this process stops without writing anything more there")
        return self.lost

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.check() is not None:
                return
            try:
                self._write()
            except OSError as exc:  # a full disk must not kill the run; a stale heartbeat only risks a takeover
                log.warning("could not refresh %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._mine(self._read() or {}):
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:  # released while an error is on its way: that error is the one to report
                log.warning("could not remove %s: %s (a later run takes it over once this process is gone)",
                            self.path, exc)
