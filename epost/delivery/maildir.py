"""Maildir delivery (SPEC §7): a reader only ever sees complete messages in ``new/``."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from epost.fsutil import fsync_dir

CHUNK = 64 * 1024

# Part of every file name: with the time and pid it keeps names unique within this process.
_deliveries = itertools.count()


def deliver_to_maildir(maildir: Path, content_path: Path, *, hostname: str, prefix: bytes = b"") -> str:
    """Store ``prefix`` + the spooled content in ``maildir/new/`` with LF line endings; return the file name.

    Blocking (run it in a thread).  On error nothing is left behind and the error is raised.
    """
    for sub in ("tmp", "new", "cur"):
        _make_dir_durably(maildir / sub)
    name, fd = _create_unique(maildir / "tmp", hostname)
    tmp_path = maildir / "tmp" / name
    new_path: Path | None = None
    try:
        with open(fd, "wb") as out, open(content_path, "rb") as src:
            size = 0
            for piece in crlf_to_lf(itertools.chain([prefix], iter(lambda: src.read(CHUNK), b""))):
                out.write(piece)
                size += len(piece)
            out.flush()
            os.fsync(out.fileno())
        name = f"{name},S={size}"
        new_path = maildir / "new" / name
        os.rename(tmp_path, new_path)
        fsync_dir(maildir / "new")
    except BaseException:
        # A rename whose folder fsync failed may not survive a crash; undo it so a retry is not a duplicate.
        for path in (tmp_path, new_path):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
        raise
    return name


def crlf_to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Turn CRLF into LF across a stream of chunks, also when a CRLF is split between two of them."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        carry = b"\r" if data.endswith(b"\r") else b""
        if carry:
            data = data[:-1]
        if data:
            yield data.replace(b"\r\n", b"\n")
    if carry:
        yield carry


def _create_unique(folder: Path, hostname: str) -> tuple[str, int]:
    """A name in the Maildir convention, ``<sec>.M<usec>P<pid>Q<n>.<host>``, created with O_EXCL."""
    host = hostname.replace("/", r"\057").replace(":", r"\072")
    while True:
        now = time.time_ns() // 1000
        name = f"{now // 1_000_000}.M{now % 1_000_000}P{os.getpid()}Q{next(_deliveries)}.{host}"
        try:
            return name, os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            continue


def _make_dir_durably(path: Path) -> None:
    """mkdir -p that fsyncs each parent it changes, so a new mailbox survives a crash."""
    if path.is_dir():
        return
    _make_dir_durably(path.parent)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    fsync_dir(path.parent)
