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
from epost.routing.users import load_users
from epost.smtp.address import Address


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


def upgrade_hash(path: Path, address: Address, password: str | bytes, old_hash: str) -> bool:
    """Replace `address`'s hash by a new one of `password` if it is still `old_hash`; True if done.
    Blocking (hashing and file I/O): run it in a thread."""
    from epost.admin.cli import _with_hash  # the one line-preserving rewrite, as `epost passwd` does it
    from epost.auth import hash_password

    address = Address(address.local.lower(), address.domain)
    new_hash = hash_password(password)  # slow: outside the lock
    with users_file_lock(path):
        if load_users(path).password_hash(address) != old_hash:
            return False  # changed meanwhile (epost passwd): theirs wins
        data, mode = path.read_bytes(), stat.S_IMODE(path.stat().st_mode)
        replace_users_file(path, _with_hash(data, address, new_hash), mode)
    return True
