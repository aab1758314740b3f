"""The courier on the real reactor against in-process fake SMTP servers on loopback."""

from __future__ import annotations

import ipaddress
import socket

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.tcp import Connection
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import TestCase

from epost.config import HostPort
from epost.delivery.courier import Attempt, Courier, is_final
from epost.delivery.smtp_client import Outcome
from epost.routing.dns import DNSError
from epost.routing.resolver import Route

CONTENT = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"


class FakeSMTP(LineReceiver):
    """A minimal server whose behaviour is chosen by its factory."""

    delimiter = b"\r\n"

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.factory.open.add(self)
        self.in_data = False
        self.accepted = 0
        self.lines: list[bytes] = []
        behaviour = self.factory.behaviour
        if behaviour == "silent":
            return
        if behaviour == "421":
            self.sendLine(b"421 4.3.2 busy, try later")
            self.transport.loseConnection()
            return
        self.sendLine(b"220 fake ESMTP")

    def connectionLost(self, reason=None) -> None:
        self.factory.open.discard(self)

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.factory.messages.append(b"".join(l + b"\r\n" for l in self.lines))
                self.sendLine(b"250 2.0.0 queued")
            else:
                self.lines.append(line[1:] if line.startswith(b".") else line)
            return
        verb = line.split(b" ", 1)[0].upper()
        behaviour = self.factory.behaviour
        if verb == b"EHLO":
            self.sendLine(b"250-fake\r\n250-STARTTLS\r\n250-PIPELINING\r\n250 8BITMIME")
        elif verb == b"STARTTLS" and behaviour == "badtls":  # the handshake dies
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.loseConnection()
        elif verb == b"STARTTLS":
            self.sendLine(b"454 4.7.0 TLS not available")
        elif verb == b"MAIL":
            self.accepted = 0
            self.sendLine(b"250 2.1.0 ok")
        elif verb == b"RCPT" and behaviour == "greylist":
            self.sendLine(b"451 4.7.1 greylisted")
        elif verb == b"RCPT" and behaviour == "reject":
            self.sendLine(b"550 5.1.1 no such user")
        elif verb == b"RCPT":
            self.accepted += 1
            self.sendLine(b"250 2.1.5 ok")
        elif verb == b"DATA" and not self.accepted:
            self.sendLine(b"554 5.5.1 no valid recipients")
        elif verb == b"DATA":
            self.in_data, self.lines = True, []
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        elif verb == b"RSET":
            self.factory.rsets += 1
            self.sendLine(b"250 2.0.0 ok")
        else:
            self.sendLine(b"503 5.5.1 bad sequence")


class FakeServer(Factory):
    protocol = FakeSMTP

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.rsets = 0
        self.open: set[FakeSMTP] = set()
        self.messages: list[bytes] = []


class FakeResolver:
    """MX and address answers from dicts; literal IPs resolve to themselves."""

    def __init__(self, mx: dict[str, list[str] | DNSError] | None = None, addresses: dict | None = None) -> None:
        self.mx = mx or {}
        self.addresses = addresses or {}
        self.asked: list[str] = []

    def resolve_mx(self, domain: str) -> defer.Deferred[list[str]]:
        self.asked.append(domain)
        answer = self.mx[domain]
        return defer.fail(answer) if isinstance(answer, DNSError) else defer.succeed(answer)

    def resolve_addresses(self, host: str) -> defer.Deferred[list[str]]:
        self.asked.append(host)
        try:
            return defer.succeed([str(ipaddress.ip_address(host))])
        except ValueError:
            return defer.succeed(self.addresses[host])


def closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@defer.inlineCallbacks
def settle(deadline: float = 3.0):
    """Wait until the connections of a test are closed: the courier reports
    before its QUIT is answered, trial wants a clean reactor."""
    for _ in range(int(deadline / 0.01)):
        if not any(isinstance(s, Connection) for s in reactor.getReaders() + reactor.getWriters()):
            return
        yield deferLater(reactor, 0.01)


