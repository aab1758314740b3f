"""AUTH PLAIN/LOGIN over StringTransport: TLS rules, replies, throttling by Clock."""

from __future__ import annotations

import base64

from hypothesis import given, strategies as st
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address

from test_server import FakeReceiver, TLSStringTransport

from epost.smtp.interfaces import IAccount
from epost.smtp.server import ServerSettings, SMTPServer
from epost.smtp.throttle import AuthThrottle


class FakePortal:
    """alice@example.test / secret; records every login attempt."""

    def __init__(self):
        self.attempts = []

    def login(self, credentials, mind, *interfaces):
        assert IAccount in interfaces
        self.attempts.append((credentials.username, credentials.password))
        if (credentials.username.lower(), credentials.password) == ("alice@example.test", "secret"):
            return defer.succeed((IAccount, "alice@example.test", lambda: None))
        return defer.fail(UnauthorizedLogin())


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def session(*, tls=True, plaintext_ok=False, listener="submission", clock=None, throttle=None, ip="192.0.2.5"):
    clock = clock or task.Clock()
    portal = FakePortal()
    settings = ServerSettings(
        hostname="mx.example.test", listener=listener, require_auth=listener != "relay", allow_plaintext_auth=plaintext_ok
    )
    server = SMTPServer(FakeReceiver(), settings, clock, tls_context="ctx", portal=portal, throttle=throttle or AuthThrottle(clock))
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", ip, 1234))
    server.makeConnection(transport)
    if tls:
        server.dataReceived(b"EHLO c\r\nSTARTTLS\r\n")
    server.dataReceived(b"EHLO c\r\n")
    transport.clear()
    return server, transport, portal, clock


def said(transport) -> list[str]:
    return transport.value().decode().splitlines()


def send(server, transport, line: str) -> list[str]:
    transport.clear()
    server.dataReceived(line.encode() + b"\r\n")
    return said(transport)


def test_auth_is_advertised_only_after_tls():
    server, transport, _, _ = session(tls=False)
    server.dataReceived(b"EHLO c\r\n")
    assert not any("AUTH" in line for line in said(transport))
    server, transport, _, _ = session(tls=True)
    server.dataReceived(b"EHLO c\r\n")
    assert "250 AUTH PLAIN LOGIN" in said(transport)


def test_auth_before_tls_gets_538_unless_plaintext_is_allowed():
    server, transport, portal, _ = session(tls=False)
    assert send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret")) == [
        "538 5.7.11 Encryption required for requested authentication mechanism"
    ]
    assert portal.attempts == []
    server, transport, _, _ = session(tls=False, plaintext_ok=True)
    assert send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret")) == ["235 2.7.0 Authentication successful"]


def test_plain_with_initial_response_then_mail_is_allowed():
    server, transport, _, _ = session()
    assert send(server, transport, "MAIL FROM:<alice@example.test>") == ["530 5.7.0 Authentication required"]
    assert send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret")) == ["235 2.7.0 Authentication successful"]
    assert send(server, transport, "MAIL FROM:<alice@example.test>") == ["250 2.1.0 Ok"]
    assert server._session().user == "alice@example.test"


def test_plain_with_a_challenge():
    server, transport, _, _ = session()
    assert send(server, transport, "AUTH PLAIN") == ["334 "]
    assert send(server, transport, b64("\0alice@example.test\0secret")) == ["235 2.7.0 Authentication successful"]


