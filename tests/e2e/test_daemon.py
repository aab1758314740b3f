"""End to end: the real `twistd -n epost` on loopback, driven by real clients (smtplib, swaks, raw sockets)."""

from __future__ import annotations

import email
import os
import signal
import re
import resource
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest

from e2e_support import QUEUED, REPO, TWISTD, children, kill9, maildir_messages, queued, restart, wait_for

ALICE, BOB = "alice@example.test", "bob@example.test"
SENDER = "x@example.org"


# --- helpers -----------------------------------------------------------------


def read_replies(sock: socket.socket, timeout: float = 10.0) -> list[tuple[int, str]]:
    """Every reply until the server closes, multi-line replies joined: [(code, text), ...]."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    replies, current = [], []
    for line in data.split(b"\r\n")[:-1]:
        current.append(line[4:].decode("ascii", "replace"))
        if line[3:4] != b"-":
            replies.append((int(line[:3]), "\n".join(current)))
            current = []
    return replies


def raw_session(port: int, payload: bytes) -> list[tuple[int, str]]:
    """Send `payload` in one write and collect every reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        return read_replies(sock)


def message(body: str, subject: str = "e2e", message_id: str | None = None) -> bytes:
    headers = f"From: <{SENDER}>\r\nSubject: {subject}\r\n"
    if message_id:
        headers += f"Message-ID: {message_id}\r\n"
    return f"{headers}\r\n{body}\r\n".encode()


def parsed(path: Path) -> email.message.Message:
    return email.message_from_bytes(path.read_bytes())


def message_ids(spool: Path, mailbox: str = "example.test/alice") -> list[str]:
    return [parsed(p)["Message-ID"] for p in maildir_messages(spool, mailbox)]


def spool_is_empty(spool: Path) -> bool:
    return not queued(spool, "incoming")


def delivered(d, mailbox: str = "example.test/alice", timeout: float = 10) -> list[Path]:
    """The Maildir's messages once one has arrived and the spool is empty again (so SIGTERM finds it idle)."""
    wait_for(lambda: maildir_messages(d.spool, mailbox), timeout, message=f"a message in {mailbox}")
    wait_for(lambda: spool_is_empty(d.spool), timeout, message="incoming/ to empty")
    return maildir_messages(d.spool, mailbox)


class Senders:
    """`threads` clients, each sending uniquely numbered messages to alice until stopped."""

    def __init__(self, port: int, threads: int = 4):
        self.port = port
        self.acked: list[str] = []
        self.attempted = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def __enter__(self) -> Senders:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(20)

    def _run(self, number: int) -> None:
        count = 0
        while not self.stopping.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                    while not self.stopping.is_set():
                        message_id = f"<t{number}.{count}.{time.monotonic_ns()}@e2e.test>"
                        count += 1
                        with self._lock:
                            self.attempted += 1
                        smtp.sendmail(SENDER, [ALICE], message(f"message {message_id}", message_id=message_id))
                        with self._lock:  # sendmail returns only after the 250 to DATA
                            self.acked.append(message_id)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.01)


# --- 1-4: plain delivery, policy, TLS, swaks ------------------------------------


def test_message_to_two_local_users_is_queued_then_in_each_maildir(daemon):
    d = daemon()
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as smtp:
        smtp.ehlo("client.example.org")
        assert smtp.mail(SENDER)[0] == 250
        assert smtp.rcpt(ALICE)[0] == 250
        assert smtp.rcpt(BOB)[0] == 250
        code, text = smtp.data(message("hello from the e2e test"))
    assert code == 250
    match = QUEUED.match(text.decode())
    assert match, text
    queue_id = match[1]
    for mailbox in ("example.test/alice", "example.test/bob"):
        files = wait_for(lambda: maildir_messages(d.spool, mailbox), message=mailbox)
        assert len(files) == 1
        copy = parsed(files[0])
        assert "hello from the e2e test" in copy.get_payload()
        received = copy["Received"]
        assert f"id {queue_id}" in received and "127.0.0.1" in received, received
    wait_for(lambda: spool_is_empty(d.spool), message="incoming/ to empty")
    assert len(maildir_messages(d.spool, "example.test/alice")) == 1


