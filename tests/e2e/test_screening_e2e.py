"""End to end: screening on the relay port (SPEC §5) through the real `twistd -n epost`,
with a real dnsmasq on loopback serving a DNSBL zone (RFC 5782's 127.0.0.2 test entry).

The relay listener is on 127.0.0.1; clients pick their source address in
127.0.0.0/8 to be "another host": 127.0.0.2 is listed, 127.0.0.1 is not,
127.0.0.5 is listed too but in `relay_networks`.
"""

from __future__ import annotations

import smtplib
import socket
import sys
import time
from pathlib import Path

import pytest

from e2e_support import free_port, maildir_messages, wait_for
from test_metrics_e2e import scrape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "routing"))
from dnsmasq import DNSMASQ, Dnsmasq  # noqa: E402

LISTED, CLEAN, TRUSTED = "127.0.0.2", "127.0.0.1", "127.0.0.5"
ZONE = "zen.example.test"
HELLO = b"EHLO client.example\r\n"


@pytest.fixture
def blocklist():
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed")
    server = Dnsmasq(
        [f"--host-record=2.0.0.127.{ZONE},127.0.0.2", f"--host-record=5.0.0.127.{ZONE},127.0.0.2", "--local-ttl=300"],
        zone="example.test",
    )
    server.start()
    yield server
    server.cleanup()


def connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def read_reply(sock: socket.socket) -> bytes:
    """Bytes until a final reply line (`NNN ` ... CRLF) or the connection's end."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        data += chunk
        lines = data.split(b"\r\n")
        if not chunk or (len(lines) > 1 and len(lines[-2]) > 3 and lines[-2][3:4] == b" "):
            return data


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def send_mail(port: int, source: str) -> tuple[float, str]:
    """One message from `source` to a local user; (seconds until the 220, DATA reply)."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.org", timeout=30, source_address=(source, 0)) as client:
        greeted = time.monotonic() - started
        code, text = client.ehlo()
        assert code == 250, (code, text)
        assert client.mail("x@example.org")[0] == 250
        assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.data(b"Subject: screened\r\n\r\nhello\r\n")
    return greeted, f"{code} {text.decode()}"


def test_pregreet_and_dnsbl_against_a_real_dns_server(daemon, blocklist):
    admin = free_port()
    d = daemon(
        server=f"""relay_networks = ["{TRUSTED}/32"]
greet_wait = 1
dnsbl = ["{ZONE}*2", "other.example.test"]
dnsbl_threshold = 2
admin = ["tcp:{admin}:interface=127.0.0.1"]""",
        toml=f'dns_servers = ["127.0.0.1:{blocklist.port}"]',
    )

    # A client that talks first is refused and dropped, before any greeting.
    sock = connect(d.relay_port, CLEAN)
    sock.sendall(b"EHLO bot.example\r\n")
    reply = read_reply(sock)
    assert reply.startswith(b"554 5.5.1 "), reply
    assert closed(sock)
    sock.close()

    # A listed client that waits its turn gets the greeting, then 554 5.7.1 at its first command.
    sock = connect(d.relay_port, LISTED)
    started = time.monotonic()
    assert read_reply(sock).startswith(b"220 ")
    assert time.monotonic() - started >= 0.9
    sock.sendall(b"EHLO listed.example\r\n")
    reply = read_reply(sock)
    assert reply == f"554 5.7.1 Service unavailable; client [{LISTED}] blocked using {ZONE}\r\n".encode(), reply
    assert closed(sock)
    sock.close()

    # A client no zone lists waits greet_wait and sends its mail.
    greeted, reply = send_mail(d.relay_port, CLEAN)
    assert greeted >= 0.9 and reply.startswith("250 2.0.0 Ok: queued as"), (greeted, reply)

    # relay_networks are neither delayed nor looked up, though listed.
    greeted, reply = send_mail(d.relay_port, TRUSTED)
    assert greeted < 0.5 and reply.startswith("250 "), (greeted, reply)
    # The submission port is never screened: greeted at once, EHLO answered though listed.
    sock = connect(d.submission_port, LISTED)
    started = time.monotonic()
    assert read_reply(sock).startswith(b"220 ") and time.monotonic() - started < 0.5
    sock.sendall(HELLO)
    assert read_reply(sock).startswith(b"250-")
    sock.close()
    wait_for(lambda: len(maildir_messages(d.spool, "example.test/alice")) == 2, message="both messages delivered")
    assert f"5.0.0.127.{ZONE}" not in blocklist.log()

    log = d.log.read_text()
    assert "reason=pregreet" in log and f"client=[{CLEAN}]" in log
    assert "reason=dnsbl" in log and f"blocked using {ZONE}" in log
    metrics = scrape(admin)
    ended = {labels: value for (name, labels), value in metrics.items() if name == "epost_smtp_sessions_ended_total"}
    assert ended[(("listener", "relay"), ("reason", "pregreet"))] == 1
    assert ended[(("listener", "relay"), ("reason", "dnsbl"))] == 1
    assert metrics[("epost_dnsbl_lookups_total", (("result", "listed"), ("zone", ZONE)))] == 1
    # 127.0.0.1's answers were cached by its first (pregreet) connection: one query per zone in all
    assert metrics[("epost_dnsbl_lookups_total", (("result", "clean"), ("zone", ZONE)))] == 1
    assert metrics[("epost_dnsbl_lookups_total", (("result", "clean"), ("zone", "other.example.test")))] == 2


def test_a_dns_server_that_never_answers_delays_the_first_command_at_most_two_seconds(daemon):
    # write_config points dns_servers at 127.0.0.1:9, where nothing answers
    d = daemon(server=f'relay_networks = ["{TRUSTED}/32"]\ndnsbl = ["{ZONE}"]')
    started = time.monotonic()
    greeted, reply = send_mail(d.relay_port, LISTED)
    took = time.monotonic() - started
    assert greeted < 0.5, greeted  # the greeting never waits for DNS
    assert reply.startswith("250 2.0.0 Ok: queued as"), reply
    assert 1.5 < took < 4, took
