"""Maildir delivery (SPEC §7): a reader only ever sees complete messages in ``new/``."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from epost.fsutil import fsync_dir, take_owner_of, unlink_if_present

CHUNK = 64 * 1024

# Part of every file name: with the time and pid it keeps names unique within this process.
_deliveries = itertools.count()
# Maildirs seen complete in this process: spares three stat calls per delivery.
_known_maildirs: set[Path] = set()


class MaildirBatch:
    """Several Maildir deliveries made durable together.

    `add` writes each message to its Maildir's tmp/; `commit` then fsyncs
    them all, renames each into new/ and fsyncs each new/ once, so the file
    system can commit the whole batch in one journal transaction. Blocking:
    run it in a thread.
    """

    def __init__(self, hostname: str):
        self.hostname = hostname
        self._staged: list[tuple[Path, str, int, int]] = []  # maildir, tmp name, fd, size

    def add(self, maildir: Path, content: Path | bytes, prefix: bytes = b"") -> int:
        """Stage one delivery of `content` (a spool file, or its bytes when
        they are at hand); returns its index for `commit`'s results. Raises on
        error, leaving nothing."""
        if maildir not in _known_maildirs:
            for sub in ("tmp", "new", "cur"):
                _make_dir_durably(maildir / sub)
            _known_maildirs.add(maildir)
        name, fd = _create_unique(f"{maildir}/tmp", self.hostname)
        try:
            if os.geteuid() == 0:
                take_owner_of(f"{maildir}/tmp", fd)
            size = 0
            with contextlib.ExitStack() as stack:
                if isinstance(content, bytes):
                    chunks = [prefix, content]
                else:
                    src = stack.enter_context(open(content, "rb"))
                    chunks = itertools.chain([prefix], iter(lambda: src.read(CHUNK), b""))
                for piece in crlf_to_lf(chunks):
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view) :]
                    size += len(piece)
        except BaseException:
            os.close(fd)
            unlink_if_present(f"{maildir}/tmp/{name}")
            raise
        self._staged.append((maildir, name, fd, size))
        return len(self._staged) - 1

    def commit(self) -> list[str | Exception]:
        """Per staged delivery, its file name in new/ or the error that undid it."""
        results: list[str | Exception] = []
        for maildir, name, fd, size in self._staged:
            try:
                os.fsync(fd)
                final = f"{name},S={size}"
                os.rename(f"{maildir}/tmp/{name}", f"{maildir}/new/{final}")
                results.append(final)
            except OSError as e:
                unlink_if_present(f"{maildir}/tmp/{name}")
                results.append(e)
            finally:
                os.close(fd)
        for maildir in {m for m, *_ in self._staged}:
            try:
                fsync_dir(maildir / "new")
            except OSError as e:
                # A rename whose folder fsync failed may not survive a crash; undo it so a retry is not a duplicate.
                for i, (m, *_) in enumerate(self._staged):
                    if m == maildir and isinstance(results[i], str):
                        (maildir / "new" / results[i]).unlink(missing_ok=True)
                        results[i] = e
        self._staged = []
        return results


def deliver_to_maildir(maildir: Path, content_path: Path, *, hostname: str, prefix: bytes = b"") -> str:
    """Store ``prefix`` + the spooled content in ``maildir/new/`` with LF line endings; return the file name.

    Blocking (run it in a thread).  On error nothing is left behind and the error is raised.
    """
    batch = MaildirBatch(hostname)
    batch.add(maildir, content_path, prefix)
    (result,) = batch.commit()
    if isinstance(result, Exception):
        raise result
    return result


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


def _create_unique(folder: str, hostname: str) -> tuple[str, int]:
    """A name in the Maildir convention, ``<sec>.M<usec>P<pid>Q<n>.<host>``, created with O_EXCL."""
    host = hostname.replace("/", r"\057").replace(":", r"\072")
    while True:
        now = time.time_ns() // 1000
        name = f"{now // 1_000_000}.M{now % 1_000_000}P{os.getpid()}Q{next(_deliveries)}.{host}"
        try:
            return name, os.open(f"{folder}/{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
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
    if os.geteuid() == 0:  # Dovecot refuses uid 0: Maildirs belong to the owner of <spool>/mailboxes (docs/mailboxes.md)
        take_owner_of(path.parent, path)
    fsync_dir(path.parent)

