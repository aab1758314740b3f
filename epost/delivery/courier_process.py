"""The courier process: outbound SMTP sessions on the second core.

    python -m epost.delivery.courier_process SETTINGS_JSON

Why a process: relaying, one daemon process did inbound SMTP, outbound SMTP
and the queue's bookkeeping on one core (at 85% of it), while Postfix spreads
the same work over both. Outbound sessions are the part with the narrowest
interface (`Courier.deliver`: a route, an envelope, the content's place in
the spool; back an outcome per recipient), so they run here, in a reactor of
their own, and every decision (when to try, what a reply means, the files,
the logs) stays with the delivery manager in the daemon.

One JSON object per line on stdin, one per line back on stdout:
  {"id": N, "route": {...}, "sender": s, "recipients": [...],
   "queue_id": q, "prefix": p, "size": n, "body_8bit": b[, "per_connection": n]}
      (p: header lines sent before the content, the message's DKIM signature)
      -> {"id": N, "outcomes": {recipient: [code, text, stage]}, "host": h, "tls": b, "mx": [names]}
      or {"id": N, "error": text}  when no attempt could be made
  {"close_idle": true}    QUIT every cached connection (no answer)
The content is opened here before the attempt, from the queue store (its
bytes, or a descriptor of its large file, found by its ID alone):
the daemon's manager never lets a message go while an attempt for it runs. When stdin closes, the process ends at once,
abandoning the attempts in progress (see `readConnectionLost`). Log lines go
to stderr, which the daemon relays into its own log.

The process runs `NICENESS` steps nicer than the daemon: every message passes
through the daemon, which under load is runnable nearly all the time, while
the courier has slack. At equal priority the courier woke for almost every
attempt and the daemon received one outcome per read; nicer, it yields to the
daemon, takes up several requests per wake-up and answers them together, and
both processes spend less CPU per message (bench/relay.py: daemon 2.15 → 1.87
ms, courier 0.79 → 0.66, relay rate +12–18%; docs/delivery.md).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from epost.delivery.courier import Attempt
from epost.store.spool import Spool, SpooledContent

log = Logger()

NICENESS = 10  # added to the daemon's own; 5 gained less, 19 no more than 10


def attempt_to_json(request_id: int, attempt: Attempt) -> bytes:
    outcomes = {r: [o.code, o.text, o.stage] for r, o in attempt.outcomes.items()}
    reply = {"id": request_id, "outcomes": outcomes, "host": attempt.host, "tls": attempt.tls}
    if attempt.mx:
        reply["mx"] = list(attempt.mx)
    return json.dumps(reply).encode()


@implementer(IHalfCloseableProtocol)
class CourierServer(LineOnlyReceiver):
    """Runs each request through `courier`; ends (`on_done`) as soon as
    stdin closes."""

    delimiter = b"\n"
    # A request with thousands of recipients is still one line; a longer one
    # ends the connection (LineOnlyReceiver's default), so the daemon sees the
    # process end and its requests fail with CourierError instead of hanging.
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self, courier: Any, spool: Spool, on_done=lambda: None):
        self.courier = courier
        self.spool = spool
        self.on_done = on_done

    def lineReceived(self, line: bytes) -> None:
        request = None
        try:
            request = json.loads(line)
            if request.get("close_idle"):
                self.courier.close_idle()
                return
            request_id = request["id"]
            arguments = [request[key] for key in ("route", "sender", "recipients")]
            content = SpooledContent(self.spool, request["queue_id"], request.get("prefix", "").encode("ascii"))
            size, body_8bit = request["size"], request["body_8bit"]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.error("courier process: unreadable request ({error}): {line!r}", error=error, line=line[:200])
            if isinstance(request, dict) and "id" in request:
                self.sendLine(json.dumps({"id": request["id"], "error": f"unreadable request: {error}"}).encode())
            return
        try:
            content.open()  # now: a file problem is ours, not the destination's
        except (OSError, ValueError) as error:
            self.sendLine(json.dumps({"id": request_id, "error": f"cannot read {content.queue_id}: {error}"}).encode())
            return
        per_connection = request.get("per_connection")
        extra = {"per_connection": per_connection} if per_connection else {}
        d = self.courier.deliver(*arguments, content, size, body_8bit, **extra)
        d.addCallbacks(self._answer, self._failed, (request_id, content), None, (request_id, content))

    def _answer(self, attempt: Attempt, request_id: int, content: SpooledContent) -> None:
        self._done(content, attempt_to_json(request_id, attempt))

    def _failed(self, failure, request_id: int, content: SpooledContent) -> None:
        """Courier.deliver is not meant to fail; if it does, the daemon still gets an answer."""
        log.failure("courier process: attempt {id} failed", failure, id=request_id)
        self._done(content, json.dumps({"id": request_id, "error": failure.getErrorMessage()}).encode())

    def _done(self, content: SpooledContent, line: bytes) -> None:
        content.close()
        self.sendLine(line)

    def readConnectionLost(self) -> None:
        """The daemon closed our stdin: end now, attempts in progress with us.

        The daemon closes it only when nothing is in flight, or because it
        died; then no answer has a reader, the next daemon tries the mail
        again, and sessions left running would send it twice."""
        self.courier.close_idle()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.on_done()

    def connectionLost(self, reason=None) -> None:
        self.on_done()


def main(settings: dict) -> None:
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.threadpool import ThreadPool

    from epost.config import HostPort
    from epost.delivery.courier import Courier
    from epost.routing.dns import MXResolver
    from epost.tls import client_context

    os.nice(NICENESS)  # first: a thread started before keeps the old niceness (Linux sets it per thread)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    # DNS waits on the network: lookups get a pool of their own, as in the daemon.
    dns_pool = ThreadPool(minthreads=1, maxthreads=16, name="epost-dns")
    dns_pool.start()
    reactor.addSystemEventTrigger("after", "shutdown", dns_pool.stop)
    servers = tuple(HostPort(host, port) for host, port in settings["dns_servers"])
    courier = Courier(
        reactor,
        # [delivery] has no DNS timeout of its own: lookups get the connect timeout.
        MXResolver(reactor, dns_pool, servers, timeout=settings["connect_timeout"]),
        settings["hostname"],
        tls_context=client_context(),
        connect_timeout=settings["connect_timeout"],
        timeouts=settings["timeouts"],
    )
    spool = Spool(Path(settings["spool"]), reactor=None, threadpool=None)
    spool.open(create=False)  # the daemon made it; its own connection for reading contents

    def done() -> None:
        if not ended:
            ended.append(True)
            reactor.stop()

    ended: list[bool] = []

    StandardIO(CourierServer(courier, spool, on_done=done))
    # The daemon decides when we stop (it closes our stdin, and our pipes close
    # if it dies): a Ctrl-C or a SIGTERM sent to the whole process group
    # (systemd's default) must not cut the attempts in progress short, while
    # the daemon still waits for their answers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
