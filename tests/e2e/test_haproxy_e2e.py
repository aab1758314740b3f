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


def haproxy_config(folder: Path, port: int, nodes, proxy: bool = True) -> Path:
    """A private HAProxy in front of `nodes`; `proxy=False` relays plain TCP (no PROXY header), for comparison."""
    header = "send-proxy-v2 check check-send-proxy" if proxy else "check"
    servers = "\n".join(
        f"    server n{i} 127.0.0.1:{node.relay_port} {header} inter 200ms fall 1 rise 1"
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
    option smtpchk HELO balancer.example
{servers}
"""
    )
    return config


@pytest.fixture
def balancer(tmp_path):
    started = []

    def start(nodes):
        port = free_port()
        config = haproxy_config(tmp_path, port, nodes)
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=open(tmp_path / "haproxy.log", "ab"), stderr=subprocess.STDOUT)
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
    with pytest.raises(smtplib.SMTPServerDisconnected):
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