def test_unknown_user_foreign_domain_and_unauthenticated_submission_are_refused(daemon):
    d = daemon(server='relay_networks = ["192.0.2.0/24"]')  # loopback may not relay here
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as smtp:
        smtp.ehlo("client.example.org")
        smtp.mail(SENDER)
        code, text = smtp.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1"), text
        code, text = smtp.rcpt("someone@elsewhere.example")
        assert (code, text[:5]) == (554, b"5.7.1"), text
    with smtplib.SMTP("127.0.0.1", d.submission_port, timeout=10) as smtp:
        smtp.ehlo("client.example.org")
        code, text = smtp.mail(SENDER)
        assert (code, text[:5]) == (530, b"5.7.0"), text


def test_starttls_with_the_generated_certificate_is_recorded_in_received(daemon):
    d = daemon()
    assert (d.spool / "tls" / "cert.pem").exists()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as smtp:
        smtp.ehlo("client.example.org")
        assert smtp.has_extn("starttls")
        assert smtp.starttls(context=context)[0] == 220
        assert smtp.sock.version().startswith("TLSv1.")
        smtp.ehlo("client.example.org")
        assert not smtp.has_extn("starttls")
        smtp.sendmail(SENDER, [ALICE], message("over tls"))
    (path,) = delivered(d)
    received = parsed(path)["Received"]
    assert "using TLSv1." in received and "ESMTPS" in received, received


def test_swaks_with_starttls_delivers(daemon):
    d = daemon()
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{d.relay_port}", "--to", ALICE, "--from", SENDER,
         "--tls", "--body", "sent by swaks e2e"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<~  250 2\.0\.0 Ok: queued as [0-9A-F]+", result.stdout)
    (path,) = delivered(d)
    assert "sent by swaks e2e" in path.read_text()


# --- 5-6: pipelining and smuggling over raw sockets ------------------------------


def test_one_write_pipelined_session_gets_replies_in_order(daemon):
    d = daemon()
    payload = (
        b"EHLO client.example.org\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        + message("pipelined body")
        + b".\r\nQUIT\r\n"
    )
    replies = raw_session(d.relay_port, payload)
    assert [code for code, _ in replies] == [220, 250, 250, 250, 354, 250, 221], replies
    assert "PIPELINING" in replies[1][1]
    assert QUEUED.match(replies[5][1]), replies[5]
    (path,) = delivered(d)
    assert "pipelined body" in path.read_text()


SMUGGLED = b"MAIL FROM:<x@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n"


@pytest.mark.parametrize(
    "ending",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r\n" + b"A" * 20000 + b"\r\n"],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CR", "CRLF.CR", "long-line"],
)
def test_smuggled_transaction_never_becomes_a_message(daemon, ending):
    d = daemon()
    payload = (
        b"EHLO client.example.org\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        b"Subject: carrier\r\n\r\nfirst part" + ending + SMUGGLED + b"\r\n.\r\nQUIT\r\n"
    )
    replies = raw_session(d.relay_port, payload)
    assert replies[-1][0] == 221, replies
    assert sum(1 for code, text in replies if QUEUED.match(text)) <= 1, replies
    wait_for(lambda: spool_is_empty(d.spool))
    time.sleep(0.2)
    assert maildir_messages(d.spool, "example.test/bob") == [], replies
    assert len(maildir_messages(d.spool, "example.test/alice")) <= 1, replies


# --- 7-8: durability across kill -9 and restart -----------------------------------


def test_every_acknowledged_message_survives_kill_9(daemon):
    d = daemon()
    with Senders(d.relay_port) as senders:
        wait_for(lambda: len(senders.acked) >= 60, timeout=30, message="60 acknowledged messages")
        kill9(d)
        acked_at_kill = len(senders.acked)
    acked = list(senders.acked)
    d.start()
    wait_for(lambda: spool_is_empty(d.spool), timeout=30, message="incoming/ to empty after restart")
    arrived = message_ids(d.spool)
    missing = set(acked) - set(arrived)
    assert not missing, (
        f"{len(acked)} acknowledged ({acked_at_kill} at the kill, {senders.attempted} attempted), "
        f"{len(arrived)} delivered, {len(missing)} lost: {sorted(missing)[:5]}"
    )


