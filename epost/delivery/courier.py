"""One delivery attempt of one (message, destination) pair (SPEC §6).

The courier picks hosts (the route's relay hosts, or MX by DNS), connects to
each address in turn and runs one `SMTPClient` transaction per connection.
It moves on to the next address or host on connection failure and whenever
the transaction says `try_next_host`; it retries an address once in
plaintext when the TLS handshake killed the connection. Retrying later is
the queue's business, not ours.

Promises kept here:
- `deliver` fires exactly once with an `Attempt` holding an `Outcome` for
  every recipient and never errbacks;
- a final answer (2xx, 5xx, or 4xx at RCPT/DATA) is kept and that recipient
  is not offered to later hosts;
- recipients left without a final answer get the last non-final outcome
  seen (code None when nothing answered).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger

from epost.config import HostPort
from epost.delivery.smtp_client import Outcome, SMTPClient, TransactionResult
from epost.routing.dns import DNSError
from epost.routing.resolver import Route

log = Logger()


class CourierError(Exception):
    """The courier could not make the attempt at all (its process died, the
    content could not be read): our own trouble, which says nothing about
    the destination. The manager tries the job again later."""


class Resolver(Protocol):
    """What the courier needs of `epost.routing.dns.MXResolver`."""

    def resolve_mx(self, domain: str) -> defer.Deferred[list[str]]: ...

    def resolve_addresses(self, host: str) -> defer.Deferred[list[str]]: ...


@dataclass(frozen=True)
class Attempt:
    """The result of one attempt: an outcome per recipient, the last host
    tried as `name[ip]:port` (None if no connection was tried), whether
    the last session used TLS, and the route's hosts as `name:port` (the MX
    hosts: what groups destinations, issue 14)."""

    outcomes: dict[str, Outcome]
    host: str | None
    tls: bool
    mx: tuple[str, ...] = ()


def is_final(outcome: Outcome) -> bool:
    """True when no other host may be asked: 2xx, 5xx, or 4xx at RCPT/DATA."""
    if outcome.code is None:
        return False
    if outcome.code // 100 == 4:
        return outcome.stage in ("rcpt", "data")
    return True


class Courier:
    """Runs delivery attempts over TCP; one instance serves all destinations.

    `smtp_port` is the port of MX hosts (25; tests use another one).
    Connections are reused: after a transaction a connection waits idle
    for a moment (SMTPClient.KEEP_IDLE) and the next job for the same
    address and port takes it, as Postfix's connection cache does, so a
    stream of mail to one host does not pay a handshake per message."""

    max_idle_per_address = 10
    client_class = SMTPClient  # address verification (epost/delivery/probe.py) plugs in its own

    def __init__(
        self,
        reactor: IReactorTCP,  # also IReactorTime: SMTPClient's timeouts
        resolver: Resolver,
        hostname: str,
        tls_context: object | None = None,
        connect_timeout: float = 30,
        timeouts: dict[str, float] | None = None,
        smtp_port: int = 25,
    ) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.hostname = hostname
        self.tls_context = tls_context
        self.connect_timeout = connect_timeout
        self.timeouts = timeouts
        self.smtp_port = smtp_port
        self.reuse_connections = True
        self._idle: dict[tuple[str, int, bool], list[SMTPClient]] = {}
        self._uses: weakref.WeakKeyDictionary[SMTPClient, int] = weakref.WeakKeyDictionary()

    def deliver(
        self,
        route: Route | dict,
        sender: str,
        recipients: Iterable[str],
        content: Callable[[], Iterable[bytes]],
        size: int,
        body_8bit: bool,
        per_connection: int | None = None,
    ) -> defer.Deferred[Attempt]:
        """One attempt for `recipients` along `route`; never errbacks. `per_connection`:
        a connection is not reused after that many transactions."""
        recipients = list(recipients)
        d = defer.ensureDeferred(self._deliver(route, sender, recipients, content, size, body_8bit, per_connection))

        def internal_error(failure) -> Attempt:
            log.failure("courier: unexpected error", failure)
            text = f"internal error: {failure.getErrorMessage()}"
            return Attempt({r: Outcome(None, text, "connect") for r in recipients}, None, False)

        return d.addErrback(internal_error)

    async def _deliver(
        self,
        route: Route | dict,
        sender: str,
        recipients: list[str],
        content: Callable[[], Iterable[bytes]],
        size: int,
        body_8bit: bool,
        per_connection: int | None = None,
    ) -> Attempt:
        if isinstance(route, dict):
            route = Route.from_dict(route)
        hosts, mx_domain = list(route.hosts), route.mx_domain
        if not hosts and mx_domain:
            try:
                names = await self.resolver.resolve_mx(mx_domain)
            except DNSError as error:
                code = 550 if error.permanent else None
                outcome = Outcome(code, f"{error.enhanced} {error}", "dns")
                return Attempt({r: outcome for r in recipients}, None, False)
            hosts = [HostPort(name, self.smtp_port) for name in names]
        mx = tuple(f"{hostport.host}:{hostport.port}" for hostport in hosts)

        final: dict[str, Outcome] = {}
        last = Outcome(None, "no host to deliver to", "connect")
        last_host: str | None = None
        tls = False
        for hostport in hosts:
            try:
                addresses = await self.resolver.resolve_addresses(hostport.host)
            except DNSError as error:
                last = Outcome(None, f"{error.enhanced} {error}", "dns")
                continue
            for ip in addresses:
                pending = [r for r in recipients if r not in final]
                last_host = f"{hostport.host}[{ip}]:{hostport.port}"
                result = await self._session(ip, hostport.port, sender, pending, content, size, body_8bit, True, per_connection)
                if result is not None and result.tls_failed:
                    result = await self._session(
                        ip, hostport.port, sender, pending, content, size, body_8bit, False, per_connection
                    )
                if result is None:
                    last = Outcome(None, f"cannot connect to {last_host}", "connect")
                    continue
                tls = result.tls
                for recipient, outcome in result.recipients.items():
                    if is_final(outcome):
                        final[recipient] = outcome
                    else:
                        last = outcome
                if not result.try_next_host or len(final) == len(recipients):
                    return self._attempt(recipients, final, last, last_host, tls, mx)
        return self._attempt(recipients, final, last, last_host, tls, mx)

    @staticmethod
    def _attempt(
        recipients: list[str], final: dict[str, Outcome], last: Outcome, host: str | None, tls: bool,
        mx: tuple[str, ...] = (),
    ) -> Attempt:
        return Attempt({r: final.get(r, last) for r in recipients}, host, tls, mx)

    async def _session(
        self,
        ip: str,
        port: int,
        sender: str,
        recipients: list[str],
        content: Callable[[], Iterable[bytes]],
        size: int,
        body_8bit: bool,
        use_tls: bool,
        per_connection: int | None = None,
    ) -> TransactionResult | None:
        """One transaction, on an idle connection when there is one; None when the connection failed."""
        key = (ip, port, use_tls)
        client = self._checkout(key)
        if client is not None:
            result = await client.reuse(sender, recipients, content, size, body_8bit)
            if any(outcome.code is not None for outcome in result.recipients.values()):
                self._checkin(key, client, result, per_connection)
                return result
            # The idle connection was gone (closed by the server): a fresh one.
        endpoint_class = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        endpoint = endpoint_class(self.reactor, ip, port, timeout=self.connect_timeout)
        client = self.client_class(
            self.hostname,
            sender,
            recipients,
            content,
            size,
            body_8bit,
            self.reactor,
            self.tls_context if use_tls else None,
            self.timeouts,
            keep_open=self.reuse_connections,
        )
        try:
            await endpoint.connect(_QuietFactory(client))
        except Exception as error:  # refused, timed out, unreachable: all mean "next address"
            log.debug("courier: connect to {ip}:{port} failed: {error}", ip=ip, port=port, error=error)
            return None
        result = await client.done
        self._checkin(key, client, result, per_connection)
        return result

    def _checkout(self, key: tuple[str, int, bool]) -> SMTPClient | None:
        idle = self._idle.get(key)
        client = None
        while idle and client is None:
            candidate = idle.pop()
            client = candidate if candidate.reusable else None
        if not idle:
            self._idle.pop(key, None)
        if client is not None:
            client.idle_ended = None
        return client

    def _checkin(
        self, key: tuple[str, int, bool], client: SMTPClient, result: TransactionResult, per_connection: int | None = None
    ) -> None:
        if not client.reusable:
            return
        uses = self._uses[client] = self._uses.get(client, 0) + 1
        idle = [c for c in self._idle.get(key, []) if c.reusable]
        if result.try_next_host or len(idle) >= self.max_idle_per_address or (per_connection and uses >= per_connection):
            client.close_idle()
        else:
            idle.append(client)
            client.idle_ended = lambda gone: self._forget_idle(key, gone)
        if idle:
            self._idle[key] = idle
        else:
            self._idle.pop(key, None)

    def _forget_idle(self, key: tuple[str, int, bool], client: SMTPClient) -> None:
        idle = self._idle.get(key)
        if idle is not None and client in idle:
            idle.remove(client)
            if not idle:
                del self._idle[key]

    def close_idle(self) -> None:
        """QUIT every idle connection (at shutdown)."""
        for idle in list(self._idle.values()):
            for client in list(idle):
                client.close_idle()
        self._idle.clear()


class _QuietFactory(Factory):
    """Hands out one prepared protocol, without a start/stop log line per connection."""

    noisy = False

    def __init__(self, protocol: SMTPClient) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr) -> SMTPClient:
        self._protocol.factory = self
        return self._protocol
