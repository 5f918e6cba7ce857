"""One job per run directory: an exclusive flock on <run>/train.lock for the job's life.

Two jobs writing one run directory (a second `limoe train --resume latest`
while the first one's ranks still run) would interleave checkpoints, metrics
and `latest`. `limoe train` takes the lock before it writes anything and
hands the open lock file to the deepspeed launcher process it starts, which
lives until the ranks have exited: the lock holds for the job's life even if
`limoe train` itself is killed. A job started without `limoe train` (the
printed deepspeed command run by hand, one launcher per node under SLURM)
is locked by its rank 0 instead; `HELD_ENV` tells rank 0 when `limoe train`
already holds it.

The kernel releases an flock when the last process holding it exits, so a
lock left by a job that was killed (even with SIGKILL) never blocks the next
one. The file itself stays, with the last holder's pid, host and start time,
which is what a refused job is told.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

LOCK_FILE = "train.lock"
HELD_ENV = "LIMOE_RUN_LOCK"  # set by `limoe train` for its ranks: the lock file it holds


class RunDirectoryBusy(RuntimeError):
    """Another live job holds the run directory's lock; the message names it.
    (Standard library only here: a lock must be quick to take; `limoe train` reports it as a ConfigError.)"""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another job (it has not written its name yet)"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')} ({info.get('command')})"


class RunLock:
    """`RunLock(run_dir).acquire()` or raise RunDirectoryBusy; `release()` (or process exit) frees it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def _busy(self, fd: int) -> RunDirectoryBusy:
        return RunDirectoryBusy(f"'name': run directory {self.run_dir} is in use by {_holder(fd)}; wait for that "
                                f"job to end, or pick another --name (lock file {self.path})")

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = self._busy(fd)
            os.close(fd)
            raise error from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def check(self) -> None:
        """Raise RunDirectoryBusy if a live job holds the lock; take nothing and write nothing (--dry-run)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(fd) from None
        finally:
            os.close(fd)  # closing our only descriptor drops the shared lock we may have taken

    def release(self) -> None:
        """Close our descriptor. A child given it (`pass_fds`) keeps the lock until it exits too."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def is_held_by_parent(self) -> bool:
        """Did `limoe train` take this lock for us (HELD_ENV names this lock file)?"""
        held = os.environ.get(HELD_ENV)
        return held is not None and Path(held).resolve() == self.path.resolve()
