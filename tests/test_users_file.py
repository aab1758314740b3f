"""Upgrading an old scrypt hash in the users file (issue 17, docs/mailboxes.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from epost import auth
from epost.address import parse_mailbox
from epost.users_file import upgrade_hash


@pytest.fixture(autouse=True)
def _cheap(monkeypatch):
    monkeypatch.setattr(auth, "SCRYPT_LOG2_N", 4)
    monkeypatch.setattr(auth, "ARGON2_TIME_COST", 1)
    monkeypatch.setattr(auth, "ARGON2_MEMORY_KIB", 64)


def test_old_hash_is_replaced_by_argon2id_and_everything_else_is_kept(tmp_path: Path):
    old = auth.hash_password_scrypt("pw")
    users = tmp_path / "users"
    users.write_bytes(f"# accounts\r\nAlice@Example.TEST:{old}\r\nbob@example.test\r\n".encode())
    users.chmod(0o640)

    assert upgrade_hash(users, parse_mailbox("alice@example.test"), "pw", old)

    lines = users.read_bytes().split(b"\r\n")
    assert lines[0] == b"# accounts" and lines[2] == b"bob@example.test"
    address, _, new = lines[1].decode().partition(":")
    assert address == "Alice@Example.TEST" and new.startswith("{ARGON2ID}") and auth.verify_password("pw", new)
    assert users.stat().st_mode & 0o777 == 0o640


def test_a_hash_changed_meanwhile_is_left_alone(tmp_path: Path):
    users = tmp_path / "users"
    newer = auth.hash_password("set by epost passwd")
    users.write_text(f"alice@example.test:{newer}\n")

    assert not upgrade_hash(users, parse_mailbox("alice@example.test"), "pw", auth.hash_password_scrypt("pw"))
    assert users.read_text() == f"alice@example.test:{newer}\n"


def test_a_rewrite_within_the_same_second_still_moves_the_mtime_to_a_later_second(tmp_path):
    """Dovecot's passwd-file notices a change only by mtime seconds or size; a new
    hash of the same kind has the same size."""
    import os

    from epost.users_file import replace_users_file

    path = tmp_path / "users"
    path.write_bytes(b"alice@example.test:{ARGON2ID}aaaa\n")
    first = os.stat(path).st_mtime_ns // 1_000_000_000
    replace_users_file(path, b"alice@example.test:{ARGON2ID}bbbb\n", 0o600)
    second = os.stat(path).st_mtime_ns // 1_000_000_000
    replace_users_file(path, b"alice@example.test:{ARGON2ID}cccc\n", 0o600)
    third = os.stat(path).st_mtime_ns // 1_000_000_000

    assert first < second < third
    assert path.read_bytes() == b"alice@example.test:{ARGON2ID}cccc\n"
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)


def test_an_upgrade_already_done_costs_no_new_hash(tmp_path: Path, monkeypatch):
    """Logins in the window before the daemon reloads the file still hold the old hash: no Argon2id for them."""
    users = tmp_path / "users"
    newer = auth.hash_password("pw")
    users.write_text(f"alice@example.test:{newer}\n")

    def no_hashing(password):
        raise AssertionError("hashed a password only to throw it away")

    monkeypatch.setattr(auth, "hash_password", no_hashing)
    assert not upgrade_hash(users, parse_mailbox("alice@example.test"), "pw", auth.hash_password_scrypt("pw"))
    assert users.read_text() == f"alice@example.test:{newer}\n"
