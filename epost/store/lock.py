"""One daemon per spool: an exclusive `flock` on `<spool>/lock`.

The daemon takes it before anything touches the spool and keeps the file
open for its whole life. The lock belongs to the open file description, so
it survives twistd's daemonizing forks (the parent's exit closes only its
own descriptor), and the kernel drops it when the last holder dies: unlike
a PID file, no dead daemon, zombie or reused PID can leave it behind.

`epost` commands that change the queue take the same lock, without
waiting, before they work on the queue store: they do so only while no daemon
runs (see `epost.admin.surgery_commands`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_NAME = "lock"


class SpoolBusy(Exception):
    """Another process holds the spool's lock."""

    def __init__(self, path: Path, holder: int | None):
        self.path, self.holder = path, holder
        who = f"process {holder}" if holder else "another process"
        super().__init__(f"{path}: locked by {who}: another epost daemon (or an `epost` command) is using this spool")


def lock_path(spool: Path) -> Path:
    return Path(spool) / LOCK_NAME


class SpoolLock:
    """A held lock; `release()` is for tests and for `epost` commands (a daemon keeps it until it exits)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, spool: Path, create_spool: bool = False) -> SpoolLock:
        """Take the lock without waiting; SpoolBusy when it is held, OSError when the file cannot be opened."""
        path = lock_path(spool)
        if create_spool:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:  # made by another user (root, or the daemon's): reading is enough for flock
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _recorded_pid(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolBusy(path, holder) from None
            raise
        lock = cls(fd, path)
        lock.record_pid()
        return lock

    def record_pid(self) -> None:
        """Write our PID into the file, for the refusal message of the next comer (the
        daemon calls this again after twistd's fork). Best effort: the lock is the flock."""
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # opened read-only
            pass

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing our only descriptor drops the flock
            self.fd = -1


def try_lock(spool: Path) -> SpoolLock | None:
    """The lock if nobody holds it, else None (a non-blocking flock attempt)."""
    try:
        return SpoolLock.acquire(spool)
    except SpoolBusy:
        return None


def _recorded_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
