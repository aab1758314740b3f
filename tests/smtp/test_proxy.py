"""PROXY protocol listeners (epost/smtp/proxy.py) over StringTransport."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport

from test_hostile_peers import RecordingEvents
from test_server import FakeReceiver

from epost.smtp.factory import ConnectionLimits, SMTPFactory
from epost.smtp.proxy import (
    PROXY_BAD_HEADER,
    PROXY_TIMEOUT,
    PROXY_UNTRUSTED,
    BadHeader,
    ProxyFactory,
    header_kind,
    is_trusted,
    parse_header,
)
from epost.smtp.server import ServerSettings, SMTPServer

BALANCER = "127.0.0.1"
TRUSTED = (ipaddress.ip_network("127.0.0.1/32"),)
V1 = b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 2525\r\n"
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int = 1, src="127.0.0.5", dst="127.0.0.1", sport=40000, dport=2525) -> bytes:
    body = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
    if command == 0:
        return V2_SIG + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    return V2_SIG + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def setup(per_client: int = 50, peer: str = BALANCER):
    clock = task.Clock()
    events = RecordingEvents()
    receiver = FakeReceiver()
    limits = ConnectionLimits(100, per_client)
    inner = SMTPFactory(receiver, ServerSettings(hostname="mx.example.test"), clock, limits, events=events)
    factory = ProxyFactory(inner, TRUSTED, clock, events, "relay")
    return factory, clock, events, receiver, limits


def connect(factory, peer: str = BALANCER, port: int = 50000):
    address = IPv4Address("TCP", peer, port)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_connection_from_outside_proxy_networks_is_closed_without_a_greeting_and_logged():
    factory, clock, events, _, limits = setup()
    protocol, transport = connect(factory, peer="192.0.2.7")
    assert transport.value() == b""
    assert transport.disconnecting or transport.disconnected
    assert events.seen == [("refused", PROXY_UNTRUSTED)]
    protocol.dataReceived(V1)
    assert transport.value() == b"" and limits.total_open == 0


@pytest.mark.parametrize("header", [V1, v2()], ids=["v1", "v2"])
def test_the_session_sees_the_real_client_and_limits_count_it(header):
    factory, clock, events, receiver, limits = setup()
    protocol, transport = connect(factory)
    assert transport.value() == b""  # no greeting before the header
    protocol.dataReceived(header + b"EHLO c.example\r\nMAIL FROM:<a@example.test>\r\n")
    assert transport.value().startswith(b"220 mx.example.test")
    assert receiver.sessions[0].client_ip == "127.0.0.5"
    assert dict(limits.open) == {"127.0.0.5": 1}
    assert events.seen == []


def test_the_header_may_arrive_in_one_byte_chunks():
    factory, clock, events, receiver, limits = setup()
    protocol, transport = connect(factory)
    for byte in v2():
        assert transport.value() == b""
        protocol.dataReceived(bytes([byte]))
    assert transport.value().startswith(b"220 ")
    assert dict(limits.open) == {"127.0.0.5": 1}


def test_a_short_first_chunk_of_a_v1_header_is_waited_for():
    factory, clock, events, receiver, limits = setup()
    protocol, transport = connect(factory)
    protocol.dataReceived(b"PRO")
    protocol.dataReceived(V1[3:])
    assert transport.value().startswith(b"220 ")
    assert not transport.disconnecting


def test_a_local_header_is_served_as_the_balancer():
    factory, clock, events, receiver, limits = setup()
    protocol, transport = connect(factory)
    protocol.dataReceived(v2(command=0) + b"MAIL FROM:<a@example.test>\r\n")
    assert transport.value().startswith(b"220 ")
    assert dict(limits.open) == {BALANCER: 1}


def relay_policy():
    """The real relay policy with the defaults: relay_networks 127.0.0.0/8, as proxy_networks."""
    from types import SimpleNamespace

    from epost.smtp.policy import RecipientPolicy

    return RecipientPolicy(None, local_domains=("example.test",), relay_domains=(),
                           relay_networks=(ipaddress.ip_network("127.0.0.0/8"),),
                           gateway=lambda: SimpleNamespace(is_operated=lambda domain: False),
                           aliases=lambda: SimpleNamespace(lookup=lambda address, domains: None))


V2_UNSPEC = V2_SIG + bytes([0x21, 0x00]) + struct.pack("!H", 0)
V2_UNIX = V2_SIG + bytes([0x21, 0x31]) + struct.pack("!H", 216) + bytes(216)


@pytest.mark.parametrize("header", [v2(command=0), b"PROXY UNKNOWN\r\n", V2_UNSPEC, V2_UNIX],
                         ids=["v2-local", "v1-unknown", "v2-unspec", "v2-unix"])
def test_a_header_naming_no_client_is_served_as_the_balancer_but_may_not_relay(header):
    from epost.address import parse_mailbox
    from epost.smtp.interfaces import Rejected

    factory, clock, events, receiver, limits = setup()
    protocol, transport = connect(factory)
    protocol.dataReceived(header + b"EHLO balancer.example\r\nMAIL FROM:<a@example.test>\r\n")
    assert b"250 " in transport.value()  # HAProxy's smtpchk (EHLO, QUIT) still sees a healthy node
    [session] = receiver.sessions
    assert session.client_ip == BALANCER and not session.client_known
    policy = relay_policy()
    assert not policy.trusted(session)  # not signed, not verified as our users' mail
    with pytest.raises(Rejected) as refused:
        policy.route_for(session, parse_mailbox("someone@far.example"))
    assert refused.value.reply.code == 554


def test_a_header_naming_the_client_keeps_relay_networks_in_force():
    factory, clock, events, receiver, limits = setup()
    protocol, transport = connect(factory)
    protocol.dataReceived(v2(src="127.0.0.5") + b"EHLO c.example\r\nMAIL FROM:<a@example.test>\r\n")
    [session] = receiver.sessions
    assert session.client_known and relay_policy().trusted(session)


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",
        b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 127.0.0.5 mx.example 1 2\r\n",
        b"PROXY " + b"x" * 120,
        V2_SIG + b"\x31\x11\x00\x0c" + b"\x00" * 12,
    ],
    ids=["plain-smtp", "bad-v1-address", "bad-v1-destination", "overlong-v1", "bad-v2-version"],
)
def test_a_missing_or_garbled_header_closes_without_a_greeting(data):
    factory, clock, events, receiver, limits = setup()
    protocol, transport = connect(factory)
    protocol.dataReceived(data)
    assert transport.value() == b""
    assert transport.disconnecting or transport.disconnected
    assert events.seen == [("refused", PROXY_BAD_HEADER)]
    assert limits.total_open == 0


def test_no_header_in_time_closes_the_connection():
    factory, clock, events, receiver, limits = setup()
    protocol, transport = connect(factory)
    protocol.dataReceived(b"PROXY TCP4")
    clock.advance(factory.timeout)
    assert transport.value() == b"" and transport.disconnecting
    assert events.seen == [("refused", PROXY_TIMEOUT)]


def test_the_per_client_limit_counts_real_clients_not_the_balancer():
    factory, clock, events, receiver, limits = setup(per_client=1)
    first, t1 = connect(factory, port=1)
    first.dataReceived(v2(src="198.51.100.1"))
    second, t2 = connect(factory, port=2)
    second.dataReceived(v2(src="198.51.100.2"))
    third, t3 = connect(factory, port=3)
    third.dataReceived(v2(src="198.51.100.1"))
    assert t1.value().startswith(b"220 ") and t2.value().startswith(b"220 ")
    assert t3.value().startswith(b"421 ")
    first.connectionLost(None)
    assert dict(limits.open) == {"198.51.100.2": 1}


def test_trusted_sources_and_header_kinds():
    assert is_trusted("127.0.0.1", TRUSTED) and not is_trusted("127.0.0.2", TRUSTED)
    assert is_trusted("::ffff:127.0.0.1", TRUSTED) and not is_trusted("", TRUSTED)
    assert header_kind(b"\r\n") is None and header_kind(b"PRO") is None
    assert header_kind(b"PROXY ") == "v1" and header_kind(V2_SIG) == "v2" and header_kind(b"EHLO") == ""


def test_starttls_is_offered_and_started_under_the_header():
    from test_server import TLSStringTransport

    clock = task.Clock()
    events = RecordingEvents()
    inner = SMTPFactory(FakeReceiver(), ServerSettings(hostname="mx.example.test"), clock, ConnectionLimits(10, 10), tls_context="ctx", events=events)
    factory = ProxyFactory(inner, TRUSTED, clock, events, "submission")
    address = IPv4Address("TCP", BALANCER, 50000)
    protocol = factory.buildProtocol(address)
    transport = TLSStringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    protocol.dataReceived(v2() + b"EHLO c.example\r\n")
    assert b"250-STARTTLS" in transport.value() or b"250 STARTTLS" in transport.value()
    protocol.dataReceived(b"STARTTLS\r\n")
    assert transport.tls_started_with == "ctx"


# -- the hand-over: after the header the wrapper is out of the path -------------------


def reactor_connect(factory, peer: str = BALANCER, port: int = 50000):
    """As a reactor connects: the transport delivers to its `protocol` attribute."""
    address = IPv4Address("TCP", peer, port)
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 2601), peerAddress=address)
    transport.protocol = factory.buildProtocol(address)
    transport.protocol.makeConnection(transport)
    return transport


def receive(transport, data: bytes) -> None:
    """What tcp.Connection does with bytes read: hand them to its current protocol."""
    transport.protocol.dataReceived(data)


def test_after_the_header_the_session_is_the_connections_protocol_and_the_connection_its_transport():
    factory, clock, events, receiver, limits = setup()
    transport = reactor_connect(factory)
    wrapper = transport.protocol
    receive(transport, v2())
    session = transport.protocol
    assert isinstance(session, SMTPServer) and session is not wrapper
    assert session.transport is transport
    assert factory.protocols == {}  # nothing of the connection is kept once handed over
    wrapper.dataReceived = wrapper.connectionLost = None  # any later call through the wrapper would raise
    receive(transport, b"EHLO c.example\r\nMAIL FROM:<a@example.test>\r\n")
    assert transport.value().splitlines()[-1] == b"250 2.1.0 Ok"
    assert receiver.sessions[0].client_ip == "127.0.0.5"
    transport.protocol.connectionLost(None)  # the reactor's call, straight to the session
    assert limits.total_open == 0 and dict(limits.open) == {}


def test_after_the_header_the_connection_answers_getpeer_and_gethost_from_it():
    factory, clock, events, receiver, limits = setup()
    transport = reactor_connect(factory)
    receive(transport, V1)
    assert transport.getPeer() == IPv4Address("TCP", "127.0.0.5", 40000)
    assert transport.getHost() == IPv4Address("TCP", "127.0.0.1", 2525)


def test_after_a_local_header_the_connection_still_answers_with_the_balancer():
    factory, clock, events, receiver, limits = setup()
    transport = reactor_connect(factory)
    receive(transport, v2(command=0))
    assert isinstance(transport.protocol, SMTPServer)
    assert transport.getPeer() == IPv4Address("TCP", BALANCER, 50000)
    assert transport.getHost() == IPv4Address("TCP", "127.0.0.1", 2601)


def test_bytes_after_the_header_in_the_same_chunk_reach_the_session():
    factory, clock, events, receiver, limits = setup()
    transport = reactor_connect(factory)
    receive(transport, V1 + b"EHLO c.example\r\nMAIL FROM:<a@example.test>\r\n")
    assert [line[:3] for line in transport.value().splitlines() if line[3:4] != b"-"] == [b"220", b"250", b"250"]


def test_the_session_is_the_producer_of_the_real_connection_and_pauses_its_reading():
    factory, clock, events, receiver, limits = setup()
    transport = reactor_connect(factory)
    receive(transport, v2() + b"EHLO c.example\r\n")
    session = transport.protocol
    assert transport.producer is session and transport.streaming
    receive(transport, b"MAIL FROM:<slow@example.test>\r\n")  # a pending check stops reading
    assert transport.producerState == "paused"
    receiver.pending.pop().callback(None)
    assert transport.producerState == "producing"
    session.pauseProducing()  # the connection's buffer is full: replies wait
    receive(transport, b"RSET\r\n")
    assert transport.value().splitlines()[-1] == b"250 2.1.0 Ok"
    session.resumeProducing()
    assert transport.value().splitlines()[-1] == b"250 2.0.0 Ok"


def test_a_session_whose_replies_go_unread_aborts_the_real_connection():
    factory, clock, events, receiver, limits = setup()
    transport = reactor_connect(factory)
    receive(transport, v2() + b"EHLO c.example\r\n")
    transport.protocol.pauseProducing()  # the connection's buffer is full
    clock.advance(ServerSettings(hostname="x").command_timeout)
    assert transport.disconnected  # StringTransport: only abortConnection sets it
    assert limits.total_open == 1  # until the reactor reports the loss
    transport.protocol.connectionLost(None)
    assert limits.total_open == 0


def test_a_v1_header_with_a_port_that_is_no_number_is_refused():
    factory, clock, events, receiver, limits = setup()
    transport = reactor_connect(factory)
    receive(transport, b"PROXY TCP4 127.0.0.5 127.0.0.1 4x 2525\r\n")
    assert transport.value() == b"" and transport.disconnecting
    assert events.seen == [("refused", PROXY_BAD_HEADER)]


# -- the header parser --------------------------------------------------------------

addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
ports = st.integers(0, 65535)


def v1_line(source, destination, sport: int, dport: int) -> bytes:
    family = "TCP4" if source.version == 4 else "TCP6"
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2_proxy(source, destination, sport: int, dport: int, tlv: bytes = b"") -> bytes:
    family = 0x11 if source.version == 4 else 0x21
    body = source.packed + destination.packed + struct.pack("!HH", sport, dport) + tlv
    return V2_SIG + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


@given(addresses, ports, ports, st.binary(max_size=40), st.binary(max_size=8), st.booleans())
def test_v1_and_v2_headers_give_the_addresses_and_ports_they_carry_and_the_bytes_after(source, sport, dport, rest, tlv, v1):
    destination = ipaddress.ip_address("192.0.2.25" if source.version == 4 else "2001:db8::25")
    header = v1_line(source, destination, sport, dport) if v1 else v2_proxy(source, destination, sport, dport, tlv)
    got_source, got_destination, got_rest = parse_header(header + rest)
    assert (ipaddress.ip_address(got_source.host), got_source.port) == (source, sport)
    family = socket.AF_INET if source.version == 4 else socket.AF_INET6
    assert got_source.host == socket.inet_ntop(family, source.packed)  # as a direct connection's: limits count one client once
    assert (ipaddress.ip_address(got_destination.host), got_destination.port) == (destination, dport)
    assert got_rest == rest
    for cut in range(len(header)):
        assert parse_header(header[:cut]) is None  # a header cut short is waited for, never refused


@given(st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIG, V2_SIG + b"\x21\x11"]), st.binary(max_size=120))
def test_any_bytes_are_a_header_or_not_yet_or_refused_and_never_raise_anything_else(prefix, data):
    try:
        parse_header(prefix + data)
    except BadHeader:
        pass


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 010.0.0.1 127.0.0.1 1 2\r\n",  # leading zeros: no canonical address
        b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n",  # the family says IPv4
        b"PROXY TCP4 127.0.0.5 127.0.0.1 65536 2\r\n",
        b"PROXY TCP4 127.0.0.5 127.0.0.1 -1 2\r\n",
        b"PROXY TCP4 127.0.0.5 127.0.0.1 1 2 3\r\n",
        b"PROXY TCP4  127.0.0.5 127.0.0.1 1 2\r\n",
        b"PROXY UDP4 127.0.0.5 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 127.0.0.\xff 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 127.0.0.5\x00 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 " + b"1" * 100 + b"\r\n",  # no line end within 107 bytes
        V2_SIG + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
        V2_SIG + b"\x21\x11\x00\x08" + b"\x00" * 8,  # address block shorter than IPv4's
        V2_SIG + b"\x21\x41\x00\x00",  # family 4
    ],
)
def test_nasty_headers_are_refused(header):
    with pytest.raises(BadHeader):
        parse_header(header + b"EHLO x\r\n")


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", v2(command=0), V2_SIG + b"\x21\x12\x00\x0c" + b"\x00" * 12, V2_SIG + b"\x21\x31\x00\xd8" + b"\x00" * 216],
    ids=["v1-unknown", "v1-unknown-with-addresses", "v2-local", "v2-udp", "v2-unix"],
)
def test_headers_without_a_tcp_client_stand_for_the_balancer(header):
    assert parse_header(header + b"EHLO x\r\n") == (None, None, b"EHLO x\r\n")


def test_an_ipv6_client_is_spelt_canonically():
    source, _, _ = parse_header(b"PROXY TCP6 2001:DB8:0:0::5 2001:db8::25 1 2\r\n")
    assert source == IPv6Address("TCP", "2001:db8::5", 1)


def test_a_connection_lost_before_its_header_leaves_no_timer_and_no_registration():
    factory, clock, events, receiver, limits = setup()
    transport = reactor_connect(factory)
    receive(transport, b"PROXY TCP4 127.0.0.5")
    assert len(factory.protocols) == 1 and len(clock.getDelayedCalls()) == 1
    transport.protocol.connectionLost(None)
    assert factory.protocols == {} and clock.getDelayedCalls() == []
    assert limits.total_open == 0 and events.seen == []
