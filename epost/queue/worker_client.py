"""The daemon's side of the spool worker process (see epost/queue/worker.py).

`SpoolWorkerService` starts the child with the reactor's own process API,
streams message content to it as SMTP delivers it, and turns its reply
lines back into Deferreds. It offers the same `open_message()` as `Spool`,
so the receiver does not care where the writing happens.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import fcntl
import sys
import zlib
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from epost.child_process import LineChild
from epost.delivery.signing import keys_to_json
from epost.store.envelope import Envelope
from epost.store.database import Change, SpoolError
from epost.store.spool import Spool, SpoolStopping
from epost.queue.worker import FRAME, change_frame, read_error

log = Logger()

PIPE_SIZE = 1024 * 1024  # Linux's default cap (fs.pipe-max-size): fewer writes and pauses for big messages


class RemoteMessageWriter:
    """One message streaming to the worker; the IMessageWriter of the receiver.

    Writes are held back until `HOLD` bytes gather, so a small message (the
    Received: header, then its content in one or two reads) reaches the worker
    in a single pipe write together with its commit, not three: each write is
    a reactor round and a wake-up of the worker."""

    HOLD = 16 * 1024

    def __init__(self, worker: SpoolWorkerService, queue_id: str):
        self.worker = worker
        self.queue_id = queue_id
        self.generation = worker.generation(queue_id)  # the child that holds our content
        self.size = 0
        self._held: list[bytes] = []
        self._held_size = 0
        self._finished = False
        self._producer = None

    def write(self, data: bytes) -> None:
        if not self._finished and data:
            self.size += len(data)
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size >= self.HOLD:
                self._send_held()

    def _send_held(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held, self._held_size = [], 0
            self.worker.send(b"W", self.queue_id, data)

    def abort(self) -> None:
        if not self._finished:
            self._finished = True
            self._held, self._held_size = [], 0
            self.worker.send(b"A", self.queue_id, b"")

    def commit(self, envelope: Envelope) -> defer.Deferred:
        self._finished = True
        if self.worker.generation(self.queue_id) != self.generation:
            # The child that held the content died: committing now would queue an empty message.
            self._held, self._held_size = [], 0
            self.worker.send(b"A", self.queue_id, b"")  # drop what the new child got
            return defer.fail(SpoolError(errno.EIO, "spool worker restarted while the message arrived"))
        self._send_held()
        return self.worker.commit(self.queue_id, envelope)

    def registerProducer(self, producer, streaming: bool) -> None:
        """The SMTP transport, paused while the worker's pipe is full."""
        self._producer = producer
        self.worker.throttle(self.queue_id).add(producer)

    def unregisterProducer(self) -> None:
        if self._producer is not None:
            self.worker.throttle(self.queue_id).remove(self._producer)
            self._producer = None


def _written_already(failure) -> None:
    failure.trap(FileNotFoundError)


@implementer(IPushProducer)
class _PipeThrottle:
    """Registered on a worker's stdin: when the pipe backs up, every SMTP
    session streaming into that worker is paused, so a fast client cannot
    fill the daemon's memory (memory stays bounded for any message size)."""

    def __init__(self):
        self.producers: set = set()
        self.paused = False
        self._current = None

    def add(self, producer) -> None:
        self.producers.add(producer)
        if self.paused:
            producer.pauseProducing()

    def remove(self, producer) -> None:
        self.producers.discard(producer)
        if self.paused:
            producer.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        for producer in self.producers:
            producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        for producer in self.producers:
            producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producers.clear()