class CourierTests(TestCase):
    timeout = 10

    def setUp(self) -> None:
        self.addCleanup(settle)

    def listen(self, behaviour: str) -> tuple[FakeServer, HostPort]:
        server = FakeServer(behaviour)
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return server, HostPort("127.0.0.1", port.getHost().port)

    def courier(self, resolver: FakeResolver | None = None, **kwargs) -> Courier:
        courier = Courier(reactor, resolver or FakeResolver(), "epost.test", connect_timeout=2, **kwargs)
        self.addCleanup(courier.close_idle)  # before settle(): the idle connections QUIT
        return courier

    def deliver(self, courier: Courier, route, recipients=("a@x.test",), per_connection=None) -> defer.Deferred[Attempt]:
        return courier.deliver(
            route, "s@here.test", list(recipients), lambda: iter([CONTENT]), len(CONTENT), False, per_connection=per_connection
        )

    @staticmethod
    def gateway_route(host: HostPort) -> dict:
        """A route as the queue stores it: a gateway.dat rule naming `host`."""
        return {"kind": "relay", "rule": "gateway.dat:1", "hosts": [[host.host, host.port]]}

    @staticmethod
    def relay(*hosts: HostPort) -> Route:
        return Route(kind="relay", rule="test", hosts=hosts)

    @defer.inlineCallbacks
    def test_relay_host_delivers_content_intact(self):
        server, hp = self.listen("accept")
        attempt = yield self.deliver(self.courier(), self.relay(hp).to_dict(), ["a@x.test", "b@x.test"])
        self.assertEqual({r: o.code for r, o in attempt.outcomes.items()}, {"a@x.test": 250, "b@x.test": 250})
        self.assertEqual(server.messages, [CONTENT])
        self.assertEqual(attempt.host, f"127.0.0.1[127.0.0.1]:{hp.port}")
        self.assertFalse(attempt.tls)

    @defer.inlineCallbacks
    def test_tls_failure_retries_same_host_in_plaintext(self):
        server, hp = self.listen("badtls")
        courier = self.courier(tls_context=optionsForClientTLS("mx.x.test"))
        attempt = yield self.deliver(courier, self.relay(hp))
        self.assertEqual(attempt.outcomes["a@x.test"].code, 250)
        self.assertEqual((server.connections, server.messages), (2, [CONTENT]))
        self.assertFalse(attempt.tls)

    @defer.inlineCallbacks
    def test_refused_first_host_falls_back_to_second(self):
        server, hp = self.listen("accept")
        dead = HostPort("127.0.0.1", closed_port())
        attempt = yield self.deliver(self.courier(), self.relay(dead, hp))
        self.assertEqual(attempt.outcomes["a@x.test"].code, 250)
        self.assertEqual(attempt.host, f"127.0.0.1[127.0.0.1]:{hp.port}")
        self.assertEqual(len(server.messages), 1)

    @defer.inlineCallbacks
    def test_421_greeting_sends_to_next_host(self):
        busy, busy_hp = self.listen("421")
        server, hp = self.listen("accept")
        attempt = yield self.deliver(self.courier(), self.relay(busy_hp, hp))
        self.assertEqual(attempt.outcomes["a@x.test"].code, 250)
        self.assertEqual((busy.connections, len(server.messages)), (1, 1))

    @defer.inlineCallbacks
    def test_421_greeting_on_every_host_leaves_that_outcome(self):
        _, busy_hp = self.listen("421")
        attempt = yield self.deliver(self.courier(), self.relay(busy_hp))
        self.assertEqual(attempt.outcomes["a@x.test"], Outcome(421, "4.3.2 busy, try later", "greeting"))

    @defer.inlineCallbacks
    def test_550_at_rcpt_is_final_without_fallback(self):
        reject, reject_hp = self.listen("reject")
        server, hp = self.listen("accept")
        attempt = yield self.deliver(self.courier(), self.relay(reject_hp, hp))
        self.assertEqual(attempt.outcomes["a@x.test"], Outcome(550, "5.1.1 no such user", "rcpt"))
        self.assertEqual(server.connections, 0)
        self.assertEqual(reject.messages, [])

    @defer.inlineCallbacks
    def test_451_at_rcpt_is_kept_without_fallback(self):
        _, grey_hp = self.listen("greylist")
        server, hp = self.listen("accept")
        attempt = yield self.deliver(self.courier(), self.relay(grey_hp, hp))
        self.assertEqual(attempt.outcomes["a@x.test"], Outcome(451, "4.7.1 greylisted", "rcpt"))
        self.assertEqual(server.connections, 0)

    @defer.inlineCallbacks
    def test_silent_server_times_out_to_next_host(self):
        _, silent_hp = self.listen("silent")
        server, hp = self.listen("accept")
        attempt = yield self.deliver(self.courier(timeouts={"greeting": 0.5}), self.relay(silent_hp, hp))
        self.assertEqual(attempt.outcomes["a@x.test"].code, 250)
        self.assertEqual(len(server.messages), 1)

    @defer.inlineCallbacks
    def test_silent_only_server_gives_no_answer(self):
        _, silent_hp = self.listen("silent")
        attempt = yield self.deliver(self.courier(timeouts={"greeting": 0.5}), self.relay(silent_hp))
        outcome = attempt.outcomes["a@x.test"]
        self.assertEqual((outcome.code, outcome.stage), (None, "greeting"))
        self.assertEqual(attempt.host, f"127.0.0.1[127.0.0.1]:{silent_hp.port}")

    @defer.inlineCallbacks
    def test_all_hosts_refused_gives_no_answer(self):
        attempt = yield self.deliver(self.courier(), self.relay(HostPort("127.0.0.1", closed_port())))
        outcome = attempt.outcomes["a@x.test"]
        self.assertEqual((outcome.code, outcome.stage), (None, "connect"))

    @defer.inlineCallbacks
    def test_mx_route_tries_hosts_in_mx_order(self):
        server, hp = self.listen("accept")
        resolver = FakeResolver(
            mx={"x.test": ["mx1.x.test", "mx2.x.test"]},
            addresses={"mx1.x.test": ["127.0.0.5"], "mx2.x.test": ["127.0.0.1"]},  # 127.0.0.5: refused
        )
        route = Route(kind="relay", rule="mx", mx_domain="x.test")
        attempt = yield self.deliver(self.courier(resolver, smtp_port=hp.port), route)
        self.assertEqual(attempt.outcomes["a@x.test"].code, 250)
        self.assertEqual(attempt.host, f"mx2.x.test[127.0.0.1]:{hp.port}")
        self.assertEqual(resolver.asked, ["x.test", "mx1.x.test", "mx2.x.test"])
        self.assertEqual(len(server.messages), 1)

    @defer.inlineCallbacks
    def test_permanent_dns_error_gives_550_without_connecting(self):
        error = DNSError("x.test: domain not found", permanent=True, enhanced="5.1.2")
        resolver = FakeResolver(mx={"x.test": error})
        attempt = yield self.deliver(self.courier(resolver), {"kind": "relay", "rule": "mx", "mx_domain": "x.test"})
        self.assertEqual(attempt, Attempt({"a@x.test": Outcome(550, "5.1.2 x.test: domain not found", "dns")}, None, False))

    @defer.inlineCallbacks
    def test_temporary_dns_error_gives_no_answer(self):
        error = DNSError("x.test: timed out", permanent=False, enhanced="4.4.3")
        resolver = FakeResolver(mx={"x.test": error})
        attempt = yield self.deliver(self.courier(resolver), Route(kind="relay", rule="mx", mx_domain="x.test"))
        self.assertEqual(attempt.outcomes["a@x.test"], Outcome(None, "4.4.3 x.test: timed out", "dns"))

    @defer.inlineCallbacks
    def test_the_next_message_to_the_same_host_reuses_the_connection(self):
        server, host = self.listen("accept")
        courier = self.courier()
        route = self.gateway_route(host)
        for _ in range(3):
            attempt = yield self.deliver(courier, route)
            assert attempt.outcomes["a@x.test"].code == 250
        assert server.connections == 1 and len(server.messages) == 3

    @defer.inlineCallbacks
    def test_messages_per_connection_closes_a_connection_after_that_many_transactions(self):
        server, host = self.listen("accept")
        courier = self.courier()
        route = self.gateway_route(host)
        for _ in range(5):
            attempt = yield self.deliver(courier, route, per_connection=2)
            assert attempt.outcomes["a@x.test"].code == 250
            assert attempt.mx == (f"{host.host}:{host.port}",)
        assert server.connections == 3 and len(server.messages) == 5

    @defer.inlineCallbacks
    def test_after_a_refused_transaction_the_reused_connection_is_reset_first(self):
        server, host = self.listen("reject")
        courier = self.courier()
        route = self.gateway_route(host)
        first = yield self.deliver(courier, route)
        second = yield self.deliver(courier, route)
        assert first.outcomes["a@x.test"].code == second.outcomes["a@x.test"].code == 550
        assert server.connections == 1 and server.rsets == 1

    @defer.inlineCallbacks
    def test_an_idle_connection_closed_by_the_server_is_replaced(self):
        server, host = self.listen("accept")
        courier = self.courier()
        route = self.gateway_route(host)
        yield self.deliver(courier, route)
        for protocol in list(server.open):
            protocol.transport.loseConnection()  # the server drops the idle connection
        yield deferLater(reactor, 0.05)
        attempt = yield self.deliver(courier, route)
        assert attempt.outcomes["a@x.test"].code == 250
        assert server.connections == 2 and len(server.messages) == 2


def test_final_outcomes():
    assert is_final(Outcome(250, "ok", "data"))
    assert is_final(Outcome(550, "no", "greeting"))
    assert is_final(Outcome(451, "later", "rcpt"))
    assert not is_final(Outcome(421, "busy", "greeting"))
    assert not is_final(Outcome(None, "timeout", "data"))