def sigterm_during_a_burst(d) -> tuple[int | None, list[str]]:
    """SIGTERM (SIGKILL after 5 s) while 3 clients are sending; (exit status, acknowledged Message-IDs)."""
    with Senders(d.relay_port, threads=3) as senders:
        wait_for(lambda: len(senders.acked) >= 30, timeout=30, message="30 acknowledged messages")
        status = d.stop()  # while the clients are still sending
    return status, list(senders.acked)


def test_restart_after_sigterm_during_a_burst_delivers_every_acknowledged_message(daemon):
    d = daemon()
    _, acked = sigterm_during_a_burst(d)
    restart(d)
    wait_for(lambda: spool_is_empty(d.spool), timeout=30, message="incoming/ to empty after restart")
    arrived = message_ids(d.spool)
    missing = set(acked) - set(arrived)
    assert not missing, f"{len(acked)} acknowledged, {len(arrived)} delivered, lost {sorted(missing)[:5]}"
    assert os.listdir(d.spool / "tmp") == []
    assert os.listdir(d.spool / "mailboxes" / "example.test" / "alice" / "tmp") == []


def test_sigterm_during_a_burst_stops_cleanly_without_duplicates(daemon):
    d = daemon()
    status, acked = sigterm_during_a_burst(d)
    log = d.log.read_text()
    restart(d)
    wait_for(lambda: spool_is_empty(d.spool), timeout=30, message="incoming/ to empty after restart")
    arrived = message_ids(d.spool)
    duplicated = sorted({m for m in arrived if arrived.count(m) > 1})
    # twistd re-raises the signal it stopped on, so a clean stop reads as -SIGTERM;
    # -SIGKILL would mean the 5 s grace ran out.
    assert status in (0, -signal.SIGTERM), f"twistd did not exit within 5 s of SIGTERM (status {status}):\n{log}"
    assert "Main loop terminated" in log
    assert not duplicated, f"{len(acked)} acknowledged, {len(arrived)} delivered, duplicated {duplicated[:5]}:\n{log}"


# --- 9: start-up errors -------------------------------------------------------------


def run_twistd(d, *extra: str) -> tuple[int, str]:
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "epost", "--config", str(d.config), *extra],
        cwd=d.folder, capture_output=True, text=True, timeout=30,
    )
    return result.returncode, result.stdout + result.stderr


def test_bad_flag_stops_startup_with_one_line(daemon):
    d = daemon(start=False)
    code, output = run_twistd(d, "--retry-interval", "abc")
    assert code != 0
    assert "Traceback" not in output, output
    assert len([line for line in output.splitlines() if "--retry-interval" in line]) == 1, output


def test_bad_config_value_names_file_and_key(daemon):
    d = daemon(start=False)
    d.config.write_text('[server]\nmax_recipients = "x"\n')
    code, output = run_twistd(d)
    assert code != 0
    assert "Traceback" not in output, output
    assert len([line for line in output.splitlines() if f"{d.config}:server.max_recipients" in line]) == 1, output


def test_busy_relay_port_stops_startup_with_one_line(daemon):
    d = daemon(start=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", d.relay_port))
        busy.listen()
        code, output = run_twistd(d)
    assert code != 0
    assert "Traceback" not in output, output
    assert len([line for line in output.splitlines() if str(d.relay_port) in line]) == 1, output


# --- 10: the installed (non-editable) package --------------------------------------

_NOT_SOURCE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache",
    "var", "tests", "dropin.cache",
)
_RUN_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv = ['twistd', *sys.argv[1:]]; run()"


def can_build_wheels() -> bool:
    """--no-build-isolation needs bdist_wheel in this venv: the `wheel` package, or setuptools >= 70.1."""
    try:
        metadata.version("wheel")
        return True
    except metadata.PackageNotFoundError:
        return tuple(int(part) for part in metadata.version("setuptools").split(".")[:2]) >= (70, 1)


