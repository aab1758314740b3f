"""Issue 18 #8 against the real daemon: `epost route` asks it for the tables in force, an emptied
users file waits for SIGHUP (or `allow_empty_tables`)."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from e2e_support import wait_for

EPOST = shutil.which("epost", path=str(Path(sys.executable).parent))
ALICE_LOCAL = "alice@example.test: local via local -> mailbox example.test/alice\n"


def epost(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EPOST, *args, "--config", str(d.config)], capture_output=True, text=True, timeout=60)


def rcpt(d, recipient: str) -> int:
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as client:
        client.ehlo("client.example.org")
        client.mail("someone@example.org")
        return client.rcpt(recipient)[0]


def logged(d, text: str) -> bool:
    return text in d.log.read_text()


def test_route_answers_from_the_daemon_and_notes_a_bad_file_on_disk(daemon):
    d = daemon()
    users = d.folder / "users"
    done = epost(d, "route", "alice@example.test", "--no-dns")
    assert (done.returncode, done.stdout, done.stderr) == (0, ALICE_LOCAL, "")

    users.write_text("alice@example.test\nbob@example.test\ncarol@@example.test\n")
    wait_for(lambda: logged(d, "previous table stays in force"), 5, message="the bad file refused")
    done = epost(d, "route", "alice@example.test", "--no-dns")
    assert (done.returncode, done.stdout) == (0, ALICE_LOCAL)  # the table in force, not the file
    (note,) = done.stderr.splitlines()
    assert note.startswith(f"note: {users} on disk differs from the table in use (loaded 20"), note
    assert f"the file on disk is refused: {users}:3: bad address 'carol@@example.test'" in note, note

    d.stop()
    done = epost(d, "route", "alice@example.test", "--no-dns")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"epost: no daemon is running (spool {d.spool}): routing from the files on disk",
        f"epost: {users}:3: bad address 'carol@@example.test': bad local part 'carol@'",
    ]


def test_an_emptied_users_file_is_refused_until_sighup(daemon):
    d = daemon()
    users = d.folder / "users"
    users.write_text("# everyone left\n")
    wait_for(lambda: logged(d, "no entries, while the table in force has 2"), 5, message="the empty file refused")
    assert rcpt(d, "alice@example.test") == 250
    done = epost(d, "route", "bob@example.test", "--no-dns")
    assert done.returncode == 0 and "no entries" in done.stderr

    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: rcpt(d, "alice@example.test") == 550, 5, message="SIGHUP applies the empty table")
    done = epost(d, "route", "alice@example.test", "--no-dns")
    assert (done.returncode, done.stderr) == (1, "")


def test_allow_empty_tables_applies_an_emptied_users_file_like_any_edit(daemon):
    d = daemon(toml="allow_empty_tables = true")
    (d.folder / "users").write_text("")
    started = time.monotonic()
    wait_for(lambda: rcpt(d, "alice@example.test") == 550, 5, message="the empty table applied")
    assert time.monotonic() - started < 3
