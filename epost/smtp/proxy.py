"""PROXY protocol (v1 and v2) in front of an SMTP listener: `haproxy:<endpoint>`.

Twisted's own haproxy: wrapper builds the session at connect time (so
connection limits would count the balancer), trusts any sender of a header
and drops a connection whose first chunk is shorter than a header prefix.
Here the session is built only once the header is parsed, from the real
client's address: limits, screening, relay policy, Received: and logs all see
the client, and nothing (not even the greeting) is sent before the header.
Then this protocol steps out: the session talks to the connection directly,
so a PROXY listener costs a session what a plain one does after the header.
The header is parsed here, not by Twisted's private parsers: in one pass over
the bytes buffered so far, with addresses checked and spelt as a direct
connection's are (so limits count one client once), in a few microseconds.
"""

from __future__ import annotations

import socket
import struct
from typing import Iterable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import WrappingFactory

from epost.smtp.events import SessionEvents
from epost.smtp.policy import in_networks

HEADER_TIMEOUT = 10.0  # seconds; HAProxy sends the header with its first packet

# Reasons in `smtp refused: ... reason=` lines (docs/operating.md).
PROXY_UNTRUSTED = "proxy_untrusted"  # the connection is not from proxy_networks
PROXY_BAD_HEADER = "proxy_bad_header"  # no header, or not a valid one
PROXY_TIMEOUT = "proxy_timeout"  # no complete header in HEADER_TIMEOUT


def is_trusted(host: str, networks: Iterable) -> bool:
    """May a connection from `host` carry a PROXY header (is it a balancer)?"""
    return in_networks(host.split("%", 1)[0], networks)


# The PROXY protocol (haproxy.org, doc/proxy-protocol.txt): v1 is one text
# line, v2 a 16-byte binary prefix and an address block.
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = struct.Struct("!12sBBH")  # signature, version|command, family|protocol, length
_V2_TCP4 = struct.Struct("!4s4sHH")
_V2_TCP6 = struct.Struct("!16s16sHH")


class BadHeader(ValueError):
    """Not a PROXY header, or a garbled one."""


def header_kind(buffered: bytes) -> str | None:
    """"v1", "v2", "" (cannot be a header) or None (too short to tell yet)."""
    for kind, prefix in (("v2", V2_SIGNATURE), ("v1", V1_PREFIX)):
        size = min(len(buffered), len(prefix))
        if buffered[:size] == prefix[:size]:
            return kind if len(buffered) >= len(prefix) else None
    return ""


def parse_header(buffered: bytes):
    """`(source, destination, rest)` once `buffered` starts with a whole header
    (`rest`: the bytes after it), None while it may still become one.

    Addresses are IPv4Address/IPv6Address in canonical spelling, or both None
    when the balancer speaks for itself (v2 LOCAL: health checks; v1 UNKNOWN;
    v2 families other than TCP over IPv4 or IPv6): that session is served as
    the balancer but not trusted for relaying. Raises BadHeader."""
    kind = header_kind(buffered)
    if kind is None:
        return None
    if kind == "v2":
        return _parse_v2(buffered)
    if kind == "v1":
        return _parse_v1(buffered)
    raise BadHeader("no PROXY header")


def _parse_v1(buffered: bytes):
    end = buffered.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffered) >= V1_MAX:
            raise BadHeader("invalid PROXY header: v1 line too long")
        return None
    fields = buffered[:end].split(b" ")
    rest = buffered[end + 2 :]
    if fields[1:2] == [b"UNKNOWN"]:
        return None, None, rest
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise BadHeader("invalid PROXY header: bad v1 line")
    family, kind = (socket.AF_INET, IPv4Address) if fields[1] == b"TCP4" else (socket.AF_INET6, IPv6Address)
    source, destination = (kind("TCP", _v1_host(family, fields[i]), _v1_port(fields[i + 2])) for i in (2, 3))
    return source, destination, rest


def _v1_host(family: int, field: bytes) -> str:
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, field.decode("ascii")))
    except (OSError, ValueError):  # not an address of that family; non-ASCII; NUL
        raise BadHeader("invalid PROXY header: bad v1 address") from None


def _v1_port(field: bytes) -> int:
    if not (field.isdigit() and len(field) <= 5 and int(field) <= 65535):
        raise BadHeader("invalid PROXY header: bad v1 port")
    return int(field)


def _parse_v2(buffered: bytes):
    if len(buffered) < _V2_FIXED.size:
        return None
    _, version_command, family_protocol, length = _V2_FIXED.unpack_from(buffered)
    if version_command >> 4 != 2 or version_command & 0xF > 1 or family_protocol >> 4 > 3 or family_protocol & 0xF > 2:
        raise BadHeader("invalid PROXY header: bad v2 version, command or family")
    end = _V2_FIXED.size + length
    if len(buffered) < end:
        return None
    rest = buffered[end:]
    if version_command & 0xF == 0:  # LOCAL
        return None, None, rest
    if family_protocol == 0x11:  # TCP over IPv4
        layout, family, kind = _V2_TCP4, socket.AF_INET, IPv4Address
    elif family_protocol == 0x21:  # TCP over IPv6
        layout, family, kind = _V2_TCP6, socket.AF_INET6, IPv6Address
    else:  # UNSPEC, UDP, UNIX: no client address we carry
        return None, None, rest
    if length < layout.size:
        raise BadHeader("invalid PROXY header: v2 address block too short")
    source, destination, source_port, destination_port = layout.unpack_from(buffered, _V2_FIXED.size)
    return (
        kind("TCP", socket.inet_ntop(family, source), source_port),
        kind("TCP", socket.inet_ntop(family, destination), destination_port),
        rest,
    )


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
        self._buffer = self._buffer + data if self._buffer else data
        try:
            header = parse_header(self._buffer)
        except BadHeader as error:
            return self._bad(str(error))
        if header is None:
            return  # a short chunk: wait for more (the timer bounds the wait)
        self._buffer = b""
        self._stop_waiting()
        self._hand_over(*header)

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
        if source is None:
            # The balancer speaks for itself (a health check) or names no
            # client: served under its own address, which may well be in
            # relay_networks, so that address vouches for nothing.
            session.client_known = False
        self.session = session
        # A reactor connection delivers to its `protocol` (config refuses
        # `haproxy:ssl:`, so no TLS layer sits between us and the socket).
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
