"""`epost passwd ADDRESS [--stdin]`: sets a hash in the users file, atomically, touching nothing else."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from epost import auth
from epost.admin import cli
from epost.admin.cli import main
from epost.auth import verify_password
from epost.routing.users import load_users, parse_user_line
from epost.address import Address

USERS = (
    b"# epost users\r\n"
    b"\n"
    b"Alice@Example.TEST:$scrypt$ln=4,r=8,p=1$old$old\r\n"
    b"  # indented comment\n"
    b"bob@example.test\n"
    b"carol@example.test:$scrypt$ln=4,r=8,p=1$c$c"  # no final newline
)


@pytest.fixture(autouse=True)
def _cheap_scrypt(monkeypatch):
    monkeypatch.setattr(auth, "SCRYPT_LOG2_N", 4)
    monkeypatch.setattr(auth, "ARGON2_TIME_COST", 1)
    monkeypatch.setattr(auth, "ARGON2_MEMORY_KIB", 64)


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "users"
    path.parent.mkdir()
    path.write_bytes(USERS)
    path.chmod(0o640)
    (tmp_path / "epost.toml").write_text('[server]\nhostname = "mx.example.test"\n[routing]\nusers = "etc/users"\n')
    return path


def passwd(monkeypatch, capsys, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(["--config", "epost.toml", "passwd", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def hash_of(path: Path, address: str) -> str | None:
    local, _, domain = address.partition("@")
    return load_users(path).password_hash(Address(local, domain))


def test_stdin_sets_a_new_user_by_appending_a_line(users, monkeypatch, capsys):
    status, out, err = passwd(monkeypatch, capsys, "Dave@Example.TEST", "--stdin", stdin="pw of dave\nignored\n")

    assert (status, out, err) == (0, "password set for dave@example.test\n", "")
    data = users.read_bytes()
    assert data.startswith(USERS + b"\n")  # the last line got its missing newline, nothing else changed
    last = data[len(USERS) + 1 :]
    assert last.startswith(b"dave@example.test:{ARGON2ID}$argon2id$") and last.endswith(b"\n") and last.count(b"\n") == 1
    assert verify_password("pw of dave", hash_of(users, "dave@example.test"))


def test_stdin_updates_an_existing_user_and_keeps_every_other_byte(users, monkeypatch, capsys):
    status, out, _ = passwd(monkeypatch, capsys, "alice@example.test", "--stdin", stdin="new pw\n")

    assert (status, out) == (0, "password set for alice@example.test\n")
    before, after = USERS.split(b"\r\n"), users.read_bytes().split(b"\r\n")
    assert len(after) == len(before) and after[0] == before[0] and after[2:] == before[2:]
    assert after[1].startswith(b"\nAlice@Example.TEST:{ARGON2ID}$argon2id$")  # spelling kept, CRLF kept
    assert verify_password("new pw", hash_of(users, "alice@example.test"))
    assert not verify_password("new pw", hash_of(users, "carol@example.test"))
    assert stat.S_IMODE(users.stat().st_mode) == 0o640


def test_mailbox_without_hash_gets_one(users, monkeypatch, capsys):
    assert passwd(monkeypatch, capsys, "bob@example.test", "--stdin", stdin="bob pw")[0] == 0

    assert b"\nbob@example.test:{ARGON2ID}$argon2id$" in users.read_bytes()
    assert verify_password("bob pw", hash_of(users, "bob@example.test"))


def test_stdin_keeps_spaces_and_removes_only_the_line_ending(users, monkeypatch, capsys):
    passwd(monkeypatch, capsys, "bob@example.test", "--stdin", stdin=" two  words \r\n")

    assert verify_password(" two  words ", hash_of(users, "bob@example.test"))


def test_new_users_file_is_created_private(tmp_path, monkeypatch, capsys):
    (tmp_path / "epost.toml").write_text('[server]\nhostname = "mx.example.test"\n[routing]\nusers = "users"\n')

    assert passwd(monkeypatch, capsys, "a@example.test", "--stdin", stdin="pw\n")[0] == 0
    assert stat.S_IMODE((tmp_path / "users").stat().st_mode) == 0o600
    assert (tmp_path / "users").read_bytes().count(b"\n") == 1
    assert verify_password("pw", hash_of(tmp_path / "users", "a@example.test"))


def test_terminal_prompts_twice(users, monkeypatch, capsys):
    prompts = []
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: prompts.append(prompt) or "typed")
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)

    assert main(["--config", "epost.toml", "passwd", "bob@example.test"]) == 0
    assert len(prompts) == 2
    assert verify_password("typed", hash_of(users, "bob@example.test"))


def test_terminal_mismatch_exits_1_and_leaves_the_file(users, monkeypatch, capsys):
    answers = iter(["one", "two"])
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: next(answers))
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)

    assert main(["--config", "epost.toml", "passwd", "bob@example.test"]) == 1
    assert capsys.readouterr().err == "epost: passwords do not match\n"
    assert users.read_bytes() == USERS


def test_without_terminal_or_stdin_flag_nothing_is_read(users, monkeypatch, capsys):
    status, _, err = passwd(monkeypatch, capsys, "bob@example.test", stdin="pw\n")

    assert (status, err) == (1, "epost: standard input is not a terminal (use --stdin)\n")
    assert users.read_bytes() == USERS


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n"])
def test_empty_password_is_refused(users, monkeypatch, capsys, stdin):
    status, _, err = passwd(monkeypatch, capsys, "bob@example.test", "--stdin", stdin=stdin)

    assert (status, err) == (1, "epost: empty password refused\n")
    assert users.read_bytes() == USERS


@pytest.mark.parametrize("address", ["alice", "alice@", "@example.test", "a b@example.test",
                                     "alice@[192.0.2.1]", "alice@example.test:hash", "../x@example.test"])
def test_bad_address_exits_1_with_one_line(users, monkeypatch, capsys, address):
    status, out, err = passwd(monkeypatch, capsys, address, "--stdin", stdin="pw\n")

    assert (status, out) == (1, "")
    assert err.startswith(f"epost: {address}: ") and err.count("\n") == 1
    assert users.read_bytes() == USERS


def test_users_file_with_a_bad_line_is_refused_not_rewritten(users, monkeypatch, capsys):
    users.write_bytes(USERS + b"\nnot an address\n")

    status, _, err = passwd(monkeypatch, capsys, "bob@example.test", "--stdin", stdin="pw\n")

    assert (status, err) == (1, f"epost: {users}:7: bad address 'not an address': address must be local@domain\n")
    assert users.read_bytes() == USERS + b"\nnot an address\n"


def test_failed_write_leaves_no_temp_file_and_the_old_file(users, monkeypatch, capsys):
    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("epost.fsutil.os.fsync", fail)
    status, _, err = passwd(monkeypatch, capsys, "bob@example.test", "--stdin", stdin="pw\n")

    assert (status, err) == (1, f"epost: {users}: cannot write: No space left on device\n")
    assert users.read_bytes() == USERS
    assert os.listdir(users.parent) == ["users"]


def test_success_leaves_no_temp_file(users, monkeypatch, capsys):
    passwd(monkeypatch, capsys, "eve@example.test", "--stdin", stdin="pw\n")

    assert os.listdir(users.parent) == ["users"]


def test_quoted_local_part_with_colon_round_trips(users, monkeypatch, capsys):
    assert passwd(monkeypatch, capsys, '"a:b"@example.test', "--stdin", stdin="pw\n")[0] == 0
    assert passwd(monkeypatch, capsys, '"A:B"@example.test', "--stdin", stdin="pw2\n")[0] == 0

    lines = users.read_bytes().splitlines()
    assert sum(line.startswith(b'"a:b"@example.test:') for line in lines) == 1
    user = parse_user_line(lines[-1].decode())
    assert verify_password("pw2", user.password_hash)


def test_installed_command_reads_stdin(users):
    """Through the console script: real stdin, real exit status."""
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-m", "epost.admin.cli", "--config", "epost.toml", "passwd", "frank@example.test", "--stdin"],
        input=b"pw\n", capture_output=True, env=env, timeout=60,
    )

    assert (done.returncode, done.stdout, done.stderr) == (0, b"password set for frank@example.test\n", b"")
    assert verify_password("pw", hash_of(users, "frank@example.test"))


def test_without_config_in_a_bare_folder_the_users_file_and_its_folder_are_created(tmp_path, monkeypatch, capsys):
    """Issue 18 #10: a new user's first command; it used to fail with `cannot write: No such file or directory`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first pw\n"))

    status = main(["passwd", "newbie@example.test", "--stdin"])

    out, err = capsys.readouterr()
    assert (status, out, err) == (0, "created etc/users\npassword set for newbie@example.test\n", "")
    users = tmp_path / "etc" / "users"
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert stat.S_IMODE(users.parent.stat().st_mode) & 0o077 == 0  # 0700 less the umask
    assert verify_password("first pw", hash_of(users, "newbie@example.test"))
    assert sorted(os.listdir(users.parent)) == ["users"]


def test_an_existing_users_file_is_not_announced_as_created(users, monkeypatch, capsys):
    assert passwd(monkeypatch, capsys, "bob@example.test", "--stdin", stdin="pw\n")[1] == "password set for bob@example.test\n"
