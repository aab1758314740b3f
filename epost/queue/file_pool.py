"""Emptied spool files, kept in ``<spool>/free/`` and reused for new messages.

Why: a queue that creates and deletes two files per message makes the file
system allocate and free two inodes per message. On ext4 without a journal
(the VMs we benchmark on) every inode allocation skips, one buffer lookup
each, the free inodes of its group deleted in the last one to six minutes;
under a few hundred messages a second that scan made a file creation cost
half a millisecond of CPU and dominated the spool's cost. Renaming a used
file out of the queue and back in later allocates and frees nothing, on any
file system.

What keeps it safe:
- A file is claimed by renaming it away, which exactly one claimant can do;
  the others get ENOENT and try the next name. So no two processes (or
  threads) ever write one file.
- A file is handed out only from a listing of the folder, and only after
  the folders files are released from were fsynced. So once a file is reused,
  no crash can bring back its old queue name (which would resurrect the old
  message holding the new one's bytes). Releases cost no fsync of their own:
  one round per listing, at most one listing a second, serves them all.
- Every release gets a name of its own in the pool, never the queue name:
  a message's envelope is released once per move and again at the end, and
  one name reused would put a file released after a listing under a name
  the listing holds, reusable before its old folder was fsynced.
- A claim's rename out of the pool is made durable only with the pool's
  next listing, so on a file system without a journal a crash can leave a
  queued file also linked in the pool (fsck counts both links). A file
  with more than one link is therefore never written: its pool name is
  dropped and the queued name keeps it.
- A reused file is overwritten from offset 0 and cut to the new length
  (``finish``) before its fsync, so stale bytes never reach a queue.
- A message's files are released only when nothing reads them: the manager
  never lets a message go while an attempt for it runs.
- Files over ``max_size`` are deleted rather than kept, and the folder holds
  about ``limit`` files at most: at most ``limit * max_size`` bytes, usually
  a few MiB. A deleted message's bytes stay in its file until it is reused,
  as they stay in the blocks of an unlinked file.

Where the pool is empty, or its folder is missing (a spool made before it),
files are created (O_EXCL) and deleted as before. A reused file does not
carry O_EXCL's guarantee that `path` is new: that rests on queue IDs being
unique, which the daemon alone makes.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from twisted.logger import Logger

from epost.fsutil import fsync_dir

FOLDER = "free"

log = Logger()
_releases = itertools.count()  # with the time and pid, a name of its own for every release


class FilePool:
    def __init__(
        self,
        folder: Path,
        sources: Iterable[Path] = (),
        *,
        limit: int = 2048,
        max_size: int = 128 * 1024,
        relist_every: float = 1.0,
    ):
        """`sources`: the folders files are released from (fsynced before each listing)."""
        self.folder = Path(folder)
        self.sources = [Path(source) for source in sources]
        self._prefix = f"{folder}/"  # strings, not Paths: this runs for every message
        self.limit = limit
        self.max_size = max_size
        self._relist_every = relist_every
        # From the last listing, by suffix (".env", ".msg"); other processes may take them first.
        self._names: dict[str, list[str]] = {}
        self._held = 0  # files in the folder by the last listing and our releases since
        self._listed_at = self._counted_at = float("-inf")
        self._lock = threading.Lock()  # the daemon's Spool is used from the reactor and its threads

    def create(self, path: str | Path) -> int:
        """A descriptor open for writing at `path`: a reused file when there is one, else a new file (O_EXCL).

        Call `finish` after the last write: a reused file may be longer."""
        while True:
            name = self._take_name(os.path.splitext(path)[1])
            if name is None:
                return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.rename(self._prefix + name, path)
            except FileNotFoundError:
                continue  # another process took it first
            fd = os.open(path, os.O_WRONLY)
            if os.fstat(fd).st_nlink == 1:
                return fd
            os.close(fd)  # still queued under another name (see above): drop only our link to it
            os.unlink(path)
            log.warn("{name}: a spare spool file still queued under another name; left to it", name=name)

    @staticmethod
    def finish(fd: int) -> None:
        """Cut the file at the current write offset (what this writer wrote),
        if it is longer: a needless truncate costs a metadata write at fsync."""
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if os.fstat(fd).st_size > end:
            os.ftruncate(fd, end)

    def release(self, path: str | Path) -> None:
        """Take `path` out of its folder: into the pool, or deleted when the pool is full or it is big.

        Like an unlink, a missing file is not an error."""
        try:
            if os.stat(path).st_size <= self.max_size and self._make_room():
                name = f"{time.time_ns()}.{os.getpid()}.{next(_releases)}{os.path.splitext(path)[1]}"
                try:
                    os.rename(path, self._prefix + name)
                    return
                except FileNotFoundError:
                    pass  # no pool folder: delete instead
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _make_room(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if self._held >= self.limit and now - self._counted_at >= self._relist_every:
                # Other processes may have taken some. Counting needs no fsync
                # (only handing names out does): the daemon, which only
                # releases, never fsyncs folders on the reactor for this.
                self._counted_at = now
                try:
                    self._held = len(os.listdir(self.folder))
                except FileNotFoundError:
                    self._held = 0
            if self._held >= self.limit:
                return False
            self._held += 1
            return True

    def _take_name(self, suffix: str = "") -> str | None:
        """A name released with the same suffix if there is one, else any: an
        envelope reusing an envelope keeps its one block, where a content file
        cut to an envelope's size would free blocks and an envelope grown into
        content would allocate them (bitmap writes at each fsync)."""
        with self._lock:
            if not any(self._names.values()):
                self._relist()
            names = self._names.get(suffix) or next((n for n in self._names.values() if n), None)
            if not names:
                return None
            self._held -= 1
            return names.pop()

    def _relist(self) -> None:
        """Read the pool's folder, then fsync it and the source folders, so
        every name listed is durably gone from where it was released; at
        most every `relist_every` seconds."""
        now = time.monotonic()
        if now - self._listed_at < self._relist_every:
            return
        self._listed_at = now
        try:
            names = os.listdir(self.folder)
            for folder in (*self.sources, self.folder):
                fsync_dir(folder)
        except FileNotFoundError:
            names = []
        # Shuffled: the workers list the same folder, and taking names in one
        # order made them race for the same files (a failed rename each).
        random.shuffle(names)
        self._names = {}
        for name in names:
            self._names.setdefault(os.path.splitext(name)[1], []).append(name)
        self._held = len(names)
