"""PROXY protocol (v1 and v2) in front of an SMTP listener: `haproxy:<endpoint>`.

Twisted's own haproxy: wrapper builds the session at connect time (so
connection limits would count the balancer), trusts any sender of a header
and drops a connection whose first chunk is shorter than a header prefix.
Here the session is built only once the header is parsed, from the real
client's address: limits, screening, relay policy, Received: and logs all see
the client, and nothing (not even the greeting) is sent before the header.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime, ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import alsoProvides

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
    except ValueError:
        return False
    return True


def header_kind(buffered: bytes) -> str | None:
    """"v1", "v2", "" (cannot be a header) or None (too short to tell yet)."""
    for kind, prefix in (("v2", V2Parser.PREFIX), ("v1", V1Parser.PROXYSTR + b" ")):
        size = min(len(buffered), len(prefix))
        if buffered[:size] == prefix[:size]:
            return kind if len(buffered) >= len(prefix) else None
    return ""


class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads the header, then builds the wrapped session with the real peer."""

    def __init__(self, factory: "ProxyFactory", wrappedProtocol=None):
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._parser = None
        self._peer = None
        self._timer = None

    def makeConnection(self, transport) -> None:
        # As Protocol.makeConnection, without ProtocolWrapper's handing on:
        # the wrapped session does not exist until the header is read.
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)
        peer = transport.getPeer()
        host = getattr(peer, "host", "")
        if not is_trusted(host, self.factory.networks):
            self._refuse(PROXY_UNTRUSTED, "not in proxy_networks")
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def _refuse(self, reason: str, why: str) -> None:
        peer = self.transport.getPeer()
        self.factory.events.refused(
            self.factory.listener, getattr(peer, "host", ""), getattr(peer, "port", 0), reason, f"closed without greeting: {why}"
        )
        self.transport.abortConnection() if reason != PROXY_TIMEOUT else self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(PROXY_TIMEOUT, f"no PROXY header in {self.factory.timeout:g}s")

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
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
        except InvalidProxyHeader:
            return self._bad("invalid PROXY header")
        if info is None:
            return  # V1Parser raises past 107 bytes without a line end
        self._timer.cancel()
        self._timer = None
        # A v2 LOCAL header (health checks) or an address family we do not
        # carry has no source: the balancer itself is the client.
        self._peer = info.source if isinstance(info.source, (IPv4Address, IPv6Address)) else None
        if self._peer is not None and not _is_address(self._peer.host):
            return self._bad("invalid PROXY header")  # Twisted's v1 parser takes any word
        if self.factory.on_header is not None:
            self.factory.on_header(self)
        session = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if session is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = session
        # The session offers STARTTLS and reports TLS by what its transport
        # provides: this wrapper provides what the connection under it does.
        for interface in (ITLSTransport, ISSLTransport):
            if interface.providedBy(self.transport):
                alsoProvides(self, interface)
        session.makeConnection(self)
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def _bad(self, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._refuse(PROXY_BAD_HEADER, why)

    def startTLS(self, *args, **kwargs):
        """STARTTLS under the header: the session must see an encrypted transport."""
        result = self.transport.startTLS(*args, **kwargs)
        alsoProvides(self, ISSLTransport)
        return result

    def getPeer(self):
        return self._peer if self._peer is not None else self.transport.getPeer()

    def connectionLost(self, reason) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.factory.unregisterProtocol(self)
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None


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
        self.on_header = None  # tests: called with the protocol once the header is parsed

    def buildProtocol(self, addr):
        return self.protocol(self)

    def logPrefix(self) -> str:
        return "SMTP (PROXY)"