def test_login_mechanism_asks_username_then_password():
    server, transport, portal, _ = session()
    assert send(server, transport, "AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    assert send(server, transport, b64("alice@example.test")) == ["334 UGFzc3dvcmQ6"]
    assert send(server, transport, b64("secret")) == ["235 2.7.0 Authentication successful"]
    assert portal.attempts == [("alice@example.test", "secret")]


def test_wrong_password_is_535_after_a_delay():
    server, transport, _, clock = session()
    assert send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0wrong")) == []
    clock.advance(1)
    assert said(transport) == ["535 5.7.8 Authentication credentials invalid"]


@given(st.sampled_from([
    "AUTH",
    "AUTH PLAIN !!!notbase64",
    "AUTH PLAIN " + b64("only-one-part"),
    "AUTH PLAIN " + b64("\0\0"),
    "AUTH BOGUS xyz",
    "AUTH LOGIN ===",
]))
def test_malformed_auth_gets_a_reply_and_keeps_the_session(line):
    server, transport, _, _ = session()
    replies = send(server, transport, line)
    assert len(replies) == 1 and replies[0][:3] in {"501", "504"}, replies
    assert not transport.disconnecting
    assert send(server, transport, "NOOP") == ["250 2.0.0 Ok"]


def test_star_cancels_an_exchange():
    server, transport, _, _ = session()
    send(server, transport, "AUTH LOGIN")
    assert send(server, transport, "*") == ["501 5.7.0 Authentication cancelled"]
    assert send(server, transport, "NOOP") == ["250 2.0.0 Ok"]  # back to commands


def test_authzid_for_someone_else_is_refused():
    server, transport, portal, clock = session()
    send(server, transport, "AUTH PLAIN " + b64("bob@example.test\0alice@example.test\0secret"))
    clock.advance(1)
    assert said(transport) == ["535 5.7.8 Authentication credentials invalid"]
    assert portal.attempts == []


def test_starttls_forgets_an_earlier_plaintext_login():
    server, transport, _, _ = session(tls=False, plaintext_ok=True)
    send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret"))
    send(server, transport, "STARTTLS")
    server.dataReceived(b"EHLO c\r\n")
    assert send(server, transport, "MAIL FROM:<alice@example.test>") == ["530 5.7.0 Authentication required"]


def test_repeated_failures_slow_down_then_cut_off_the_client_exactly():
    clock = task.Clock()
    throttle = AuthThrottle(clock, cutoff=3, window=300)
    server, transport, _, _ = session(clock=clock, throttle=throttle)
    bad = "AUTH PLAIN " + b64("\0alice@example.test\0wrong")
    send(server, transport, bad)
    clock.advance(0.99)
    assert said(transport) == []  # first failure waits 1 s
    clock.advance(0.01)
    assert said(transport) == ["535 5.7.8 Authentication credentials invalid"]
    send(server, transport, bad)
    clock.advance(1.99)
    assert said(transport) == []  # second failure waits 2 s
    clock.advance(0.01)
    assert said(transport) == ["535 5.7.8 Authentication credentials invalid"]
    assert send(server, transport, bad) == ["421 4.7.0 Too many authentication failures, try later"]
    assert transport.disconnecting
    # a new connection from the same IP is shut out until the window has passed ...
    again, transport2, _, _ = session(clock=clock, throttle=throttle)
    assert send(again, transport2, "AUTH PLAIN " + b64("\0alice@example.test\0secret"))[0].startswith("421 4.7.0")
    # ... while another client is not affected, and the block ends with the window
    other, transport3, _, _ = session(clock=clock, throttle=throttle, ip="192.0.2.77")
    assert send(other, transport3, "AUTH PLAIN " + b64("\0alice@example.test\0secret")) == ["235 2.7.0 Authentication successful"]
    clock.advance(300)
    later, transport4, _, _ = session(clock=clock, throttle=throttle)
    assert send(later, transport4, "AUTH PLAIN " + b64("\0alice@example.test\0secret")) == ["235 2.7.0 Authentication successful"]


def test_relay_port_accepts_auth_after_starttls():
    server, transport, _, _ = session(listener="relay")
    assert send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret")) == ["235 2.7.0 Authentication successful"]


def test_second_auth_and_auth_inside_a_transaction_get_503():
    server, transport, _, _ = session(listener="relay")
    send(server, transport, "MAIL FROM:<x@example.org>")
    assert send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret"))[0].startswith("503")
    send(server, transport, "RSET")
    send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret"))
    assert send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret")) == ["503 5.5.1 Error: already authenticated"]
