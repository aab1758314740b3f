"""epost nodes behind a real HAProxy with send-proxy-v2 (docs/scaling.md)."""

from __future__ import annotations

import shutil
import signal
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from e2e_support import free_port, maildir_messages, port_answers, wait_for
from test_submission_e2e import ALICE, PASSWORD, set_password, unverified

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy")

BEHIND = """relay_networks = ["127.0.0.1/32"]
proxy_networks = ["127.0.0.1/32"]"""
CLIENT = "127.0.0.5"  # outside relay_networks; loopback answers every 127/8 address


def proxied_node(daemon):
    """A started node whose relay listener expects a PROXY header."""
    node = daemon(server=BEHIND, start=False)
    text = node.config.read_text().replace('relay = ["tcp:', 'relay = ["haproxy:tcp:', 1)
    node.config.write_text(text)
    return node.start()


def haproxy_config(folder: Path, port: int, nodes, proxy: bool = True, check: str = "option smtpchk HELO balancer.example") -> Path:
    """A private HAProxy in front of `nodes` (their relay ports, or ports as such);
    `proxy=False` relays plain TCP (no PROXY header), for comparison."""
    header = "send-proxy-v2 check check-send-proxy" if proxy else "check"
    servers = "\n".join(
        f"    server n{i} 127.0.0.1:{getattr(node, 'relay_port', node)} {header} inter 200ms fall 1 rise 1"
        for i, node in enumerate(nodes)
    )
    config = folder / "haproxy.cfg"
    config.write_text(
        f"""global
    pidfile {folder}/haproxy.pid
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
frontend smtp
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance roundrobin
    source 127.0.0.1
    {check}
{servers}
"""
    )
    return config


@pytest.fixture
def balancer(tmp_path):
    started = []

    def start(nodes, **options):
        port = free_port()
        folder = tmp_path / f"haproxy{len(started)}"
        folder.mkdir()
        config = haproxy_config(folder, port, nodes, **options)
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=open(folder / "haproxy.log", "ab"), stderr=subprocess.STDOUT)
        started.append(proc)
        wait_for(lambda: port_answers(port), message="haproxy did not listen")
        return port

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(5)


def send(port: int, recipient: str, source: str = CLIENT, subject: str = "hi") -> tuple[int, bytes]:
    """(code, text) of RCPT, or of DATA when RCPT is accepted."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.org", timeout=10, source_address=(source, 0)) as client:
        client.ehlo()
        client.mail("someone@outside.example")
        code, text = client.rcpt(recipient)
        if code != 250:
            return code, text
        return client.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def test_a_client_outside_relay_networks_may_not_relay_through_a_trusted_balancer(daemon, balancer):
    node = proxied_node(daemon)
    port = balancer([node])
    code, text = send(port, "victim@remote.example")
    assert code == 554, (code, text)
    code, _ = send(port, "alice@example.test")
    assert code == 250
    wait_for(lambda: maildir_messages(node.spool, "example.test/alice"), message="no delivery")
    message = maildir_messages(node.spool, "example.test/alice")[0].read_text()
    assert f"[{CLIENT}]" in message and "[127.0.0.1]" not in message.split("\n\n")[0]


def test_a_connection_straight_to_a_proxied_listener_gets_no_greeting(daemon):
    node = proxied_node(daemon)
    # The node resets the connection: smtplib sees it while reading the greeting, or,
    # on a loaded machine, the reset beats connect() itself.
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionResetError)):
        smtplib.SMTP("127.0.0.1", node.relay_port, timeout=5, source_address=(CLIENT, 0))
    wait_for(lambda: "reason=proxy_untrusted" in node.log.read_text(), message="no log line")


def test_mail_reaches_both_nodes_and_draining_one_loses_nothing(daemon, balancer):
    nodes = [proxied_node(daemon), proxied_node(daemon)]
    port = balancer(nodes)
    time.sleep(0.5)  # both marked up by their first health check
    for i in range(4):
        assert send(port, "alice@example.test", subject=f"before {i}")[0] == 250
    wait_for(lambda: all(maildir_messages(n.spool, "example.test/alice") for n in nodes), message="not both nodes")
    assert nodes[0].stop() == -signal.SIGTERM  # drained and stopped (twistd re-raises the signal; SIGKILL would read -9)
    for i in range(4):
        assert send(port, "alice@example.test", subject=f"after {i}")[0] == 250
    delivered = lambda: sum(len(maildir_messages(n.spool, "example.test/alice")) for n in nodes)
    wait_for(lambda: delivered() == 8, message=f"delivered {delivered()} of 8")
    subjects = [p.read_text() for p in maildir_messages(nodes[1].spool, "example.test/alice")]
    assert sum("Subject: after" in s for s in subjects) == 4


def test_starttls_and_implicit_tls_work_through_the_balancer_and_see_the_client(daemon, balancer):
    """After the header the session talks to the connection itself: TLS must start on it."""
    smtps = free_port()
    node = daemon(server=BEHIND, args=["--smtps", f"haproxy:tcp:{smtps}:interface=127.0.0.1"], start=False)
    node.config.write_text(node.config.read_text().replace('relay = ["tcp:', 'relay = ["haproxy:tcp:', 1))
    set_password(node, ALICE, PASSWORD)
    node.start()
    wait_for(lambda: port_answers(smtps), message="the smtps listener")
    relay_port = balancer([node])
    smtps_port = balancer([smtps], check="option tcp-check")  # smtpchk would speak clear text to a TLS port
    with smtplib.SMTP("127.0.0.1", relay_port, local_hostname="client.example.org", timeout=10, source_address=(CLIENT, 0)) as client:
        client.ehlo()
        assert client.starttls(context=unverified())[0] == 220
        client.ehlo()
        client.sendmail("someone@outside.example", [ALICE], b"Subject: starttls\r\n\r\nbody\r\n")
    with smtplib.SMTP_SSL("127.0.0.1", smtps_port, local_hostname="client.example.org", timeout=10, source_address=(CLIENT, 0), context=unverified()) as client:
        client.login(ALICE, PASSWORD)
        client.sendmail(ALICE, [ALICE], b"Subject: smtps\r\n\r\nbody\r\n")
    wait_for(lambda: len(maildir_messages(node.spool, "example.test/alice")) == 2, message="not both delivered")
    received = {}
    for path in maildir_messages(node.spool, "example.test/alice"):
        head = path.read_text().split("\n\n")[0]
        received["starttls" if "Subject: starttls" in head else "smtps"] = " ".join(head.split())
    assert f"[{CLIENT}]" in received["starttls"] and "ESMTPS" in received["starttls"], received
    assert f"[{CLIENT}]" in received["smtps"] and "ESMTPSA" in received["smtps"], received
    assert "[127.0.0.1]" not in received["starttls"] + received["smtps"]