class SpoolWorkerService(Service):
    """Runs `processes` copies of `python -m epost.queue.worker` for the daemon's lifetime.

    One by default: every commit is a transaction of the queue store, whose
    writers take turns on one write lock (SQLite's busy handler sleeps
    between tries), so a second process would mostly wait; one process's
    group commit takes every message that arrived during the previous flush.
    More than one spreads messages over them by queue ID.
    """

    restart_delay = 1.0

    def __init__(self, spool: Spool, hostname: str, reactor: Any, processes: int = 1, give_up_after: float = 8 * 3600,
                 dkim_keys: tuple = (), threadpool: Any = None):
        self.spool = spool
        self.threadpool = threadpool  # store reads after a worker died; None: the reactor's pool
        self.dkim_keys = dkim_keys  # epost.delivery.signing.DkimKey: the workers sign at commit
        self.hostname = hostname
        self.give_up_after = give_up_after
        self.reactor = reactor
        self._protocols: list[LineChild | None] = [None] * processes
        self._throttles = [_PipeThrottle() for _ in range(processes)]
        self._generations = [0] * processes
        self._commits: dict[str, tuple[defer.Deferred, Envelope]] = {}
        self._deliveries: dict[str, tuple[defer.Deferred, set[str], dict[str, str]]] = {}
        self._changes: dict[str, list[tuple[defer.Deferred, Change]]] = {}  # in the order sent
        self._stopping: list[defer.Deferred] = []

    # -- lifecycle ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for index in range(len(self._protocols)):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._generations[index] += 1
        protocol = self._protocols[index] = LineChild(
            "spool worker", lambda line: self.reply_received(line.decode("utf-8", "replace")),
            lambda reason: self.worker_ended(index, reason),
        )
        args = [sys.executable, "-m", "epost.queue.worker", str(self.spool.root), self.hostname, str(self.give_up_after)]
        self.reactor.spawnProcess(protocol, sys.executable, args, env=None)
        stdin = protocol.transport.pipes[0]
        try:
            fcntl.fcntl(stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            stdin.bufferSize = PIPE_SIZE
        except (OSError, AttributeError):  # not Linux, or a lower fs.pipe-max-size: the default pipe serves
            pass
        protocol.transport.registerProducer(self._throttles[index], True)
        if self.dkim_keys:
            protocol.transport.writeSequence([FRAME.pack(b"K", b"0" * 17, len(keys := keys_to_json(self.dkim_keys))), keys])

    def stopService(self) -> defer.Deferred:
        """Closing stdin asks each worker to finish its commits and exit."""
        super().stopService()
        for protocol in self._protocols:
            if protocol is not None:
                self._stopping.append(defer.Deferred())
                protocol.transport.closeStdin()
        return defer.DeferredList(list(self._stopping))

    def generation(self, queue_id: str) -> int:
        """Changes whenever the child serving `queue_id` is replaced."""
        return self._generations[self._index(queue_id)]

    def throttle(self, queue_id: str) -> _PipeThrottle:
        return self._throttles[self._index(queue_id)]

    def _index(self, queue_id: str) -> int:
        """The worker that owns this message (its content, commit and delivery).

        A hash, not the ID's digits: the counter digits are mostly zero."""
        return zlib.crc32(queue_id.encode("ascii")) % len(self._protocols)

    def worker_ended(self, index: int, reason) -> None:
        """A child ended: its pending commits are answered by what the store
        holds (see `_settle_orphan`), its deliveries are retried later, and
        it is restarted unless the daemon is stopping."""
        self._protocols[index] = None
        failure = SpoolError(errno.EIO, "spool worker process ended")
        if not self.running:
            failure = SpoolStopping(errno.ESHUTDOWN, "spool worker process ended while the daemon was stopping")
        orphans = [(q, self._commits.pop(q)[0]) for q in [q for q in self._commits if self._index(q) == index]]
        pending = [self._settle_orphan(q, d, failure) for q, d in orphans]
        for queue_id in [q for q in self._deliveries if self._index(q) == index]:
            self.reply_received(f"R {queue_id}")
        for queue_id in [q for q in self._changes if self._index(q) == index]:
            for d, change in self._changes.pop(queue_id):
                redone = self._redo(change)
                redone.chainDeferred(d)
                pending.append(redone)
        settled = defer.DeferredList(pending, consumeErrors=True)
        if self._stopping:
            stopped = self._stopping.pop()
            settled.addCallback(lambda _: stopped.callback(None))  # the pool and the store are still needed
        elif self.running:
            log.error("spool worker ended ({reason}); restarting", reason=reason.value)
            self.reactor.callLater(self.restart_delay, self._restart, index)

    def _settle_orphan(self, queue_id: str, d: defer.Deferred, failure: SpoolError) -> defer.Deferred:
        """A commit the dead child never answered: its batch may have been
        durable before it could write `C ID`. The store decides: queued, the
        client gets its 250 and the runner the message (the stored envelope
        holds any DKIM signature); not queued, `failure` (451, or 421 when
        stopping) and the client sends it again. Read in the thread pool."""

        def answer(found: tuple[str, Envelope] | None) -> None:
            if found is None:
                d.errback(failure)
                return
            state, envelope = found
            log.info("{queue_id}: committed before the spool worker ended", queue_id=queue_id)
            if state == "incoming":  # else someone (the operator) has it already
                self.spool.notify_committed(queue_id, envelope)
            d.callback(queue_id)

        def unknown(error) -> None:
            log.error("{queue_id}: cannot tell whether the ended spool worker committed it ({error}); answered 4xx",
                      queue_id=queue_id, error=error.value)
            d.errback(failure)

        pool = self.threadpool if self.threadpool is not None else self.reactor.getThreadPool()
        looked = deferToThreadPool(self.reactor, pool, self.spool.find, queue_id)
        looked.addCallbacks(answer, unknown)
        return looked

    def _redo(self, change: Change) -> defer.Deferred:
        """Bookkeeping the dead child never answered, written again from the daemon's pool.

        The delivery manager holds the message's lock until it is answered, so
        nobody else changed it meanwhile: a move or removal whose message is no
        longer in its source state was written by the child before it died (an
        update leaves its message where it was, so its ENOENT stands)."""
        redone = self.spool.record(change)
        return redone.addErrback(_written_already) if change.leaves_source else redone

    def _restart(self, index: int) -> None:
        if self.running and self._protocols[index] is None:
            self._spawn(index)

    # -- requests ------------------------------------------------------------

    def send(self, op: bytes, queue_id: str, payload: bytes) -> None:
        protocol = self._protocols[self._index(queue_id)]
        if protocol is not None:
            # writeSequence: no copy of the (up to 64 KiB) payload per DATA chunk
            protocol.transport.writeSequence([FRAME.pack(op, queue_id.encode("ascii"), len(payload)), payload])

    def open_message(self) -> RemoteMessageWriter:
        return RemoteMessageWriter(self, self.spool.new_queue_id())

    def commit(self, queue_id: str, envelope: Envelope) -> defer.Deferred:
        if not self.running:  # the workers' stdin is closed: the frame would be lost, never answered
            return defer.fail(SpoolStopping(errno.ESHUTDOWN, "spool workers stopped (the daemon is stopping)"))
        if self._protocols[self._index(queue_id)] is None:
            return defer.fail(SpoolError(errno.EIO, "spool worker process not running"))
        d: defer.Deferred = defer.Deferred()
        self._commits[queue_id] = (d, envelope)
        self.send(b"C", queue_id, envelope.to_bytes())
        return d

    def record(self, change: Change) -> defer.Deferred:
        """Delivery bookkeeping (`Spool.record`), written by the worker: one
        transaction for all that gathered, and no thread hand-off in the daemon.
        Without a worker to send it to (stopping, restarting), the daemon's pool writes it."""
        if not self.running or self._protocols[self._index(change.queue_id)] is None:
            return self.spool.record(change)
        try:
            frame = change_frame(change)
        except SpoolError as e:  # an envelope JSON cannot say
            return defer.fail(e)
        d: defer.Deferred = defer.Deferred()
        self._changes.setdefault(change.queue_id, []).append((d, change))
        self.send(b"B", change.queue_id, frame)
        return d

    def deliver(self, queue_ids: list[str]) -> defer.Deferred:
        """Local delivery of these queued messages; fires with a verdict per ID (see runner.py)."""
        d: defer.Deferred = defer.Deferred()
        live = [q for q in queue_ids if self._protocols[self._index(q)] is not None]
        verdicts = {q: "R" for q in queue_ids if q not in live}
        if not live:
            d.callback(verdicts)
            return d
        entry = (d, set(live), verdicts)
        for queue_id in live:
            self._deliveries[queue_id] = entry
            self.send(b"L", queue_id, b"")
        return d
    def reply_received(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        queue_id, _, detail = rest.partition(" ")
        if kind == "C" and queue_id in self._commits:
            d, envelope = self._commits.pop(queue_id)
            if detail:  # the worker DKIM-signed it: the envelope on disk holds the signature
                envelope = dataclasses.replace(envelope, dkim=base64.b64decode(detail).decode("ascii"))
            self.spool.notify_committed(queue_id, envelope)
            d.callback(queue_id)
        elif kind == "F" and queue_id in self._commits:
            self._commits.pop(queue_id)[0].errback(SpoolError(*read_error(detail)))
        elif kind in ("S", "E") and queue_id in self._changes:
            waiting = self._changes[queue_id]
            d, _ = waiting.pop(0)
            if not waiting:
                del self._changes[queue_id]
            if kind == "S":
                d.callback(None)
            else:
                number, text = read_error(detail)
                d.errback(FileNotFoundError(text) if number == errno.ENOENT else SpoolError(number, text))
        elif kind in ("D", "R", "P") and queue_id in self._deliveries:
            d, waiting, verdicts = self._deliveries.pop(queue_id)
            waiting.discard(queue_id)
            verdicts[queue_id] = kind
            if not waiting:
                d.callback(verdicts)
        else:
            log.error("spool worker said something unexpected: {line!r}", line=line)