@pytest.mark.skipif(not can_build_wheels(), reason="no bdist_wheel in the venv: install `wheel` or setuptools>=70.1")
def test_installed_copy_runs_as_a_daemon(daemon, tmp_path):
    source, target = tmp_path / "src", tmp_path / "installed"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)  # the build must not write into the work tree
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert (target / "twisted" / "plugins" / "epost_plugin.py").exists()
    site = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": f"{target}:{site}"}
    python = [sys.executable, "-S"]
    where = subprocess.run(
        [*python, "-c", "import epost, twisted; print(epost.__file__); print(twisted.__file__)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(target), where
    assert Path(where[1]).is_relative_to(site), where
    help_text = subprocess.run(
        [*python, "-c", _RUN_TWISTD, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True
    ).stdout
    assert re.search(r"^\s+epost\s", help_text, re.M), help_text

    d = daemon(env=env, command=[*python, "-c", _RUN_TWISTD])
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as smtp:
        smtp.sendmail(SENDER, [ALICE], message("from the installed copy"))
    (path,) = delivered(d)
    assert "from the installed copy" in path.read_text()


# --- 11: memory ---------------------------------------------------------------------

def test_fifty_megabyte_message_is_streamed_not_buffered(daemon):
    d = daemon(server="max_message_size = 60000000")
    lines = [f"{i:010d} ".ljust(76, "abcdefghijklmnopqrstuvwxyz"[i % 26]) for i in range(50_000_000 // 78)]
    body = "\r\n".join(lines).encode() + b"\r\n"
    assert len(body) >= 50_000_000 - 78
    with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=30) as smtp:  # warm up every code path
        smtp.sendmail(SENDER, [BOB], message("warm-up"))
    delivered(d, "example.test/bob")
    before, peak_before = d.memory_kb(), d.memory_kb("VmHWM")
    children = child_peaks(d.pid)  # the spool worker (it stores the message) and the courier
    assert children, "no child processes found"

    with socket.create_connection(("127.0.0.1", d.relay_port), timeout=60) as sock:
        sock.sendall(b"EHLO client.example.org\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        sock.sendall(b"Subject: big\r\n\r\n" + body + b".\r\nQUIT\r\n")
        replies = read_replies(sock, timeout=60)
    assert [code for code, _ in replies] == [220, 250, 250, 250, 354, 250, 221], replies
    (path,) = delivered(d, timeout=30)
    after, peak = d.memory_kb(), d.memory_kb("VmHWM")
    assert after - before < 10 * 1024, f"VmRSS grew from {before} kB to {after} kB"
    assert peak - peak_before < 10 * 1024, f"peak RSS (VmHWM) grew from {peak_before} kB to {peak} kB"
    for pid, (command, peak_then) in children.items():
        grown = child_peaks(d.pid)[pid][1] - peak_then
        assert grown < 10 * 1024, f"{command}: peak RSS (VmHWM) grew by {grown} kB"
    content = path.read_bytes()
    assert content.split(b"\n\n", 1)[1] == body.replace(b"\r\n", b"\n")


def child_peaks(pid: int) -> dict[int, tuple[str, int]]:
    """{child pid: (its command line, its VmHWM in kB)} for the daemon's child processes."""
    peaks = {}
    for child, command in children(pid).items():
        status = Path(f"/proc/{child}/status").read_text()
        peaks[child] = (command, int(status.split("VmHWM:")[1].split()[0]))
    return peaks


# --- 12: idle connections -------------------------------------------------------------


def greeting(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    return sock.recv(1024)


def open_idle(d, count: int, idle: list) -> None:
    """Open `count` connections that each got their 220 and then say nothing; kept in `idle` to close."""
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", d.relay_port), timeout=10)
        idle.append(sock)
        assert greeting(sock).startswith(b"220 "), len(idle)


def test_thousand_idle_connections_do_not_block_a_real_client(daemon):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    d = daemon(server="max_connections_per_client = 2000")
    idle = []
    try:
        open_idle(d, 1000, idle)
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10) as smtp:
            smtp.sendmail(SENDER, [ALICE], message("despite 1000 idle clients"))
        delivered(d)
        assert time.monotonic() - started < 10
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_per_client_limit_refuses_the_51st_but_not_another_client(daemon):
    d = daemon()
    idle = []
    try:
        open_idle(d, 50, idle)
        with socket.create_connection(("127.0.0.1", d.relay_port), timeout=10) as extra:
            reply = greeting(extra)
        assert reply.startswith(b"421 "), reply
        with smtplib.SMTP("127.0.0.1", d.relay_port, timeout=10, source_address=("127.0.0.2", 0)) as smtp:
            smtp.sendmail(SENDER, [ALICE], message("from another client"))
        (path,) = delivered(d)
        assert "[127.0.0.2]" in parsed(path)["Received"]
    finally:
        for sock in idle:
            sock.close()
