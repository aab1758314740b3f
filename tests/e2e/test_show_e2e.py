"""`epost show ID` beside a running daemon: a deferred message, read without the spool lock."""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

from e2e_support import free_port, wait_for

EPOST = shutil.which("epost", path=str(Path(sys.executable).parent))
BODY = b"Subject: show me\r\nX-Test: e2e\r\n\r\nhello from the queue\r\n"


def epost(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EPOST, *args, "--config", str(d.config)], capture_output=True, timeout=60)


def test_show_prints_a_deferred_message_while_the_daemon_runs(daemon, tmp_path):
    gateway = tmp_path / "gateway.dat"
    gateway.write_text(f"*.dead.test,127.0.0.1,{free_port()}\n")  # nothing listens: refused, deferred
    d = daemon(toml=f'gateway_table = "{gateway}"\n[retry]\ninterval = 3600\n')
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as client:
        assert client.sendmail("alice@example.test", ["x@a.dead.test"], BODY) == {}

    def deferred() -> list[dict] | None:
        listed = json.loads(epost(d, "queue", "--json", "--state", "deferred").stdout)
        return listed if listed and listed[0]["recipients"][0]["attempts"] == 1 else None

    (message,) = wait_for(deferred, 15, message="a deferred message")
    shown = epost(d, "show", message["id"])

    assert (shown.returncode, shown.stderr) == (0, b"")
    head, content = shown.stdout.split(b"\n\n", 1)
    lines = head.decode().splitlines()
    assert lines[:2] == [f"queue-id: {message['id']}", "queue: deferred"]
    assert "sender: <alice@example.test>" in lines
    at = lines.index("recipient: <x@a.dead.test>")
    assert lines[at + 1 : at + 3] == ["  state: deferred", "  attempts: 1"]
    assert "retry: a.dead.test" in lines and any(line.startswith("  next-attempt: ") for line in lines)
    assert content.endswith(BODY) and b"Received: " in content  # as stored: with our Received: header

    missing = epost(d, "show", "0" * 17)
    assert (missing.returncode, missing.stdout) == (1, b"")
    assert missing.stderr.decode().splitlines() == [f"epost show: {'0' * 17}: not queued (delivered, deleted, or never here)"]
