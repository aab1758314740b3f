"""Delivers queued mail to local Maildirs as soon as it is committed (SPEC §6, §7).

Recipients with any other route stay pending for the runner that owns that
route; a message leaves ``incoming/`` only when no recipient is pending.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from epost.delivery.maildir import deliver_to_maildir
from epost.queue.envelope import Envelope, EnvelopeError, Recipient
from epost.queue.spool import Spool

T = TypeVar("T")
log = Logger()


class LocalDeliveryRunner(Service):
    """Feeds committed and recovered messages through Maildir delivery, ``concurrency`` messages at a time."""

    retry_delay = 60.0

    def __init__(
        self,
        spool: Spool,
        reactor: Any,
        threadpool: Any,
        hostname: str,
        mailbox_root: Path,
        concurrency: int = 4,
    ) -> None:
        self._spool = spool
        self._reactor = reactor
        self._threadpool = threadpool
        self._hostname = hostname
        self._mailbox_root = Path(mailbox_root)
        self._limit = DeferredSemaphore(concurrency)
        self._busy: set[str] = set()  # queued behind the semaphore or being delivered
        self._retries: dict[str, IDelayedCall] = {}
        self._idle_waiters: list[Deferred[None]] = []

    def startService(self) -> None:
        """Recover synchronously, before any listener can start writing into ``tmp/``."""
        super().startService()
        recovered = self._spool.recover()
        self._spool.on_commit.append(self.enqueue)
        for queue_id in recovered:
            self.enqueue(queue_id)

    def stopService(self) -> Deferred[None]:
        """Start nothing new; fires once deliveries in flight are done.  Queued mail stays on disk."""
        super().stopService()
        if self.enqueue in self._spool.on_commit:
            self._spool.on_commit.remove(self.enqueue)
        for call in self._retries.values():
            call.cancel()
        self._retries.clear()
        return self.idle()

    def idle(self) -> Deferred[None]:
        """Fires when nothing is queued or in flight (retries waiting on a timer do not count)."""
        if not self._busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def enqueue(self, queue_id: str) -> None:
        """Deliver ``queue_id`` when a slot is free; a message already queued or in flight is not doubled."""
        if not self.running or queue_id in self._busy:
            return
        self._busy.add(queue_id)
        d = self._limit.run(lambda: Deferred.fromCoroutine(self._deliver(queue_id)))
        d.addErrback(self._failed, queue_id)
        d.addBoth(self._finished, queue_id)

    async def _deliver(self, queue_id: str) -> None:
        if not self.running:
            return  # stopping: it stays in incoming/ for the next start
        envelope = await self._in_thread(self._spool.load, queue_id)
        content = self._spool.content_path(queue_id)
        retry = False
        for index in envelope.pending():
            recipient = envelope.recipients[index]
            if (recipient.route or {}).get("kind") != "local":
                continue
            attempts = recipient.attempts + 1
            try:
                await self._in_thread(
                    deliver_to_maildir,
                    self._mailbox(recipient),
                    content,
                    hostname=self._hostname,
                    prefix=_trace_headers(envelope, recipient),
                )
            except Exception as e:
                log.failure("{queue_id}: delivery to {address} failed", queue_id=queue_id, address=recipient.address)
                retry = True
                envelope = envelope.with_recipient(index, attempts=attempts, last_reply=f"maildir: {e}")
            else:
                envelope = envelope.with_recipient(
                    index, state="delivered", attempts=attempts, last_reply="delivered to maildir"
                )
            # Saved after each recipient so a finished one is never delivered again.  A crash
            # between the rename into new/ and this update still leaves one duplicate copy.
            await self._in_thread(self._spool.update, envelope)
        if not envelope.pending():
            await self._in_thread(self._spool.remove, queue_id)
        elif retry:
            self._schedule_retry(queue_id)

    def _failed(self, failure: Failure, queue_id: str) -> None:
        if failure.check(FileNotFoundError):
            log.info("{queue_id}: no longer queued", queue_id=queue_id)
        elif failure.check(EnvelopeError):
            log.failure("{queue_id}: unreadable, left for the operator", failure, queue_id=queue_id)
        else:
            log.failure("{queue_id}: delivery run failed", failure, queue_id=queue_id)
            self._schedule_retry(queue_id)

    def _finished(self, _: object, queue_id: str) -> None:
        self._busy.discard(queue_id)
        if not self._busy:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def _schedule_retry(self, queue_id: str) -> None:
        if self.running and queue_id not in self._retries:
            self._retries[queue_id] = self._reactor.callLater(self.retry_delay, self._retry, queue_id)

    def _retry(self, queue_id: str) -> None:
        del self._retries[queue_id]
        self.enqueue(queue_id)

    def _mailbox(self, recipient: Recipient) -> Path:
        """``domain/user`` under the mailbox root; anything that could climb out of it is refused."""
        mailbox = str((recipient.route or {}).get("mailbox", ""))
        parts = mailbox.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad mailbox {mailbox!r} for {recipient.address}")
        return self._mailbox_root.joinpath(*parts)

    def _in_thread(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._threadpool, f, *args, **kwargs)


def _trace_headers(envelope: Envelope, recipient: Recipient) -> bytes:
    """The headers a local delivery adds, as Postfix's local(8) does."""
    text = f"Return-Path: <{envelope.sender}>\nDelivered-To: {recipient.address}\n"
    return text.encode("utf-8", "surrogateescape")
