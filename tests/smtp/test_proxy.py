"""PROXY protocol listeners (epost/smtp/proxy.py) over StringTransport."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from test_hostile_peers import RecordingEvents
from test_server import FakeReceiver

from epost.smtp.factory import ConnectionLimits, SMTPFactory
from epost.smtp.proxy import PROXY_BAD_HEADER, PROXY_TIMEOUT, PROXY_UNTRUSTED, ProxyFactory, header_kind, is_trusted
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


def test_under_a_tls_layer_the_session_becomes_the_layers_wrapped_protocol():
    factory, clock, events, receiver, limits = setup()
    address = IPv4Address("TCP", BALANCER, 50000)
    tcp = StringTransport(peerAddress=address)
    layer = ProtocolWrapper(WrappingFactory(factory), factory.buildProtocol(address))  # as TLSMemoryBIOProtocol
    tcp.protocol = layer
    layer.makeConnection(tcp)
    receive(tcp, v2() + b"EHLO c.example\r\n")
    assert isinstance(layer.wrappedProtocol, SMTPServer) and layer.wrappedProtocol.transport is layer
    assert layer.getPeer() == IPv4Address("TCP", "127.0.0.5", 40000)
    assert receiver.sessions == [] and b"250 " in tcp.value()


def test_a_v1_header_with_a_port_that_is_no_number_is_refused():
    factory, clock, events, receiver, limits = setup()
    transport = reactor_connect(factory)
    receive(transport, b"PROXY TCP4 127.0.0.5 127.0.0.1 4x 2525\r\n")
    assert transport.value() == b"" and transport.disconnecting
    assert events.seen == [("refused", PROXY_BAD_HEADER)]
