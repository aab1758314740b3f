"""A real dnsmasq on 127.0.0.1, authoritative-ish for one zone, for DNS tests.

With --no-resolv and no upstream, dnsmasq REFUSEs names it does not know;
`--local=/<zone>/` makes it answer NXDOMAIN for unknown names in the zone
instead. `--mx-host=<domain>,.,0` serves an RFC 7505 null MX as-is.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query

DNSMASQ = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/usr/local/sbin")


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (dnsmasq needs both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


class Dnsmasq:
    """One dnsmasq process; `records` are dnsmasq options such as `--mx-host=a.test,mx.a.test,10`."""

    def __init__(self, records: Sequence[str], zone: str = "test") -> None:
        if DNSMASQ is None:
            raise RuntimeError("dnsmasq is not installed (Debian: dnsmasq-base)")
        self.zone = zone
        self.records = list(records)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="dnsmasq-", suffix=".log")[1])

    def start(self, wait: float = 10.0) -> None:
        """Start on a free port and return once it answers a query; retries if the port got taken."""
        for _ in range(5):
            self.port = free_port()
            with self._log.open("ab") as log:
                self._process = subprocess.Popen(
                    [
                        str(DNSMASQ),
                        "--conf-file=/dev/null",  # not /etc/dnsmasq.conf
                        "--pid-file=",  # no pid file
                        f"--port={self.port}",
                        "--listen-address=127.0.0.1",
                        "--bind-interfaces",
                        "--no-resolv",
                        "--no-hosts",
                        "--no-daemon",
                        "--log-facility=-",
                        "--log-queries",
                        f"--local=/{self.zone}/",
                        *self.records,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_until_answering(time.monotonic() + wait):
                return
            self.stop()
        raise RuntimeError(f"dnsmasq did not start: {self.log()}")

    def _wait_until_answering(self, deadline: float) -> bool:
        query = dns.message.make_query(f"probe.{self.zone}.", "A")
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False  # exited, e.g. "Address already in use"
            try:
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.05)
                return True
            except (OSError, dns.exception.Timeout):
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop the process if running; safe to call twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log(self) -> str:
        """What dnsmasq wrote so far (startup messages and queries)."""
        return self._log.read_text(errors="replace")

    def cleanup(self) -> None:
        self.stop()
        self._log.unlink(missing_ok=True)
