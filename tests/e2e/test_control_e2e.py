"""`epost` queue surgery against a running daemon over the control socket, then with the daemon down."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import stat
import subprocess
import sys
from pathlib import Path

from e2e_support import free_port, wait_for

EPOST = shutil.which("epost", path=str(Path(sys.executable).parent))


def epost(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EPOST, *args, "--config", str(d.config)], capture_output=True, text=True, timeout=60)


def send(d, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as client:
        assert client.sendmail("alice@example.test", [recipient], b"Subject: surgery\r\n\r\nhi\r\n") == {}


def listing(d, *args: str) -> list[dict]:
    result = epost(d, "queue", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def attempts(d) -> list[int]:
    path = d.spool / "log" / "senderlog"
    return [int(line.split(" attempt=")[1].split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


def test_hold_release_flush_delete_through_the_daemon_and_on_the_files(daemon, tmp_path):
    gateway = tmp_path / "gateway.dat"
    gateway.write_text(f"*.dead.test,127.0.0.1,{free_port()}\n")  # nothing listens: refused
    d = daemon(toml=f'gateway_table = "{gateway}"\n[retry]\ninterval = 3600\n')
    sock = d.spool / "control.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(sock).st_mode)

    send(d, "x@a.dead.test")
    (message,) = wait_for(lambda: listing(d, "--state", "deferred") or None, 15, message="a deferred message")
    queue_id = message["id"]
    assert message["recipients"][0]["next_attempt"] is not None
    assert attempts(d) == [1]

    held = epost(d, "hold", queue_id)
    assert (held.returncode, held.stdout) == (0, f"{queue_id}: on hold\n"), held.stderr
    assert [m["id"] for m in listing(d, "--state", "held")] == [queue_id]
    assert not (d.spool / "domains" / "a.dead.test").exists()

    released = epost(d, "release", "--domain", "a.dead.test")
    assert (released.returncode, released.stdout) == (0, f"{queue_id}: released\n"), released.stderr
    wait_for(lambda: attempts(d) == [1, 2], 10, message="a retry right after release")
    wait_for(lambda: [m["queue"] for m in listing(d)] == ["deferred"], 10, message="back in deferred/")

    flushed = epost(d, "flush")
    assert flushed.returncode == 0 and "due now" in flushed.stdout
    wait_for(lambda: attempts(d) == [1, 2, 3], 10, message="a retry after flush")

    missing = epost(d, "delete", "0190000000000FFFF")
    assert missing.returncode == 1 and "not queued" in missing.stderr
    wait_for(lambda: listing(d)[0]["recipients"][0]["attempts"] == 3, 10, message="attempt 3 recorded")
    deleted = epost(d, "delete", queue_id)
    assert (deleted.returncode, deleted.stdout) == (0, f"{queue_id}: deleted\n"), deleted.stderr
    assert listing(d) == []
    wait_for(lambda: not (d.spool / "domains" / "a.dead.test").exists(), 5, message="Domain.mri removed")

    # With the daemon down the same commands work on the files.
    send(d, "y@b.dead.test")
    (second,) = wait_for(lambda: listing(d, "--state", "deferred") or None, 15, message="a second deferred message")
    d.stop()
    assert not sock.exists()
    offline = epost(d, "hold", second["id"])
    assert (offline.returncode, offline.stdout) == (0, f"{second['id']}: on hold\n"), offline.stderr
    assert [m["queue"] for m in listing(d)] == ["hold"]
