"""The daemon's side of the courier process (see epost/delivery/courier_process.py).

`RemoteCourier` offers the delivery manager the courier's own two calls,
`deliver` and `close_idle`, and runs them in a child process started with
the reactor's process API; it restarts the child if it dies. `deliver`
fires with the child's `Attempt`, or fails with `CourierError` when no
attempt could be made (no child, the child died, the content could not be
read): the manager then tries the job again later without blaming the
destination.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from epost.child_process import LineChild
from epost.delivery.courier import Attempt, CourierError
from epost.delivery.smtp_client import Outcome
from epost.store.spool import SpooledContent
from epost.routing.resolver import Route

log = Logger()


def attempt_from_json(reply: dict) -> Attempt:
    outcomes = {r: Outcome(code, text, stage) for r, (code, text, stage) in reply["outcomes"].items()}
    return Attempt(outcomes, reply["host"], reply["tls"], tuple(reply.get("mx") or ()))


class RemoteCourier(Service):
    restart_delay = 1.0
    stop_timeout = 5.0  # for the child to end once its stdin is closed, then it is killed

    def __init__(self, reactor: Any, settings: dict):
        """`settings`: what courier_process.main needs (spool, hostname, DNS servers and timeouts)."""
        self.reactor = reactor
        self.settings = settings
        self._protocol: LineChild | None = None
        self._pending: dict[int, defer.Deferred[Attempt]] = {}  # waiting for an answer
        self._in_flight: set[int] = set()  # sent and not answered, including those the manager gave up on
        self._ids = itertools.count(1)
        self._stopped: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._stopped = None
        self._spawn()

    def _spawn(self) -> None:
        protocol = LineChild("courier", self.reply_received, self.process_ended)
        args = [sys.executable, "-m", "epost.delivery.courier_process", json.dumps(self.settings)]
        try:
            self.reactor.spawnProcess(protocol, sys.executable, args, env=None)
        except OSError as error:  # out of processes or descriptors: try again, never give up for good
            log.error("cannot start the courier process ({error}); trying again", error=error)
            self.reactor.callLater(self.restart_delay, self._restart)
            return
        self._protocol = protocol

    def stopService(self) -> defer.Deferred:
        """The manager has had its attempts finish (or given up on them) before
        this runs: attempts still in progress are abandoned, and cut short at
        once, so no late answer goes unrecorded. Otherwise closing its stdin
        asks the child to end."""
        super().stopService()
        if self._protocol is None:
            return defer.succeed(None)
        protocol = self._protocol
        self._stopped = defer.Deferred()
        if self._in_flight:
            log.warn("stopping the courier process with {n} attempts cut short", n=len(self._in_flight))
            protocol.transport.signalProcess("KILL")
        else:
            protocol.transport.closeStdin()
        kill = self.reactor.callLater(self.stop_timeout, self._kill, protocol)
        return self._stopped.addBoth(lambda _: kill.cancel() if kill.active() else None)

    @staticmethod
    def _kill(protocol: LineChild) -> None:
        log.warn("courier process did not end; killing it")
        protocol.transport.signalProcess("KILL")

    def deliver(
        self, route: Route, sender: str, recipients: Iterable[str], content: SpooledContent, size: int, body_8bit: bool,
        per_connection: int | None = None,
    ) -> defer.Deferred[Attempt]:
        if self._protocol is None:
            return defer.fail(CourierError("the courier process is not running"))
        request_id = next(self._ids)
        d: defer.Deferred[Attempt] = defer.Deferred(lambda _: self._pending.pop(request_id, None))
        self._pending[request_id] = d
        self._in_flight.add(request_id)
        request = {
            "id": request_id,
            "route": route.to_dict(),
            "sender": sender,
            "recipients": list(recipients),
            "queue_id": content.queue_id,
            "prefix": content.prefix.decode("ascii"),
            "size": size,
            "body_8bit": body_8bit,
        }
        if per_connection:
            request["per_connection"] = per_connection
        self._protocol.transport.write(json.dumps(request).encode() + b"\n")
        return d

    def close_idle(self) -> None:
        if self._protocol is not None:
            self._protocol.transport.write(b'{"close_idle": true}\n')

    def reply_received(self, line: bytes) -> None:
        try:
            reply = json.loads(line)
            request_id = reply["id"]
        except (ValueError, KeyError, TypeError):
            log.error("courier process said something unexpected: {line!r}", line=line[:200])
            return
        self._in_flight.discard(request_id)
        d = self._pending.pop(request_id, None)
        if d is None:
            return  # the manager gave up on it (cancelled)
        if "error" in reply:
            d.errback(CourierError(f"courier: {reply['error']}"))
            return
        try:
            attempt = attempt_from_json(reply)
        except (KeyError, TypeError, ValueError) as error:
            d.errback(CourierError(f"courier process gave an unreadable answer: {error}"))
            return
        d.callback(attempt)

    def process_ended(self, reason) -> None:
        self._protocol = None
        self._in_flight.clear()
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(CourierError("the courier process ended during the attempt"))
        if self._stopped is not None:
            self._stopped.callback(None)
        elif self.running:
            log.error("courier process ended ({reason}); restarting", reason=reason.value)
            self.reactor.callLater(self.restart_delay, self._restart)

    def _restart(self) -> None:
        if self.running and self._protocol is None:
            self._spawn()
