"""PROXY protocol (v1 and v2) in front of an SMTP listener: `haproxy:<endpoint>`.

Twisted's own haproxy: wrapper builds the session at connect time (so
connection limits would count the balancer), trusts any sender of a header
and drops a connection whose first chunk is shorter than a header prefix.
Here the session is built only once the header is parsed, from the real
client's address: limits, screening, relay policy, Received: and logs all see
the client, and nothing (not even the greeting) is sent before the header.
Then this protocol steps out: the session talks to the connection directly,
so a PROXY listener costs a session what a plain one does after the header.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from epost.smtp.events import SessionEvents

HEADER_TIMEOUT = 10.0  # seconds; HAProxy sends the header with its first packet

# Reasons in `smtp refused: ... reason=` lines (docs/operating.md).
PROXY_UNTRUSTED = "proxy_untrusted"  # the connection is not from proxy_networks
PROXY_BAD_HEADER = "proxy_bad_header"  # no header, or not a valid one
PROXY_TIMEOUT = "proxy_timeout"  # no complete header in HEADER_TIMEOUT


def is_trusted(host: str, networks: Iterable) -> bool:
    """May a connection from `host` carry a PROXY header (is it a balancer)?"""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == network.version and address in network for network in networks)


def _is_address(host) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:  # None and words too
        return False
    return True


def header_kind(buffered: bytes) -> str | None:
    """"v1", "v2", "" (cannot be a header) or None (too short to tell yet)."""
    for kind, prefix in (("v2", V2Parser.PREFIX), ("v1", V1Parser.PROXYSTR + b" ")):
        size = min(len(buffered), len(prefix))
        if buffered[:size] == prefix[:size]:
            return kind if len(buffered) >= len(prefix) else None
    return ""


class ProxyHeaderProtocol(Protocol):
    """Reads the header, builds the session with the real peer, then leaves the path.

    Once the header is parsed the session becomes the connection's protocol
    and the connection the session's transport: reads, writes, producer
    calls, TLS and aborts go between the two with nothing in between (the
    policies/TLS idiom, `transport.protocol = session`). What stays of the
    header is two answers of the connection: getPeer() is the client it
    names and getHost() the address that client connected to."""

    def __init__(self, factory: "ProxyFactory"):
        self.factory = factory
        self.session = None  # once handed over
        self._buffer = b""
        self._parser = None
        self._timer = None

    def logPrefix(self) -> str:
        return "SMTP (PROXY)"

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        if not is_trusted(getattr(peer, "host", ""), self.factory.networks):
            self._refuse(PROXY_UNTRUSTED, "not in proxy_networks")
            return
        self.factory.registerProtocol(self)  # waiting for its header
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def _refuse(self, reason: str, why: str) -> None:
        peer = self.transport.getPeer()
        self.factory.events.refused(
            self.factory.listener, getattr(peer, "host", ""), getattr(peer, "port", 0), reason, f"closed without greeting: {why}"
        )
        self.transport.abortConnection() if reason != PROXY_TIMEOUT else self.transport.loseConnection()

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self.factory.unregisterProtocol(self)

    def _timed_out(self) -> None:
        self._timer = None
        self.factory.unregisterProtocol(self)
        self._refuse(PROXY_TIMEOUT, f"no PROXY header in {self.factory.timeout:g}s")

    def dataReceived(self, data: bytes) -> None:
        if self.session is not None:  # a transport that kept calling us after the hand-over
            self.session.dataReceived(data)
            return
        if self._timer is None:  # refused already
            return
        if self._parser is None:
            self._buffer += data
            kind = header_kind(self._buffer)
            if kind is None:
                return  # a short first chunk: wait for more
            if kind == "":
                return self._bad("no PROXY header")
            if kind == "v2" and len(self._buffer) < 16:
                return  # V2Parser refuses less than the fixed 16 bytes
            self._parser = V2Parser() if kind == "v2" else V1Parser()
            data, self._buffer = self._buffer, b""
        try:
            info, rest = self._parser.feed(data)
        except (InvalidProxyHeader, ValueError):  # Twisted's v1 parser lets int() of a bad port raise
            return self._bad("invalid PROXY header")
        if info is None:
            return  # V1Parser raises past 107 bytes without a line end
        # A v2 LOCAL header (health checks) or an address family we do not
        # carry has no source: the balancer itself is the client.
        source, destination = info.source, info.destination
        if not isinstance(source, (IPv4Address, IPv6Address)):
            source = destination = None
        elif not (_is_address(source.host) and _is_address(getattr(destination, "host", None))):
            return self._bad("invalid PROXY header")  # Twisted's v1 parser takes any word
        self._stop_waiting()
        self._hand_over(source, destination, rest)

    def _hand_over(self, source, destination, rest: bytes) -> None:
        transport = self.transport
        if source is not None:
            # Instance attributes shadow the connection's methods, as
            # Twisted's startTLS does for getHandle: whoever asks the
            # connection (the session, a TLS layer over it) hears the client.
            transport.getPeer = lambda: source
            transport.getHost = lambda: destination
        session = self.factory.wrappedFactory.buildProtocol(transport.getPeer())
        if session is None:
            transport.loseConnection()
            return
        self.session = session
        if isinstance(transport, ProtocolWrapper):  # haproxy:ssl: we sit under Twisted's TLS layer
            transport.wrappedProtocol = session
        else:  # a reactor connection delivers to its `protocol`
            transport.protocol = session
        session.makeConnection(transport)
        if rest:
            session.dataReceived(rest)

    def _bad(self, why: str) -> None:
        self._stop_waiting()
        self._refuse(PROXY_BAD_HEADER, why)

    def connectionLost(self, reason=connectionDone) -> None:
        self._stop_waiting()
        if self.session is not None:  # only when the transport did not take the hand-over
            self.session.connectionLost(reason)
            self.session = None


class ProxyFactory(WrappingFactory):
    """Wraps a listener's factory: only `networks` may connect, each with a header."""

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrappedFactory, networks, clock: IReactorTime, events: SessionEvents, listener: str, timeout: float = HEADER_TIMEOUT):
        super().__init__(wrappedFactory)
        self.networks = tuple(networks)
        self.clock = clock
        self.events = events
        self.listener = listener
        self.timeout = timeout

    def buildProtocol(self, addr):
        return self.protocol(self)

    def logPrefix(self) -> str:
        return "SMTP (PROXY)"
