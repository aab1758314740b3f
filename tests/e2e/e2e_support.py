"""Helpers for the end-to-end tests: the real daemon (`twistd -n epost`) as a subprocess on loopback."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fakes import queued_ids

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TWISTD = str(VENV_BIN / "twistd")
HOSTNAME = "mx.example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = ""):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


def maildir_messages(spool: Path, mailbox: str) -> list[Path]:
    """Files in `<spool>/mailboxes/<mailbox>/new/`, oldest name first."""
    new = Path(spool) / "mailboxes" / mailbox / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def queued(spool: Path, state: str = "incoming") -> list[str]:
    """The IDs the daemon's queue store holds in `state` (read on a connection of our own)."""
    return queued_ids(Path(spool))[state]


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the child processes of `pid` (the daemon's spool worker, courier)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                found[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # ended in between (a restarting spool worker)
                continue
    return found


QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]+)\Z")


def submit(port: int, sender: str, recipients: list[str], content: bytes) -> str:
    """One message over SMTP on 127.0.0.1:`port`, every step checked; the queue ID from the 250 to DATA."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.org", timeout=30) as client:
        client.ehlo()
        code, text = client.mail(sender)
        assert code == 250, (code, text)
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, (recipient, code, text)
        code, text = client.data(content)
    assert code == 250, (code, text)
    match = QUEUED.search(text.decode())
    assert match, text
    return match.group(1)


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


@dataclass
class Daemon:
    folder: Path
    config: Path
    relay_port: int
    submission_port: int
    args: list[str]
    env: dict | None = None
    command: list[str] = field(default_factory=lambda: [TWISTD])
    proc: subprocess.Popen | None = None

    @property
    def spool(self) -> Path:
        return self.folder / "spool"

    @property
    def log(self) -> Path:
        return self.folder / "daemon.log"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def argv(self) -> list[str]:
        return [*self.command, "-n", "--pidfile=", "epost", "--config", str(self.config), *self.args]

    def start(self, timeout: float = 10.0) -> Daemon:
        """Started once both listeners answer. free_port() only found the ports
        free: until the daemon binds them, any connection on the machine may
        take one as its own (ephemeral) port. A first start that lost one of
        them that way moves both to fresh ones and tries again; a restart keeps its ports."""
        first = self.proc is None
        for attempt in range(3):
            logged = self.log.stat().st_size if self.log.exists() else 0
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    self.argv(), cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
                )
            deadline = time.monotonic() + timeout
            while not (port_answers(self.relay_port) and port_answers(self.submission_port)):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return self
            self.stop()
            with open(self.log, "rb") as log:
                said = log.read()[logged:].decode(errors="replace")  # this attempt's lines only
            lost = any(f"epost: cannot listen on 127.0.0.1:{port}:" in said for port in (self.relay_port, self.submission_port))
            if not (first and attempt < 2 and lost):
                pytest.fail(f"daemon did not start (exit {self.proc.returncode}):\n{self.log.read_text()}")
            self._move_to_free_ports()

    def _move_to_free_ports(self) -> None:
        """Both listeners' ports, wherever the config names them (`tcp:PORT:`, also inside `haproxy:tcp:PORT:`)."""
        text = self.config.read_text()
        for name in ("relay_port", "submission_port"):
            old, new = getattr(self, name), free_port()
            text, moved = re.subn(rf"(?<=tcp:){old}(?=:)", str(new), text)
            if not moved:
                pytest.fail(f"{self.config} does not name the {name} {old}: cannot move it")
            setattr(self, name, new)
        self.config.write_text(text)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(grace)

    def wait(self, grace: float = 5.0) -> int:
        """The exit status; SIGKILL if the daemon has not ended within `grace` seconds."""
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def memory_kb(self, field: str = "VmRSS") -> int:
        """A size from /proc/PID/status: VmRSS (now) or VmHWM (peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")


def kill9(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()


def restart(daemon: Daemon) -> Daemon:
    daemon.stop()
    return daemon.start()


def write_config(folder: Path, relay_port: int, submission_port: int, server: str = "", toml: str = "") -> Path:
    (folder / "users").write_text("alice@example.test\nbob@example.test\n")
    config = folder / "epost.toml"
    # DNS stays on loopback: nothing listens on port 9, so lookups time out (a
    # temporary failure) unless the test brings its own dnsmasq.
    dns = "" if "dns_servers" in toml else 'dns_servers = ["127.0.0.1:9"]'
    # With that DNS, Authentication-Results checks (on by default for clients
    # outside relay_networks) would only wait out their budget on each message:
    # off unless the test asks (tests/e2e/test_authres_e2e.py brings a dnsmasq).
    if dns and "authentication_results" not in server:
        server = "authentication_results = false\n" + server
    config.write_text(
        f"""[server]
hostname = "{HOSTNAME}"
relay = ["tcp:{relay_port}:interface=127.0.0.1"]
submission = ["tcp:{submission_port}:interface=127.0.0.1"]
spool = "spool"
{server}

[routing]
local_domains = ["example.test"]
users = "users"
{dns}
{toml}
"""
    )
    return config


def daemons(tmp_path: Path, node=None):
    """The body of the `daemon` fixture (tests/e2e and tests/stress): yields a
    maker of started daemons, each in a folder of its own, and stops them all.
    With the test's `node`, a failure's report ends with their logs (tests/conftest.py)."""
    started: list[Daemon] = []
    if node is not None:
        node.epost_daemons = started

    def make(server: str = "", toml: str = "", args: list[str] = (), start: bool = True, **kwargs) -> Daemon:
        folder = tmp_path / f"d{len(started)}" if started else tmp_path
        folder.mkdir(exist_ok=True)
        relay, submission = free_port(), free_port()
        config = write_config(folder, relay, submission, server, toml)
        d = Daemon(folder, config, relay, submission, list(args), **kwargs)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()
