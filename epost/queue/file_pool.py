"""Emptied spool files, kept in ``<spool>/free/`` and reused for new messages.

Why: a queue that creates and deletes two files per message makes the file
system allocate and free two inodes per message. On ext4 without a journal
(the VMs we benchmark on) every inode allocation skips, one buffer lookup
each, the free inodes of its group deleted in the last one to six minutes;
under a few hundred messages a second that scan made a file creation cost
half a millisecond of CPU and dominated the spool's cost. Renaming a used
file out of the queue and back in later allocates and frees nothing, on any
file system.

Safe across processes: a file is claimed by renaming it away, which exactly
one claimant can do; the others get ENOENT and try the next name. A reused
file is overwritten from offset 0 and cut to the new length (``finish``)
before its fsync, so stale bytes never reach a queue. Files bigger than
``max_size`` are deleted instead of kept: the pool never hoards disk, and a
big message streamed from an open descriptor (the courier's producer) is
never reused under its reader.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FOLDER = "free"


class FilePool:
    def __init__(self, folder: Path, *, limit: int = 2048, max_size: int = 256 * 1024, relist_every: float = 1.0):
        self.folder = Path(folder)
        self._prefix = f"{folder}/"  # strings, not Paths: this runs for every message
        self.limit = limit  # files this process keeps; beyond it, released files are deleted
        self.max_size = max_size
        self._relist_every = relist_every
        self._names: list[str] = []  # believed to be in the folder (other processes may take them)
        self._listed_at = float("-inf")

    def create(self, path: str | Path) -> int:
        """A descriptor open for writing at `path`: a reused file when there is one, else a new file (O_EXCL).

        Call `finish` after the last write: a reused file may be longer."""
        while True:
            name = self._take_name()
            if name is None:
                return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.rename(self._prefix + name, path)
            except FileNotFoundError:
                continue  # another process took it first
            return os.open(path, os.O_WRONLY)

    @staticmethod
    def finish(fd: int) -> None:
        """Cut the file at the current write offset (what this writer wrote)."""
        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))

    def release(self, path: str | Path) -> None:
        """Take `path` out of its folder: into the pool, or deleted when the pool is full or it is big.

        Like an unlink, a missing file is not an error."""
        if len(self._names) >= self.limit:
            self._relist()  # other processes may have taken some
        try:
            if len(self._names) < self.limit and os.stat(path).st_size <= self.max_size:
                name = os.path.basename(path)
                try:
                    os.rename(path, self._prefix + name)
                    self._names.append(name)
                    return
                except FileNotFoundError:
                    pass  # no pool folder (a spool from before it): delete instead
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _take_name(self) -> str | None:
        if not self._names:
            self._relist()
        return self._names.pop() if self._names else None

    def _relist(self) -> None:
        """Read the folder again, at most every `relist_every` seconds."""
        now = time.monotonic()
        if now - self._listed_at < self._relist_every:
            return
        self._listed_at = now
        try:
            self._names = os.listdir(self.folder)
        except FileNotFoundError:
            self._names = []
