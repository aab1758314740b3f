"""The daemon's side of the courier process (see epost/delivery/courier_process.py).

`RemoteCourier` offers the delivery manager the courier's own two calls,
`deliver` and `close_idle`, and runs them in a child process started with
the reactor's process API; it restarts the child if it dies. Like
`Courier.deliver`, `deliver` never errbacks: an attempt the child could
not answer (it died) comes back without an answer for any recipient, so
the manager retries it as it would a host that did not answer.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from epost.delivery.courier import Attempt
from epost.delivery.smtp_client import Outcome
from epost.routing.resolver import Route
from epost.queue.spool import SpooledContent

log = Logger()


def unanswered(recipients: Iterable[str], text: str) -> Attempt:
    return Attempt({r: Outcome(None, text, "connect") for r in recipients}, None, False)


def attempt_from_json(reply: dict) -> Attempt:
    outcomes = {r: Outcome(code, text, stage) for r, (code, text, stage) in reply["outcomes"].items()}
    return Attempt(outcomes, reply["host"], reply["tls"])


class _CourierProtocol(ProcessProtocol):
    def __init__(self, service: RemoteCourier):
        self.service = service
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            self.service.reply_received(line)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            log.info("courier: {line}", line=line.decode("utf-8", "replace"))

    def processEnded(self, reason) -> None:
        self.service.process_ended(reason)


class RemoteCourier(Service):
    restart_delay = 1.0
    stop_timeout = 30.0  # the manager gave attempts their grace already; then the child is killed

    def __init__(self, reactor: Any, settings: dict):
        """`settings`: what courier_process.main needs (spool, hostname, DNS servers and timeouts)."""
        self.reactor = reactor
        self.settings = settings
        self._protocol: _CourierProtocol | None = None
        self._pending: dict[int, tuple[defer.Deferred, list[str]]] = {}
        self._ids = itertools.count(1)
        self._stopped: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._spawn()

    def _spawn(self) -> None:
        protocol = _CourierProtocol(self)
        args = [sys.executable, "-m", "epost.delivery.courier_process", json.dumps(self.settings)]
        self.reactor.spawnProcess(protocol, sys.executable, args, env=None)
        self._protocol = protocol

    def stopService(self) -> defer.Deferred:
        """Closing its stdin asks the child to answer what is in progress and end."""
        super().stopService()
        if self._protocol is None:
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        self._protocol.transport.closeStdin()
        protocol = self._protocol
        kill = self.reactor.callLater(self.stop_timeout, self._kill, protocol)
        return self._stopped.addBoth(lambda result: kill.cancel() if kill.active() else None)

    @staticmethod
    def _kill(protocol: _CourierProtocol) -> None:
        log.warn("courier process did not end; killing it")
        protocol.transport.signalProcess("KILL")

    def deliver(
        self, route: Route | dict, sender: str, recipients: Iterable[str], content: SpooledContent, size: int, body_8bit: bool
    ) -> defer.Deferred[Attempt]:
        recipients = list(recipients)
        if self._protocol is None:
            return defer.succeed(unanswered(recipients, "internal error: courier process not running"))
        request_id = next(self._ids)
        d: defer.Deferred[Attempt] = defer.Deferred()
        self._pending[request_id] = (d, recipients)
        request = {
            "id": request_id,
            "route": route.to_dict() if isinstance(route, Route) else route,
            "sender": sender,
            "recipients": recipients,
            "queue_id": content.queue_id,
            "queue": content.queue,
            "size": size,
            "body_8bit": body_8bit,
        }
        self._protocol.transport.write(json.dumps(request).encode() + b"\n")
        return d

    def close_idle(self) -> None:
        if self._protocol is not None:
            self._protocol.transport.write(b'{"close_idle": true}\n')

    def reply_received(self, line: bytes) -> None:
        try:
            reply = json.loads(line)
            d, _ = self._pending.pop(reply["id"])
            attempt = attempt_from_json(reply)
        except (ValueError, KeyError, TypeError):
            log.error("courier process said something unexpected: {line!r}", line=line[:200])
            return
        d.callback(attempt)

    def process_ended(self, reason) -> None:
        self._protocol = None
        pending, self._pending = self._pending, {}
        for d, recipients in pending.values():
            d.callback(unanswered(recipients, "internal error: courier process ended"))
        if self._stopped is not None:
            self._stopped.callback(None)
        elif self.running:
            log.error("courier process ended ({reason}); restarting", reason=reason.value)
            self.reactor.callLater(self.restart_delay, self._restart)

    def _restart(self) -> None:
        if self.running and self._protocol is None:
            self._spawn()
