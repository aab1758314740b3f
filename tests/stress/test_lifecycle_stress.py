"""The daemon's lifecycle on bad days (issue 18, findings 6 and 7), against the real `twistd -n epost`.

- a stale control-socket lock (a dead daemon's PID now naming a live
  process) must not leave the daemon without its control socket;
- a second daemon on the same spool refuses to start and touches nothing;
- SIGTERM while many clients are mid-DATA: each gets a 250 (and its
  message survives) or a 421 (logged), never a 451 or a silent close.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stress_support import scale
from e2e_support import TWISTD, free_port, maildir_messages, port_answers, queued, wait_for
from epost.store.lock import try_lock

EPOST = shutil.which("epost", path=str(Path(sys.executable).parent))
ALICE = "alice@example.test"


def epost(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EPOST, *args, "--config", str(d.config)], capture_output=True, text=True, timeout=60)


def attempts(d) -> int:
    path = d.spool / "log" / "senderlog"
    return len(path.read_text().splitlines()) if path.exists() else 0


def deferred_ids(d) -> list[str]:
    return queued(d.spool, "deferred")


def alive(pid: int) -> bool:
    """Not gone and not a zombie (the daemonized daemon is not our child: init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def dead_gateway(folder: Path) -> str:
    """TOML routing *.dead.test to a port nothing listens on, retried only hourly."""
    gateway = folder / "gateway.dat"
    gateway.write_text(f"*.dead.test,127.0.0.1,{free_port()}\n")
    return f'gateway_table = "{gateway}"\n[retry]\ninterval = 3600\n'


# --- (a) a stale control-socket lock ----------------------------------------------


@pytest.mark.parametrize("pid", [1, os.getpid()], ids=["init", "the-test"])
def test_a_stale_control_socket_lock_naming_a_live_process_does_not_cost_the_control_socket(daemon, tmp_path, pid):
    """kill -9 leaves control.sock and Twisted's control.sock.lock behind; after a reboot (or
    while the dead daemon is a zombie) the PID in that lock names a live process."""
    d = daemon(toml=dead_gateway(tmp_path), start=False)
    d.spool.mkdir()
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(d.spool / "control.sock"))  # a dead daemon's socket: bound, nobody listening
    leftover.close()
    os.symlink(str(pid), d.spool / "control.sock.lock")  # twisted.python.lockfile's format: a link to the PID
    d.start()
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as client:
        assert client.sendmail("bob@example.test", ["x@a.dead.test"], b"Subject: stale\r\n\r\nhi\r\n") == {}
    (queue_id,) = wait_for(lambda: deferred_ids(d), 15, message="a deferred message")
    assert attempts(d) == 1

    held = epost(d, "hold", queue_id)
    assert (held.returncode, held.stdout, held.stderr) == (0, f"{queue_id}: on hold\n", "")
    released = epost(d, "release", queue_id)
    assert (released.returncode, released.stdout, released.stderr) == (0, f"{queue_id}: released\n", "")
    # The daemon itself released it: it tries the message again at once (on the files, it would wait for a restart).
    wait_for(lambda: attempts(d) == 2, 10, message="a retry right after release")
    assert not (d.spool / "control.sock.lock").exists()


# --- (b) one daemon per spool -----------------------------------------------------


def test_a_second_daemon_on_the_same_spool_refuses_with_one_line_and_touches_nothing(daemon):
    first = daemon()
    with smtplib.SMTP("127.0.0.1", first.relay_port, timeout=10) as client:  # a greeting: its own start-up
        assert client.noop()[0] == 250  # (which clears tmp/) is over; the port listens before that
    marker = first.spool / "tmp" / "being-received"
    marker.write_bytes(b"a message the first daemon is receiving")
    second = daemon(start=False)
    config = second.config.read_text()
    second.config.write_text(config.replace('spool = "spool"', f'spool = "{first.spool}"', 1))
    before = sorted(p.name for p in first.spool.iterdir())

    result = subprocess.run(second.argv(), cwd=second.folder, capture_output=True, text=True, timeout=15)

    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and len(output) == 1, output
    assert re.fullmatch(rf"epost: {re.escape(str(first.spool))}/lock: locked by process {first.pid}: .*", output[0]), output
    assert marker.read_bytes() == b"a message the first daemon is receiving"
    assert sorted(p.name for p in first.spool.iterdir()) == before
    assert first.proc.poll() is None
    flushed = epost(first, "flush")  # the first daemon's control socket still answers
    assert flushed.returncode == 0 and "working on the queue store" not in flushed.stderr, flushed
    with smtplib.SMTP("127.0.0.1", first.relay_port, timeout=10) as client:
        assert client.sendmail("bob@example.test", [ALICE], b"Subject: still here\r\n\r\nhi\r\n") == {}
    wait_for(lambda: maildir_messages(first.spool, "example.test/alice"), 10, message="delivery by the first daemon")


def test_a_queue_store_it_cannot_open_stops_start_up_with_one_line_and_is_left_alone(daemon):
    """Never a silently new, empty queue (issue 16): a damaged queue.db ends start-up, exit 1."""
    d = daemon(start=False)
    database = d.spool / "queue" / "queue.db"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"a disk that lost its superblock " * 512)

    result = subprocess.run(d.argv(), cwd=d.folder, capture_output=True, text=True, timeout=30)

    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1 and len(output) == 1, output
    assert output[0].startswith(f"epost: {database}: corrupt or not an SQLite database"), output
    assert database.read_bytes() == b"a disk that lost its superblock " * 512
    assert not port_answers(d.relay_port)


