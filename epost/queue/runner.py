"""Delivers queued mail to local Maildirs as soon as it is committed (SPEC §6, §7).

Recipients with any other route stay pending: once the local ones are done,
such a message is passed on (`on_passed`) to the delivery manager, which
also owns bounces. A message leaves the queue here only when nothing is
left for anyone. Its queue updates are delivery bookkeeping, written
without a flush of their own (`durable=False`): a power cut may deliver
a batch again, never lose one (docs/queue.md).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from epost import metrics
from epost.delivery.maildir import MaildirBatch
from epost.store.database import Change
from epost.store.envelope import Envelope, EnvelopeError, Recipient
from epost.queue.outcomes import has_local_pending, needs_manager
from epost.store.spool import Spool

log = Logger()

# deliver_local_batch's verdict per message (also the worker's reply letters)
DONE, RETRY, PASSED = "D", "R", "P"


class LocalDeliveryRunner(Service):
    """Feeds committed and recovered messages through Maildir delivery.

    Messages are delivered in batches, one batch in a thread at a time:
    while a batch is on disk the next one gathers, so under load one fsync
    round and one thread hop serve many messages (the same group commit the
    spool uses on the way in).
    """

    retry_delay = 60.0
    max_batch = 256

    def __init__(
        self,
        spool: Spool,
        reactor: Any,
        threadpool: Any,
        hostname: str,
        mailbox_root: Path,
        deliver: Callable[[list[str]], Deferred[dict[str, str]]] | None = None,
        on_passed: Callable[[str, Envelope | None], None] | None = None,
    ) -> None:
        """`deliver` runs `deliver_local_batch` somewhere off the reactor and
        fires with its verdicts; by default in `threadpool`. `on_passed`
        gets the messages that still need the delivery manager."""
        self._spool = spool
        self._reactor = reactor
        self._deliver = deliver or (
            lambda ids: deferToThreadPool(reactor, threadpool, deliver_local_batch, spool, ids, hostname, mailbox_root)
        )
        self.on_passed = on_passed or (lambda queue_id, envelope: None)
        self._waiting: dict[str, None] = {}  # ordered set: arrival order is delivery order
        self._in_flight: list[str] = []
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
        """Start nothing new; fires once the batch in flight is done.  Queued mail stays on disk."""
        super().stopService()
        if self.enqueue in self._spool.on_commit:
            self._spool.on_commit.remove(self.enqueue)
        for call in self._retries.values():
            call.cancel()
        self._retries.clear()
        self._waiting.clear()
        return self.idle()

    def idle(self) -> Deferred[None]:
        """Fires when nothing is queued or in flight (retries waiting on a timer do not count)."""
        if not (self._waiting or self._in_flight):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def enqueue(self, queue_id: str, envelope: Envelope | None = None) -> None:
        """Deliver ``queue_id`` soon; a message already waiting or in flight is not doubled.

        A just-committed message (`envelope` known) with no local recipient
        goes straight on to the manager, without a trip to the worker."""
        if not self.running or queue_id in self._waiting or queue_id in self._in_flight:
            return
        if envelope is not None and not has_local_pending(envelope):
            self.on_passed(queue_id, envelope)
            return
        self._waiting[queue_id] = None
        self._next_batch()

    def _next_batch(self) -> None:
        if self._in_flight or not self._waiting or not self.running:
            self._tell_idle()
            return
        batch = list(itertools.islice(self._waiting, self.max_batch))
        for queue_id in batch:
            del self._waiting[queue_id]
        self._in_flight = batch
        d = self._deliver(batch)
        d.addCallbacks(self._batch_done, self._batch_failed)

    def _batch_done(self, verdicts: dict[str, str]) -> None:
        self._in_flight = []
        for queue_id, verdict in verdicts.items():
            if verdict == RETRY:
                self._schedule_retry(queue_id)
            elif verdict == PASSED:
                self.on_passed(queue_id, None)
            if verdict != RETRY:
                metrics.local_deliveries.inc()
        self._next_batch()

    def _batch_failed(self, failure: Failure) -> None:
        log.failure("local delivery batch failed", failure)
        self._batch_done(dict.fromkeys(self._in_flight, RETRY))

    def _tell_idle(self) -> None:
        if not (self._waiting or self._in_flight):
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def claim(self, queue_id: str) -> bool:
        """For operator surgery: False while the message is in a batch on disk;
        otherwise it is dropped from this runner (waiting, or its retry timer)."""
        if queue_id in self._in_flight:
            return False
        self._waiting.pop(queue_id, None)
        retry = self._retries.pop(queue_id, None)
        if retry is not None and retry.active():
            retry.cancel()
        return True

    def _schedule_retry(self, queue_id: str) -> None:
        if self.running and queue_id not in self._retries:
            self._retries[queue_id] = self._reactor.callLater(self.retry_delay, self._retry, queue_id)

    def _retry(self, queue_id: str) -> None:
        del self._retries[queue_id]
        self.enqueue(queue_id)


def deliver_local_batch(
    spool: Spool,
    queue_ids: list[str],
    hostname: str,
    mailbox_root: Path,
    known: Mapping[str, tuple[Envelope, bytes]] | None = None,
    give_up_after: float = 8 * 3600,
    now: Callable[[], float] = time.time,
) -> dict[str, str]:
    """Blocking: deliver every local recipient of these messages.

    Returns a verdict per ID: DONE (nothing left, removed, or no longer
    queued), RETRY (a local delivery failed) or PASSED (recipients with
    other routes, or failures still to bounce, remain for the manager).

    `known` holds the envelope and content of messages this process has
    just queued, which spares reading them back from the spool.

    Progress is saved only for a message that still has pending recipients,
    so a finished message leaves the queue without an envelope rewrite. A
    crash after the Maildir commit and before the queue update delivers that
    batch again (duplicates, never loss).
    """
    batch = MaildirBatch(hostname)
    verdicts = dict.fromkeys(queue_ids, DONE)
    staged: list[tuple[Envelope, list[tuple[int, int | Exception]]]] = []
    for queue_id in queue_ids:
        try:
            envelope, content = known[queue_id] if known and queue_id in known else (spool.load(queue_id), None)
        except FileNotFoundError:
            log.info("{queue_id}: no longer queued", queue_id=queue_id)
            continue
        except EnvelopeError:
            log.failure("{queue_id}: unreadable, left for the operator", queue_id=queue_id)
            continue
        if content is None:
            try:
                content = spool.content(queue_id)  # bytes, or the Path of a large message's file
            except FileNotFoundError:
                log.info("{queue_id}: no longer queued", queue_id=queue_id)
                continue
        slots: list[tuple[int, int | Exception]] = []
        for index in envelope.pending():
            recipient = envelope.recipients[index]
            if (recipient.route or {}).get("kind") != "local":
                continue
            try:
                mailbox = mailbox_path(mailbox_root, recipient)
                slots.append((index, batch.add(mailbox, content, _trace_headers(envelope, recipient))))
            except Exception as e:
                slots.append((index, e))
        staged.append((envelope, slots))
    results = batch.commit()
    passes: list[tuple[Envelope, bool, bool]] = []
    for envelope, slots in staged:
        failed = False
        for index, slot in slots:
            outcome = slot if isinstance(slot, Exception) else results[slot]
            if isinstance(outcome, Exception):
                address = envelope.recipients[index].address
                log.error("{queue_id}: delivery to {address} failed: {error}",
                          queue_id=envelope.queue_id, address=address, error=outcome)
                # A bad mailbox route is permanent; a file problem is retried
                # until give_up_after (E-Post's 4xx period), then bounced.
                if isinstance(outcome, ValueError):
                    envelope, _ = settle_recipient(envelope, index, f"550 5.3.0 maildir: {outcome}",
                                                   permanent=True, give_up_after=give_up_after, now=now)
                else:
                    envelope, retry = settle_recipient(envelope, index, f"451 4.3.0 maildir: {outcome}",
                                                       give_up_after=give_up_after, now=now)
                    failed = failed or retry
            else:
                envelope, _ = settle_recipient(envelope, index, "delivered to maildir", delivered=True,
                                               give_up_after=give_up_after, now=now)
        passes.append((envelope, bool(slots), failed))
    verdicts.update(record_passes(spool, passes))
    return verdicts


def settle_recipient(
    envelope: Envelope, index: int, reply: str, *, delivered: bool = False, permanent: bool = False,
    give_up_after: float, now: Callable[[], float],
) -> tuple[Envelope, bool]:
    """One local attempt's outcome for recipient `index`, shared by every local
    transport (Maildir, LMTP): delivered; failed when permanent or past
    `give_up_after` (the manager bounces it); else left pending. Returns the new
    envelope and whether the message must be retried."""
    attempts = envelope.recipients[index].attempts + 1
    if delivered:
        return envelope.with_recipient(index, state="delivered", attempts=attempts, last_reply=reply), False
    if permanent or now() - envelope.arrival >= give_up_after:
        return envelope.with_recipient(index, state="failed", attempts=attempts, last_reply=reply), False
    return envelope.with_recipient(index, attempts=attempts, last_reply=reply), True


def record_passes(spool: Spool, passes: list[tuple[Envelope, bool, bool]]) -> dict[str, str]:
    """Write what a local pass (Maildir, LMTP) did to these messages, in one
    transaction, and return each one's verdict (blocking).

    Each pass is (envelope, touched, failed). A finished message is removed;
    one with work left is updated, only if this pass changed it (`touched`).
    Delivery bookkeeping: no flush of its own (docs/queue.md). A write that
    fails makes the verdict RETRY."""
    changes: dict[str, Change] = {}
    passed: set[str] = set()
    for envelope, touched, _ in passes:
        if needs_manager(envelope):
            passed.add(envelope.queue_id)
        if not (envelope.pending() or envelope.queue_id in passed):
            changes[envelope.queue_id] = Change(envelope.queue_id, "incoming")
        elif touched:
            changes[envelope.queue_id] = Change(envelope.queue_id, "incoming", envelope)
    errors = dict(zip(changes, spool.store.apply(list(changes.values()), durable=False))) if changes else {}
    verdicts = {}
    for envelope, _, failed in passes:
        error = errors.get(envelope.queue_id)
        if error is not None:
            log.error("{queue_id}: cannot record delivery: {error}", queue_id=envelope.queue_id, error=error)
        verdicts[envelope.queue_id] = RETRY if failed or error else PASSED if envelope.queue_id in passed else DONE
    return verdicts


def mailbox_path(mailbox_root: Path, recipient: Recipient) -> Path:
    """``domain/user`` under the mailbox root; anything that could climb out of it is refused."""
    mailbox = str((recipient.route or {}).get("mailbox", ""))
    parts = mailbox.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad mailbox {mailbox!r} for {recipient.address}")
    return Path(mailbox_root).joinpath(*parts)


def _trace_headers(envelope: Envelope, recipient: Recipient) -> bytes:
    """The headers a local delivery adds, as Postfix's local(8) does."""
    text = f"Return-Path: <{envelope.sender}>\nDelivered-To: {recipient.address}\n"
    return text.encode("utf-8", "surrogateescape")
