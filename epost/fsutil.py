"""Crash-safe file writing shared by the spool, Maildirs, tables and TLS files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unlink_if_present(path: str | Path) -> None:
    """Remove `path`; a file already gone is what was wanted."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_owner_of(folder: str | Path, target: int | Path) -> None:
    """Run as root, give a file or folder we made the owner and group of `folder` (the one it is in).

    The daemon starts as root and only then becomes its user (twistd -u/-g):
    what it makes before that (Maildirs, the queue store) must belong to
    whoever owns the folder the operator set up, not to root.
    """
    st = os.stat(folder)
    if isinstance(target, int):
        os.fchown(target, st.st_uid, st.st_gid)
    else:
        os.chown(target, st.st_uid, st.st_gid)


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600, temp_dir: Path | None = None) -> None:
    """Temp file, fsync, rename, fsync the folder: readers and a crash see
    the old file or the whole new one, never a part. `temp_dir` (same file
    system) keeps the temp name out of folders that others scan."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=temp_dir or path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
