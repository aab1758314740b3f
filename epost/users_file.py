"""Rewriting one account's hash in the users file, under a lock that `epost passwd` and the
daemon (upgrading an old scrypt hash at a successful SMTP AUTH login) share, so neither
rename loses the other's change (docs/mailboxes.md)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from epost.fsutil import write_atomically
from epost.routing.users import load_users, parse_user_line, split_hash
from epost.address import Address


@contextlib.contextmanager
def users_file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on the users file's folder (the file itself is replaced by renames; a lock
    file would be one more file there)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replace_users_file(path: Path, data: bytes, mode: int) -> None:
    """Write the users file anew (atomically), its mtime always in a later second than the old file's.

    Dovecot's passwd-file re-reads the file only when its mtime (whole
    seconds) or size changes, and a changed hash of the same kind has the same
    length: a second change within the second of the last read would go
    unseen, and the old password would keep working over IMAP and POP3."""
    try:
        before = os.stat(path).st_mtime_ns // 1_000_000_000
    except FileNotFoundError:
        before = None
    write_atomically(path, data, mode=mode)
    if before is not None:
        after = os.stat(path)
        if after.st_mtime_ns // 1_000_000_000 <= before:
            os.utime(path, ns=(after.st_atime_ns, (before + 1) * 1_000_000_000))


def with_hash(data: bytes, address: Address, password_hash: str) -> bytes:
    """The users file `data` (already validated) with `address`'s hash replaced, or its line appended.

    Every other byte is kept: comments, other lines, line endings, and the
    address as the operator wrote it.
    """
    lines = data.splitlines(keepends=True)  # the same line split as read_table_lines()
    for index, raw in enumerate(lines):
        text = raw.decode("utf-8").strip()
        if text and not text.startswith("#") and parse_user_line(text).address == address:
            body = raw.rstrip(b"\r\n")
            indent = body[: len(body) - len(body.lstrip())]
            written = split_hash(text)[0].rstrip().encode("utf-8")
            lines[index] = indent + written + b":" + password_hash.encode("ascii") + raw[len(body) :]
            return b"".join(lines)
    if lines and not lines[-1].endswith((b"\n", b"\r")):
        lines[-1] += b"\n"
    lines.append(f"{address}:{password_hash}\n".encode("utf-8"))
    return b"".join(lines)


def upgrade_hash(path: Path, address: Address, password: str | bytes, old_hash: str) -> bool:
    """Replace `address`'s hash by a new one of `password` if it is still `old_hash`; True if done.
    Blocking (hashing and file I/O): run it in a thread."""
    from epost.auth import hash_password

    address = Address(address.local.lower(), address.domain)
    # A client opening several sessions logs in several times before the daemon
    # reloads the file (1.5 s): the later upgrades find the new hash here, and skip
    # the Argon2id hash (64 MiB, the auth threads' time) they would throw away.
    if load_users(path).password_hash(address) != old_hash:
        return False
    new_hash = hash_password(password)  # slow: outside the lock
    with users_file_lock(path):
        if load_users(path).password_hash(address) != old_hash:
            return False  # changed meanwhile (epost passwd): theirs wins
        data, mode = path.read_bytes(), stat.S_IMODE(path.stat().st_mode)
        replace_users_file(path, with_hash(data, address, new_hash), mode)
    return True
