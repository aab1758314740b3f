"""Address verification probes (SPEC §3.5): `MAIL FROM:<>`, `RCPT TO:` for
each address, then QUIT; never DATA.

The probe reuses the outbound client whole: `Courier` chooses the hosts (the
gateway.dat host, or the MX hosts of an `mx`-routed domain), connects, moves
to the next address or host on refusal or a 4xx greeting, and retries once
in plaintext when the TLS handshake killed the connection; `SMTPClient`
does EHLO, STARTTLS when offered, pipelining and the reply caps. Only the
transaction differs (`ProbeClient`), and every wait is cut at one deadline
for the whole probe, so a next hop that greets and goes mute, sends garbage
or hangs up costs at most the verification budget and leaves no session
behind.

Probes run in the daemon, not in the courier process: a probe is a few
hundred bytes, once per distinct address a day at most (the cache), and its
answer is awaited by an SMTP session of the daemon; going through the child
would add a request type to its protocol, a hop each way, and a second
restart story for a session that must answer within 8 s.
"""

from __future__ import annotations

from typing import Iterable

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from epost.delivery.courier import Attempt, Courier
from epost.delivery.smtp_client import Outcome, SMTPClient
from epost.routing.resolver import Route

PROBE_BUDGET = 8.0  # seconds from the start of a probe to its verdict (SPEC §3.5)


class ProbeClient(SMTPClient):
    """One probe session: the SMTPClient dialogue up to the last RCPT, then QUIT.

    `deadline` (reactor time) caps the wait for every reply, so the session
    ends by then whatever the peer does. Every recipient gets the RCPT
    outcome, 2xx included (the delivering client keeps 2xx for DATA)."""

    def __init__(self, *args, deadline: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline
        self.connected = False
        self.closed: defer.Deferred[None] = defer.Deferred()  # fires when the connection is gone

    def connectionMade(self) -> None:
        self.connected = True
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.closed.called:
            self.closed.callback(None)

    def _start_transaction(self) -> None:
        self._pipelining = "PIPELINING" in self._extensions
        mail = ("MAIL FROM:<>", "mail", self._on_mail)
        if self._pipelining:
            self._send(mail, *(self._rcpt_command(r) for r in self.recipients))
        else:
            self._send(mail)

    def _on_rcpt(self, recipient: str, code: int, text: str) -> None:
        if not self._mail_failed:
            self._outcomes[recipient] = Outcome(code, text, "rcpt")
            if code // 100 == 2:
                self._accepted.append(recipient)
        index = self.recipients.index(recipient) + 1
        if index < len(self.recipients):
            if not self._pipelining:
                self._send(self._rcpt_command(self.recipients[index]))
            return
        self._finish(clean=False)

    def _timeout_for(self, key: str) -> float:
        return min(self.timeouts[key], max(0.0, self.deadline - self.clock.seconds()))


class ProbeCourier(Courier):
    """The courier for one probe: no connection cache, `ProbeClient`
    sessions, and connects that may not outlast the probe's deadline."""

    def __init__(self, reactor, resolver, hostname: str, tls_context, deadline: float, smtp_port: int = 25) -> None:
        super().__init__(reactor, resolver, hostname, tls_context, smtp_port=smtp_port)
        self.deadline = deadline
        self.reuse_connections = False
        self.clients: list[ProbeClient] = []
        self.client_class = self._make_client

    def _make_client(self, *args, **kwargs) -> ProbeClient:
        client = ProbeClient(*args, deadline=self.deadline, **kwargs)
        self.clients.append(client)
        return client

    def all_closed(self) -> defer.Deferred:
        """Fires once every connection this probe opened is gone (by the deadline at the latest)."""
        return defer.DeferredList([c.closed for c in self.clients if c.connected])

    @property
    def connect_timeout(self) -> float:
        return max(0.01, self.deadline - self.reactor.seconds())

    @connect_timeout.setter
    def connect_timeout(self, value: float) -> None:
        pass  # Courier.__init__ sets one; ours follows the deadline


def _no_content() -> Iterable[bytes]:
    return ()


class Prober:
    """`probe(route, addresses)` -> Deferred[Attempt]: one probe session (more
    when the first host gives no answer) asking about every address at once."""

    def __init__(self, reactor, resolver, hostname: str, tls_context=None, budget: float = PROBE_BUDGET, smtp_port: int = 25):
        self.reactor = reactor
        self.resolver = resolver
        self.hostname = hostname
        self.tls_context = tls_context
        self.budget = budget
        self.smtp_port = smtp_port

    def probe(self, route: Route | dict, addresses: list[str]) -> defer.Deferred[Attempt]:
        """The Deferred fires with the verdicts as soon as they are known; its
        `closed` attribute fires when the probe's connections are gone too
        (after QUIT), which is when the probe stops counting against the
        per-destination connection limit."""
        deadline = self.reactor.seconds() + self.budget
        courier = ProbeCourier(self.reactor, self.resolver, self.hostname, self.tls_context, deadline, self.smtp_port)
        d = courier.deliver(route, "", addresses, _no_content, 0, False)
        closed: defer.Deferred[None] = defer.Deferred()

        def ended(result):
            courier.all_closed().addBoth(lambda _: closed.callback(None))
            return result

        d.addBoth(ended)
        d.closed = closed
        return d
