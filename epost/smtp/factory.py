"""Builds SMTP sessions for one listener and enforces connection limits."""

from __future__ import annotations

from collections import Counter
from weakref import WeakSet

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol

from epost.smtp import events as reasons
from epost.smtp.events import SessionEvents
from epost.reply import Reply
from epost.smtp.interfaces import IReceiver
from epost.smtp.server import ServerSettings, SMTPServer


class _Refuse(Protocol):
    """Says one 421 line and hangs up (RFC 5321 §3.1)."""

    def __init__(self, reply: Reply):
        self.reply = reply

    def connectionMade(self) -> None:
        self.transport.write(self.reply.encode())
        self.transport.loseConnection()


class ConnectionLimits:
    """Counts open sessions in total and per client IP, across listeners."""

    def __init__(self, total: int, per_client: int):
        self.total, self.per_client = total, per_client
        self.open = Counter()
        self.total_open = 0
        self.sessions: WeakSet = WeakSet()  # open SMTPServers, asked to end when the daemon stops (closed ones drop out)

    def admit(self, ip: str) -> tuple[str, Reply] | None:
        """None when admitted (and counted), else why and the reply to refuse with."""
        if self.total_open >= self.total:
            return reasons.REFUSED_TOO_MANY, Reply(421, "4.3.2", "Too many connections, try again later")
        if self.open[ip] >= self.per_client:
            return reasons.REFUSED_PER_CLIENT, Reply(421, "4.7.0", "Too many connections from your address")
        self.open[ip] += 1
        self.total_open += 1
        return None

    def release(self, ip: str) -> None:
        self.total_open -= 1
        self.open[ip] -= 1
        if self.open[ip] <= 0:
            del self.open[ip]


class SMTPFactory(Factory):
    noisy = False  # one log line per listener is enough; twistd logs the port
    def __init__(
        self,
        receiver: IReceiver,
        settings: ServerSettings,
        clock: IReactorTime,
        limits: ConnectionLimits,
        tls_context=None,
        portal=None,
        throttle=None,
        events: SessionEvents | None = None,
        screening=None,
    ):
        """`events` is shared by every listener of a daemon (one rate limit per reason)."""
        self.events = events or SessionEvents(clock)
        self.screening = screening  # epost/smtp/screen.py: the relay listener's only
        self.portal = portal
        self.throttle = throttle
        self.receiver = receiver
        self.settings = settings
        self.clock = clock
        self.limits = limits
        self.tls_context = tls_context

    def buildProtocol(self, addr) -> Protocol:
        ip = getattr(addr, "host", "")
        refusal = self.limits.admit(ip)
        if refusal is not None:
            reason, reply = refusal
            reply = Reply(reply.code, reply.enhanced, f"{self.settings.hostname} {reply.text}")
            self.events.refused(self.settings.listener, ip, getattr(addr, "port", 0), reason, reply.encode().decode().strip())
            return _Refuse(reply)
        protocol = SMTPServer(
            self.receiver,
            self.settings,
            self.clock,
            self.tls_context,
            on_close=lambda: self.limits.release(ip),
            portal=self.portal,
            throttle=self.throttle,
            events=self.events,
            screening=self.screening,
        )
        protocol.factory = self
        self.limits.sessions.add(protocol)
        return protocol
