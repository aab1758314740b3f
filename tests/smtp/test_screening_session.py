"""Screening inside the SMTP session (SPEC §5) over StringTransport and task.Clock:
pregreet, the DNSBL verdict at the first command, who is exempt, and what DNS trouble does."""

from __future__ import annotations

import ipaddress

from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from epost import metrics
from epost.smtp.dnsbl import parse_dnsbl_site
from epost.smtp.events import SessionEvents
from epost.smtp.screen import DNSBL_WAIT, DnsblChecker, Screening
from epost.smtp.server import ServerSettings, SMTPServer

from test_screen import FakeDNS
from test_server import FakeReceiver, codes, replies

RELAY_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
LISTED, CLEAN = "192.0.2.2", "192.0.2.1"
ZONE = "zen.example"
HELLO = b"EHLO client.example\r\n"


def ended(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("epost_smtp_sessions_ended_total", {"listener": "relay", "reason": reason}) or 0.0


class Harness:
    def __init__(self, greet_wait: float = 0, dnsbl: bool = True):
        self.clock, self.dns = task.Clock(), FakeDNS()
        checker = DnsblChecker([parse_dnsbl_site(f"{ZONE}*2")], 2, self.dns, self.clock) if dnsbl else None
        self.screening = Screening(self.clock, greet_wait, RELAY_NETWORKS, checker)
        self.events = SessionEvents(self.clock)

    def connect(self, ip: str = CLEAN, screening: bool = True) -> tuple[SMTPServer, StringTransport]:
        settings = ServerSettings(hostname="mx.example.test")
        server = SMTPServer(FakeReceiver(), settings, self.clock, events=self.events, screening=self.screening if screening else None)
        peer = IPv6Address("TCP", ip, 4321) if ":" in ip else IPv4Address("TCP", ip, 4321)
        transport = StringTransport(peerAddress=peer)
        server.makeConnection(transport)
        return server, transport

    def answer(self, ip: str, *addresses: str) -> None:
        from epost.smtp.dnsbl import query_name

        self.dns.answer(query_name(ip, ZONE), *addresses)


# ---- pregreet ------------------------------------------------------------------------------------


def test_greeting_waits_greet_wait():
    h = Harness(greet_wait=6, dnsbl=False)
    server, transport = h.connect()
    h.clock.advance(5.99)
    assert transport.value() == b""
    h.clock.advance(0.01)
    assert replies(transport) == ["220 mx.example.test ESMTP epost"]
    server.dataReceived(HELLO)
    assert codes(transport)[-1] == "250"


def test_a_client_that_talks_first_gets_554_5_5_1_and_is_dropped():
    h = Harness(greet_wait=6, dnsbl=False)
    before = ended("pregreet")
    server, transport = h.connect()
    h.clock.advance(3)
    with capturedLogs() as events:
        server.dataReceived(b"EH")  # a fragment is enough: it is not its turn
    assert replies(transport) == ["554 5.5.1 Error: SMTP protocol violation (talking before the greeting)"]
    assert transport.disconnecting
    h.clock.advance(10)
    assert not any(line.startswith("220") for line in replies(transport))  # the greeting never comes
    server.dataReceived(HELLO)  # anything more is ignored
    assert len(replies(transport)) == 1
    assert ended("pregreet") == before + 1
    (line,) = [e for e in events if "reason" in e and e.get("reason") == "pregreet"]
    assert line["client"] == CLEAN


def test_relay_networks_are_never_delayed():
    h = Harness(greet_wait=6)
    server, transport = h.connect("127.0.0.1")
    assert replies(transport) == ["220 mx.example.test ESMTP epost"]
    server.dataReceived(HELLO)
    assert codes(transport)[-1] == "250"
    assert h.dns.asked == []  # nor looked up in any DNSBL


def test_closing_during_the_greet_wait_leaves_no_greeting_timer():
    h = Harness(greet_wait=6, dnsbl=False)
    server, transport = h.connect()
    server.connectionLost(None)
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(6)
    assert transport.value() == b""


def test_unscreened_listener_greets_at_once():
    h = Harness(greet_wait=6)
    _, transport = h.connect(screening=False)
    assert replies(transport) == ["220 mx.example.test ESMTP epost"]
    assert h.dns.asked == []


# ---- DNSBL ----------------------------------------------------------------------------------------


def test_a_listed_client_gets_554_5_7_1_at_its_first_command_and_is_dropped():
    h = Harness()
    before = ended("dnsbl")
    server, transport = h.connect(LISTED)
    assert replies(transport) == ["220 mx.example.test ESMTP epost"]  # the greeting does not wait for DNS
    server.dataReceived(HELLO + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n")
    assert len(replies(transport)) == 1  # the first command waits for the lookup
    h.answer(LISTED, "127.0.0.2")
    assert replies(transport)[1:] == [f"554 5.7.1 Service unavailable; client [{LISTED}] blocked using {ZONE}"]
    assert transport.disconnecting
    assert ended("dnsbl") == before + 1


def test_an_unlisted_client_goes_on_once_the_lookup_answers():
    h = Harness()
    server, transport = h.connect(CLEAN)
    server.dataReceived(HELLO)
    h.answer(CLEAN)
    assert codes(transport) == ["220", "250"]
    assert not transport.disconnecting


def test_a_dns_timeout_lets_the_client_in_after_at_most_dnsbl_wait():
    h = Harness()
    server, transport = h.connect(LISTED)
    server.dataReceived(HELLO)
    h.clock.advance(DNSBL_WAIT - 0.01)
    assert codes(transport) == ["220"]
    h.clock.advance(0.01)
    assert codes(transport) == ["220", "250"]
    h.answer(LISTED, "127.0.0.2")  # too late for this session: it goes on
    server.dataReceived(b"NOOP\r\n")
    assert codes(transport) == ["220", "250", "250"]


def test_a_dns_failure_lets_the_client_in():
    h = Harness()
    server, transport = h.connect(LISTED)
    server.dataReceived(HELLO)
    from epost.smtp.dnsbl import query_name

    h.dns.fail(query_name(LISTED, ZONE), OSError("SERVFAIL"))
    assert codes(transport) == ["220", "250"]


def test_with_a_greet_wait_the_first_command_does_not_wait_for_dns_after_the_greeting():
    h = Harness(greet_wait=3)
    server, transport = h.connect(LISTED)
    h.clock.advance(3)  # DNS silent all along
    assert codes(transport) == ["220"]  # greeted on time
    server.dataReceived(HELLO)
    assert codes(transport) == ["220", "250"]  # and no further wait


def test_the_verdict_found_during_the_greet_wait_applies_at_the_first_command():
    h = Harness(greet_wait=3)
    server, transport = h.connect(LISTED)
    h.answer(LISTED, "127.0.0.2")
    h.clock.advance(3)
    assert codes(transport) == ["220"]
    server.dataReceived(HELLO)
    assert codes(transport) == ["220", "554"]


def test_quit_first_is_answered_even_when_listed():
    h = Harness()
    server, transport = h.connect(LISTED)
    h.answer(LISTED, "127.0.0.2")
    server.dataReceived(b"QUIT\r\n")
    assert codes(transport) == ["220", "221"]


def test_an_ipv6_client_is_refused_by_its_nibble_name():
    h = Harness()
    server, transport = h.connect("2001:db8::7")
    server.dataReceived(HELLO)
    h.answer("2001:db8::7", "127.0.0.2")
    assert replies(transport)[-1] == f"554 5.7.1 Service unavailable; client [2001:db8::7] blocked using {ZONE}"


def test_only_the_first_command_is_screened():
    h = Harness()
    server, transport = h.connect(CLEAN)
    server.dataReceived(HELLO)
    h.answer(CLEAN)
    server.dataReceived(b"NOOP\r\nNOOP\r\n")
    assert codes(transport) == ["220", "250", "250", "250"]
    assert len(h.dns.asked) == 1


def test_a_daemon_stop_during_the_greet_wait_says_421_and_never_greets():
    h = Harness(greet_wait=6, dnsbl=False)
    server, transport = h.connect()
    server.shut_down(5)
    h.clock.advance(6)
    assert codes(transport) == ["421"]
    assert transport.disconnecting
