"""Mail Control's listener against a client that never reads its replies (issue 18).

twisted.web's HTTPChannel is the transport's streaming producer and stops
reading while its output is paused; these tests hold it to that, and check
that such a connection is closed after IDLE_TIMEOUT and aborted after
HTTPChannel.abortTimeout when the close cannot finish."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from web_support import make_world

from epost.web.site import IDLE_TIMEOUT

REQUEST = b"GET /login HTTP/1.1\r\nHost: x\r\n\r\n"


class Transport(StringTransport):
    def __init__(self):
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        self.aborted = False

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


def connect(tmp_path):
    world = make_world(tmp_path)
    protocol = world.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = Transport()
    protocol.makeConnection(transport)
    return world, protocol, transport


def test_admin_channel_stops_reading_while_its_replies_are_unread(tmp_path):
    world, protocol, transport = connect(tmp_path)
    channel = transport.producer  # the HTTPChannel inside twisted.web's protocol switcher
    assert channel is not None and transport.streaming
    protocol.dataReceived(REQUEST)
    answered = transport.value().count(b"HTTP/1.1 ")
    assert answered == 1
    channel.pauseProducing()  # what a TCP transport does when its buffer is full
    assert transport.producerState == "paused"
    protocol.dataReceived(REQUEST * 200)  # what was already read still comes in
    assert transport.producerState == "paused"
    channel.resumeProducing()
    assert transport.producerState == "producing"


def test_a_stuck_admin_connection_is_closed_then_aborted(tmp_path):
    world, protocol, transport = connect(tmp_path)
    channel = transport.producer
    protocol.dataReceived(REQUEST)
    channel.pauseProducing()
    world.clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    world.clock.advance(1)
    assert transport.disconnecting and not transport.aborted
    world.clock.advance(channel.abortTimeout)
    assert transport.aborted