def test_a_daemonized_daemon_keeps_the_lock_after_twistds_parent_exits(daemon):
    """twistd forks twice after make_service took the lock: the lock must stay with the daemon."""
    d = daemon(start=False)
    pidfile = d.folder / "epost.pid"
    started = subprocess.run(
        [TWISTD, f"--pidfile={pidfile}", f"--logfile={d.log}", "epost", "--config", str(d.config)],
        cwd=d.folder, capture_output=True, text=True, timeout=30,
    )
    assert started.returncode == 0, started
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, message="the pid file"))
    try:
        wait_for(lambda: port_answers(d.relay_port), 10, message="the daemon to listen")
        assert (d.spool / "lock").read_text() == f"{pid}\n"  # the daemon's own PID, written after the fork
        assert try_lock(d.spool) is None
        second = subprocess.run(d.argv(), cwd=d.folder, capture_output=True, text=True, timeout=15)
        assert second.returncode != 0 and f"locked by process {pid}" in second.stderr, second
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), 15, message="the daemon to exit")
    try_lock(d.spool).release()


# --- (c) SIGTERM under load ---------------------------------------------------------


class Session(threading.Thread):
    """One client, ready in DATA (or idle) when SIGTERM comes; then it finishes at once, after
    `finish_after` seconds, or never (`None`). `outcome` is the reply code it got, or what went wrong."""

    def __init__(self, port: int, number: int, finish_after: float | None, idle: bool = False):
        super().__init__(daemon=True)
        self.port, self.number, self.finish_after, self.idle = port, number, finish_after, idle
        self.token = f"token-{number}-{time.monotonic_ns()}"
        self.ready, self.go = threading.Event(), threading.Event()
        self.outcome: str = "not run"
        self.reply = ""
        self.local_port = 0

    def run(self) -> None:
        try:
            self._run()
        except (OSError, smtplib.SMTPException) as error:
            self.outcome = f"{type(error).__name__}: {error}"
            self.ready.set()

    def _run(self) -> None:
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="load.example.org", timeout=60)
        self.local_port = client.sock.getsockname()[1]
        client.ehlo()
        if not self.idle:
            assert client.mail("bob@example.test")[0] == 250
            assert client.rcpt(ALICE)[0] == 250
            client.putcmd("data")
            assert client.getreply()[0] == 354
            client.send(f"Subject: {self.token}\r\nMessage-ID: <{self.token}@load.test>\r\n\r\nfirst part\r\n".encode())
        self.ready.set()
        self.go.wait(60)
        if not self.idle and self.finish_after is not None:
            deadline = time.monotonic() + self.finish_after
            while time.monotonic() < deadline and not select.select([client.sock], [], [], 0.05)[0]:
                pass
            if not select.select([client.sock], [], [], 0)[0]:  # nothing said to us yet: end the message
                client.send(b"second part\r\n.\r\n")
        code, text = client.getreply()  # raises SMTPServerDisconnected on a close without a reply
        self.outcome, self.reply = str(code), text.decode()
        client.close()


def test_sigterm_mid_data_answers_every_session_250_or_421_and_loses_nothing(daemon):
    d = daemon(server="max_connections_per_client = 1000")
    per_group = scale(5, 25)
    # When each client ends its message after the SIGTERM: at once; spread over the first
    # quarter second (where the spool workers used to stop under commits: 451); within
    # the 5 s grace; never. And clients idle after EHLO.
    finish = [lambda i: 0.0, lambda i: (i * 0.003) % 0.25, lambda i: 1.5, lambda i: None]
    sessions = [Session(d.relay_port, i, finish[i % 4](i)) for i in range(4 * per_group)]
    sessions += [Session(d.relay_port, 1000 + i, None, idle=True) for i in range(per_group)]
    for session in sessions:
        session.start()
    for session in sessions:
        assert session.ready.wait(30), "a client did not get ready"
    assert all(s.outcome == "not run" for s in sessions), [s.outcome for s in sessions if s.outcome != "not run"]

    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the listeners close first; then the sessions are asked to end
    for session in sessions:
        session.go.set()
    for session in sessions:
        session.join(60)
    status = d.wait(30)
    log = d.log.read_text()

    outcomes = {s.number: s.outcome for s in sessions}
    assert all(o in ("250", "421") for o in outcomes.values()), f"{outcomes}\n{log[-3000:]}"
    for session in sessions:
        if session.outcome == "421":
            assert session.reply == "4.3.2 mx.example.test Service shutting down"
            assert f"SMTP session from [127.0.0.1]:{session.local_port} closed with 421 4.3.2" in log, session.local_port
        if session.idle or session.finish_after is None:
            assert session.outcome == "421", (session.number, session.outcome)
        else:
            assert session.outcome == "250", (session.number, session.outcome, log[-3000:])
    assert status in (0, -signal.SIGTERM), f"exit status {status}\n{log[-3000:]}"

    acknowledged = {s.token for s in sessions if s.outcome == "250"}
    assert len(acknowledged) == 3 * per_group
    d.start()
    wait_for(lambda: not queued(d.spool, "incoming"), 30, message="incoming/ to empty after the restart")
    delivered = [p.read_text() for p in maildir_messages(d.spool, "example.test/alice")]
    arrived = {token for token in acknowledged if any(token in text for text in delivered)}
    assert arrived == acknowledged, f"lost: {sorted(acknowledged - arrived)}"
    cut = {s.token for s in sessions if s.outcome == "421" and not s.idle}
    assert not any(token in text for token in cut for text in delivered)  # a 421 means not taken
