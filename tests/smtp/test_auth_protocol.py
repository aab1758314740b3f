"""AUTH PLAIN/LOGIN over StringTransport: TLS rules, replies, throttling by Clock."""

from __future__ import annotations

import base64

from hypothesis import given, strategies as st
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address

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


class PendingPortal:
    """Every login waits until the test answers it: `answer(i, ok)`."""

    def __init__(self):
        self.attempts: list[defer.Deferred] = []

    def login(self, credentials, mind, *interfaces):
        self.attempts.append(defer.Deferred())
        return self.attempts[-1]

    def answer(self, index: int, ok: bool) -> None:
        if ok:
            self.attempts[index].callback((IAccount, "alice@example.test", lambda: None))
        else:
            self.attempts[index].errback(UnauthorizedLogin())


def session(*, tls=True, plaintext_ok=False, listener="submission", clock=None, throttle=None, ip="192.0.2.5", portal=None):
    clock = clock or task.Clock()
    portal = portal or FakePortal()
    settings = ServerSettings(
        hostname="mx.example.test", listener=listener, require_auth=listener != "relay", allow_plaintext_auth=plaintext_ok
    )
    server = SMTPServer(FakeReceiver(), settings, clock, tls_context="ctx", portal=portal, throttle=throttle or AuthThrottle(clock))
    address = IPv6Address("TCP", ip, 1234) if ":" in ip else IPv4Address("TCP", ip, 1234)
    transport = TLSStringTransport(peerAddress=address)
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


BAD = "AUTH PLAIN " + b64("\0alice@example.test\0wrong")


def test_a_clients_parallel_checks_run_one_at_a_time_each_failure_counted_before_the_next():
    clock, portal = task.Clock(), PendingPortal()
    throttle = AuthThrottle(clock, cutoff=1)
    first, transport1, _, _ = session(clock=clock, throttle=throttle, portal=portal)
    second, transport2, _, _ = session(clock=clock, throttle=throttle, portal=portal)
    assert send(first, transport1, BAD) == []
    assert send(second, transport2, BAD) == []
    assert len(portal.attempts) == 1  # the second connection's check waits for the first
    portal.answer(0, ok=False)
    assert said(transport1) == ["421 4.7.0 Too many authentication failures, try later"]
    # the first failure reached the cutoff before the second check could start: no guess for it
    assert said(transport2) == ["421 4.7.0 Too many authentication failures, try later"]
    assert len(portal.attempts) == 1
    assert throttle._turns == {}


def test_after_a_clients_check_its_next_one_starts_and_can_succeed():
    clock, portal = task.Clock(), PendingPortal()
    throttle = AuthThrottle(clock, cutoff=5)
    first, transport1, _, _ = session(clock=clock, throttle=throttle, portal=portal)
    second, transport2, _, _ = session(clock=clock, throttle=throttle, portal=portal)
    send(first, transport1, BAD)
    send(second, transport2, "AUTH PLAIN " + b64("\0alice@example.test\0secret"))
    assert len(portal.attempts) == 1
    portal.answer(0, ok=False)
    assert len(portal.attempts) == 2  # started as soon as the first was counted, not after its 535 delay
    portal.answer(1, ok=True)
    assert said(transport2) == ["235 2.7.0 Authentication successful"]
    clock.advance(1)
    assert said(transport1) == ["535 5.7.8 Authentication credentials invalid"]
    assert throttle._turns == {}


def test_different_clients_are_checked_side_by_side():
    clock, portal = task.Clock(), PendingPortal()
    throttle = AuthThrottle(clock)
    one, transport1, _, _ = session(clock=clock, throttle=throttle, portal=portal, ip="192.0.2.5")
    other, transport2, _, _ = session(clock=clock, throttle=throttle, portal=portal, ip="192.0.2.6")
    send(one, transport1, BAD)
    send(other, transport2, BAD)
    assert len(portal.attempts) == 2


def test_a_connection_that_closes_while_waiting_for_its_turn_costs_no_check():
    clock, portal = task.Clock(), PendingPortal()
    throttle = AuthThrottle(clock)
    first, transport1, _, _ = session(clock=clock, throttle=throttle, portal=portal)
    second, transport2, _, _ = session(clock=clock, throttle=throttle, portal=portal)
    send(first, transport1, BAD)
    send(second, transport2, "AUTH PLAIN " + b64("\0alice@example.test\0secret"))
    second.connectionLost(None)
    portal.answer(0, ok=True)
    assert len(portal.attempts) == 1
    assert said(transport2) == []
    assert throttle._turns == {}


def test_failures_count_against_a_whole_ipv6_64_and_all_of_loopback():
    clock = task.Clock()
    throttle = AuthThrottle(clock, cutoff=1)
    for guesser, neighbour, stranger in (
        ("2001:db8:1:2::10", "2001:db8:1:2:ffff::99", "2001:db8:1:3::10"),
        ("127.0.0.1", "127.0.0.2", "192.0.2.9"),
    ):
        server, transport, _, _ = session(clock=clock, throttle=throttle, ip=guesser)
        assert send(server, transport, BAD) == ["421 4.7.0 Too many authentication failures, try later"]
        server, transport, portal, _ = session(clock=clock, throttle=throttle, ip=neighbour)
        assert send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret"))[0].startswith("421")
        assert portal.attempts == []
        server, transport, _, _ = session(clock=clock, throttle=throttle, ip=stranger)
        assert send(server, transport, "AUTH PLAIN " + b64("\0alice@example.test\0secret")) == ["235 2.7.0 Authentication successful"]


def test_a_thousand_waiting_checks_of_a_shut_out_client_end_in_order_without_deepening_the_stack():
    """Each ends at once (no check is made): handing the turn on by callbacks
    would recurse once per waiter and strand the rest behind a RecursionError."""
    throttle = AuthThrottle(task.Clock(), cutoff=1)
    first, answers = defer.Deferred(), []
    throttle.in_turn("client", lambda: first).addCallback(answers.append)
    for n in range(1000):
        throttle.in_turn("client", lambda n=n: ("shut out", n) if throttle.blocked("client") else ("checked", n)).addCallback(
            answers.append)
    throttle.failed("client")
    first.callback("failed")
    assert answers == ["failed"] + [("shut out", n) for n in range(1000)]
    assert throttle._turns == {}


def test_a_check_that_raises_fails_its_own_turn_and_the_next_goes_on():
    throttle = AuthThrottle(task.Clock())
    failures, answers = [], []
    throttle.in_turn("client", lambda: 1 / 0).addErrback(failures.append)
    throttle.in_turn("client", lambda: "next").addCallback(answers.append)
    assert failures[0].check(ZeroDivisionError) and answers == ["next"]
    assert throttle._turns == {}
