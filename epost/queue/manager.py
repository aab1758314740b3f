"""The delivery manager: relays queued mail by SMTP and keeps the retry books (SPEC §4, §6).

It joins the parts: the `Scheduler` decides which (message, destination)
job runs when; the `Courier` makes one attempt; `apply_attempt` (pure)
says what the attempt means; this module records it: the envelope (moved
from incoming to deferred on its first deferral), senderlog and faillog
lines, Domain.mri files and DSN bounces.

It is the only writer of a message's envelope once the local runner has
passed the message on. Its writes never run on the reactor: recording an
attempt goes to the spool worker (`record`), the rest to the thread pool,
serialised per message by a DeferredLock. Recording an attempt is delivery bookkeeping,
written without a flush of its own (`durable=False`): a power cut may undo
it, and the message is then tried again (a duplicate, never a loss); the
next durable commit of anyone makes it durable too (docs/queue.md).
In memory it keeps the envelopes of messages with a job running or just
arrived, and for the rest of the queue only the scheduler's small entries:
a restart with a large deferred queue costs little memory.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from epost.config import RetryConfig
from epost.delivery.bounce import FailedRecipient, should_bounce
from epost.delivery.courier import Attempt, CourierError
from epost.delivery.smtp_client import Outcome
from epost import metrics
from epost.logs import LineLog, faillog_line, senderlog_line
from epost.queue.bounces import original_headers
from epost.queue.domain_books import DomainBooks
from epost.queue.domain_state import DomainState, DomainStateStore
from epost.store.envelope import Envelope, relay_groups
from epost.queue.destinations import Destinations, replies_of
from epost.queue.outcomes import (
    Applied,
    apply_attempt,
    apply_greylist,
    apply_throttle,
    greylisted_only,
    finished,
    has_local_pending,
    next_due,
    reply_text,
    status_code,
    unreported_failures,
)
from epost.queue import surgery
from epost.queue.receivers import Settings as ReceiverSettings
from epost.queue.scheduler import Job, Scheduler
from epost.store.database import DISK_FULL_ERRNOS, Change
from epost.store.spool import Spool, SpooledContent
from epost.routing.resolver import Route
from epost.address import AddressError, destination_of, parse_mailbox

log = Logger()

LOAD_BATCH = 500  # envelopes read per thread hop when the deferred queue is loaded at start
LOAD_RETRY = 5.0  # seconds before a failed load of the deferred queue resumes; doubled each failure
LOAD_RETRY_MAX = 60.0


def _next_batch(envelopes) -> tuple[list[Envelope], Exception | None]:
    """Runs in a thread: up to LOAD_BATCH envelopes, and the error that cut the batch short
    (a failed page), so what was read is scheduled before the load resumes past it."""
    batch: list[Envelope] = []
    try:
        for envelope in itertools.islice(envelopes, LOAD_BATCH):
            batch.append(envelope)
    except Exception as error:
        return batch, error
    return batch, None


@dataclass
class _Message:
    envelope: Envelope
    queue: str  # incoming or deferred
    lock: defer.DeferredLock = field(default_factory=defer.DeferredLock)
    refs: int = 0  # jobs running, waiting in the new-mail lane or to save after a full disk: kept in memory
    new_jobs: set[str] = field(default_factory=set)  # destinations whose waiting job holds a ref
    unsaved: bool = False  # the envelope in memory is newer than the file (a full disk)
    bouncing: set[int] = field(default_factory=set)  # failed recipients whose bounce is being queued


class DeliveryManager(Service):
    """Owns every relayed message from the moment the local runner passes it on."""

    error_retry = 60.0

    def __init__(
        self,
        spool: Spool,
        reactor: Any,
        pool: Any,
        courier: Any,
        bounces: Any,
        route_final: Callable[[Any], Route],
        hostname: str,
        retry: RetryConfig,
        max_connections: int = 100,
        max_per_destination: int = 10,
        new_mail_share: float = 0.5,
        handle_signals: bool = False,
        delay_warning: float = 0,
        receivers: ReceiverSettings | None = None,
        record: Callable[[Change], defer.Deferred] | None = None,
    ) -> None:
        self.spool = spool
        self.record = record or spool.record  # the daemon passes the spool worker's (service.py)
        self.reactor = reactor
        self.pool = pool
        self.courier = courier
        self.bounces = bounces
        self.route_final = route_final
        self.hostname = hostname
        self.retry = retry
        self.handle_signals = handle_signals
        self.delay_warning = delay_warning  # seconds; 0: never
        # Receiver-aware delivery (issue 14); off: E-Post's behaviour alone.
        self.destinations: Destinations | None = None
        if receivers is not None and receivers.enabled:
            self.destinations = Destinations(reactor, receivers, max_per_destination)
            self.destinations.retry_interval = retry.interval
        self.scheduler = Scheduler(
            reactor, self._run, max_connections, max_per_destination, new_mail_share,
            suspend=lambda job: self._run(job, suspended=True), probe_gap=retry.interval,
            gate=self.destinations,
        )
        if self.destinations is not None:
            self.destinations.wake = self.scheduler.wake
            self.destinations.retime = self.scheduler.retime
            self.destinations.regroup = self.scheduler.regroup
            self.destinations.parked = self.scheduler.parked
        self.senderlog = LineLog(spool.root / "log" / "senderlog")
        self.faillog = LineLog(spool.root / "log" / "faillog")
        self.domains = DomainBooks(DomainStateStore(spool.root / "domains"), reactor, pool)
        if self.destinations is not None:
            self.domains.extra_fields = self.destinations.fields
        self._messages: dict[str, _Message] = {}
        self._jobs_running: dict[Job, defer.Deferred] = {}
        self.loaded: defer.Deferred[None] = defer.Deferred()  # the deferred queue is scheduled
        self._loaded_up_to = ""  # the last deferred ID the start-up load scheduled: a retry resumes past it
        self._load_retry_delay = LOAD_RETRY
        self._load_retry: Any = None  # the pending IDelayedCall of a retry
        self.local_enqueue: Callable[[str], None] | None = None  # the local runner, for released mail
        self.local_claim: Callable[[str], bool] | None = None  # False while the local runner is delivering it

    # -- lifecycle -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.domains.read()
        if self.destinations is not None:
            for state in self.domains.states():
                self.destinations.restore(state.domain, dict(state.extra))
        if self.handle_signals:
            signal.signal(signal.SIGUSR2, lambda *_: self.reactor.callFromThread(self.flush))
        # After start-up: the local runner's recover() sweeps crash debris first.
        self._load_retry = self.reactor.callLater(0, self._start_load)

    stop_grace = 10.0  # seconds given to attempts in progress at shutdown

    def stopService(self) -> defer.Deferred:
        """Starts nothing new; attempts in progress get `stop_grace` seconds to
        finish and be recorded. One cut short leaves its message as it was
        queued: it is tried again after the restart (at worst a duplicate)."""
        super().stopService()
        if self._load_retry is not None and self._load_retry.active():
            self._load_retry.cancel()
        self.scheduler.stop()
        self.courier.close_idle()
        running = list(self._jobs_running.values())
        d = defer.DeferredList(running, consumeErrors=True) if running else defer.succeed(None)
        d.addTimeout(self.stop_grace, self.reactor)

        def closed(result):
            if isinstance(result, Failure):
                log.warn("stopping with {n} deliveries still in progress", n=len(self._jobs_running))
            self.senderlog.close()
            self.faillog.close()

        return d.addBoth(closed)

    def flush(self) -> None:
        """Everything waiting is due now (SIGUSR2, `epost flush`)."""
        log.info("flush: every deferred message is due now")
        self.scheduler.flush()

    # -- input -----------------------------------------------------------

    def enqueue(self, queue_id: str, envelope: Envelope | None = None) -> None:
        """A message the local runner passed on: relay it now (the runner's `on_passed`)."""
        if not self.running:
            return
        if envelope is not None:
            self._accept(queue_id, envelope, "incoming")
            return
        d = deferToThreadPool(self.reactor, self.pool, self.spool.load, queue_id)
        d.addCallbacks(lambda loaded: self._accept(queue_id, loaded, "incoming"), self._unreadable, errbackArgs=(queue_id,))

    def _accept(self, queue_id: str, envelope: Envelope, queue: str) -> None:
        if queue_id in self._messages:
            return  # already in hand
        message = self._messages[queue_id] = _Message(envelope, queue)
        groups = relay_groups(envelope)
        for destination in groups:
            message.refs += 1
            message.new_jobs.add(destination)
            try:
                self.scheduler.add_new(Job(queue_id, destination))
            except ValueError:  # already scheduled: it will find the envelope on disk
                message.refs -= 1
                message.new_jobs.discard(destination)
        if not groups:
            self._settle_alone(queue_id)
        elif message.refs == 0:
            self._messages.pop(queue_id, None)

    def _unreadable(self, failure, queue_id: str) -> None:
        if failure.check(FileNotFoundError):
            return
        log.failure("{queue_id}: cannot read its envelope; left for the operator", failure, queue_id=queue_id)

    # -- start-up: the deferred queue -------------------------------------

    def _start_load(self) -> None:
        self._load_retry = None
        if self.running:
            self._load_deferred().addBoth(self._loaded)

    @defer.inlineCallbacks
    def _load_deferred(self):
        """Schedule every deferred message at its saved time, in batches off the reactor.

        One query (`load_many`, read a page at a time) instead of one read per
        message; memory holds one batch, and the reactor serves SMTP between them.
        Resumes past the last ID a previous, failed load scheduled."""
        envelopes = self.spool.load_many("deferred", after=self._loaded_up_to)  # a generator: no query yet
        while self.running:
            batch, error = yield deferToThreadPool(self.reactor, self.pool, _next_batch, envelopes)
            if batch:
                self._schedule_loaded(batch)
                self._loaded_up_to = batch[-1].queue_id
            if error is not None:
                raise error
            if not batch:
                return

    def _schedule_loaded(self, envelopes: list[Envelope]) -> None:
        now = self.reactor.seconds()
        for envelope in envelopes:
            if envelope.queue_id in self._messages:
                # In hand already (new mail deferred while the load ran, read
                # again by a later page): its jobs are scheduled, its envelope is newer.
                continue
            groups = relay_groups(envelope)
            for destination in groups:
                try:
                    self.scheduler.add_deferred(Job(envelope.queue_id, destination), next_due(envelope, destination, now))
                except ValueError:
                    continue
                self.domains.waiting(destination, envelope.queue_id)
            if not groups:
                # Crashed between the last attempt and its bookkeeping: finish it now.
                self._messages[envelope.queue_id] = _Message(envelope, "deferred")
                self._settle_alone(envelope.queue_id)

    def _loaded(self, result) -> None:
        if isinstance(result, Failure):
            # Domain.mri files stay as they are (save_all would drop those of
            # destinations not read yet): the load resumes where it stopped.
            if self.running:
                delay = self._load_retry_delay
                self._load_retry_delay = min(delay * 2, LOAD_RETRY_MAX)
                log.error("loading the deferred queue failed after {up_to} ({error}); trying again in {delay:.0f} s",
                          up_to=self._loaded_up_to or "the start", error=result.value, delay=delay)
                self._load_retry = self.reactor.callLater(delay, self._start_load)
            return
        if not self.running:
            return  # stopped half-way: what was not read is not waiting for nothing
        # Domain.mri files are brought in line with what is actually waiting.
        self.domains.save_all()
        if not self.loaded.called:
            self.loaded.callback(None)

    # -- one job ---------------------------------------------------------

    def _run(self, job: Job, suspended: bool = False) -> defer.Deferred:
        d = defer.ensureDeferred(self._attempt(job, suspended))
        self._jobs_running[job] = d

        def finished(verdict):
            self._jobs_running.pop(job, None)
            return verdict

        return d.addBoth(finished)

    async def _attempt(self, job: Job, suspended: bool) -> Any:
        queue_id, destination = job
        message = self._messages.get(queue_id)
        if message is not None and destination in message.new_jobs:
            message.new_jobs.discard(destination)  # its ref was taken when it was queued
        else:
            message = message or await self._load(queue_id)
            if message is None:
                return "done"
            message.refs += 1
        try:
            return await self._deliver(job, message, suspended)
        except CourierError as error:  # no attempt was made: nothing to record, the destination is not to blame
            log.warn("{queue_id}: no attempt for {destination}: {error}; trying again later",
                     queue_id=queue_id, destination=destination, error=error)
            return ("retry_error", self.reactor.seconds() + self.error_retry)
        except OSError as error:
            if error.errno not in DISK_FULL_ERRNOS:
                log.failure("{queue_id}: delivery to {destination} failed", queue_id=queue_id, destination=destination)
            else:  # expected on a bad day: one line, and the files are brought in line later
                log.warn(
                    "{queue_id}: cannot record the attempt for {destination} ({error}); trying again in {retry:.0f} s",
                    queue_id=queue_id, destination=destination, error=error, retry=self.error_retry,
                )
                # What the attempt settled stays in memory until a save succeeds, so
                # the retry neither sends an accepted recipient again nor bounces twice.
                message.unsaved = True
                if destination not in message.new_jobs:
                    message.new_jobs.add(destination)  # the retry's _attempt takes this ref
                    message.refs += 1
            return ("retry_error", self.reactor.seconds() + self.error_retry)
        except Exception:  # a bug: log it and retry later
            log.failure("{queue_id}: delivery to {destination} failed", queue_id=queue_id, destination=destination)
            return ("retry_error", self.reactor.seconds() + self.error_retry)
        finally:
            message.refs -= 1
            if message.refs <= 0 and self._messages.get(queue_id) is message:
                del self._messages[queue_id]

    async def _load(self, queue_id: str) -> _Message | None:
        for queue in ("deferred", "incoming"):
            try:
                envelope = await deferToThreadPool(self.reactor, self.pool, self.spool.load, queue_id, queue)
            except FileNotFoundError:
                continue
            message = self._messages.get(queue_id)
            if message is None:
                message = self._messages[queue_id] = _Message(envelope, queue)
            return message
        log.info("{queue_id}: no longer queued", queue_id=queue_id)
        return None

    async def _deliver(self, job: Job, message: _Message, suspended: bool = False) -> Any:
        """One attempt; `suspended`: the destination is dead, so the attempt is
        recorded as a deferral without a connection (Postfix: "delivery
        temporarily suspended") and counts toward period_noanswer."""
        queue_id, destination = job
        indexes = relay_groups(message.envelope).get(destination, [])
        if not indexes:
            if message.unsaved:  # settled before a full disk stopped its save: save it now
                await self._settle(queue_id)
            return "done"
        envelope = message.envelope
        recipients = [envelope.recipients[i].address for i in indexes]
        if suspended:
            state = self.domains.state(destination)
            reason = f"delivery temporarily suspended: {state.err_text if state else 'no answer'}"
            attempt = Attempt({r: Outcome(None, reason, "connect") for r in recipients}, None, False)
        else:
            route = self._current_route(envelope.recipients[indexes[0]])
            # The DKIM signature made at commit: over SMTP only, the same bytes every attempt.
            content = SpooledContent(self.spool, queue_id, envelope.dkim.encode("ascii"))
            try:
                per_connection = self.destinations and self.destinations.messages_per_connection(destination)
                attempt = await self.courier.deliver(
                    route, envelope.sender, recipients, content, envelope.size + len(content.prefix),
                    envelope.body == "8BITMIME",
                    **({"per_connection": per_connection} if per_connection else {}),
                )
            finally:
                content.close()
        now = self.reactor.seconds()
        outcomes, throttled, greylisted = attempt.outcomes, {}, None
        if self.destinations is not None and not suspended:
            self.destinations.saw_hosts(destination, attempt.mx)
            replies = replies_of(message.envelope, destination, indexes, outcomes, self.destinations.settings.rules, now)
            judged = self.destinations.judge(destination, replies, now)
            throttled = {a: o for a, o in outcomes.items() if a in judged.throttled}
            outcomes = {a: o for a, o in outcomes.items() if a not in judged.throttled}
            greylisted = judged.greylisted
        episode = message.envelope.retries.get(destination)
        applied = apply_attempt(message.envelope, destination, outcomes, attempt.host, now, self.retry)
        if greylisted and greylisted_only(applied, greylisted):
            first = float((applied.envelope.retries.get(destination) or {}).get("first_failure", now))
            others = len(self.scheduler.jobs_for(destination)) > 1 or self.scheduler.parked(
                self.destinations.group(destination)) > 0
            when = self.destinations.greylist_retry(job, first, now, applied.verdict[1], self.retry.interval, others)
            applied = apply_greylist(applied, destination, when)
        elif self.destinations is not None and not suspended:
            self.destinations.not_greylisted(job)
        applied = apply_throttle(applied, destination, throttled, now, episode)
        message.envelope = applied.envelope
        self._log_attempt(message.envelope, applied, attempt, now)
        self.domains.attempted(destination, queue_id, applied, attempt, now, suspended, frozenset(throttled))
        if self._warning_due(message.envelope, now):
            await self._warn_delayed(message, [r for r in applied.results if r.status == "deferred"], attempt.host)
        await self._settle(queue_id, remote=attempt.host)
        return applied.verdict

    def _current_route(self, recipient) -> Route:
        """The route by today's tables (a gateway.dat edit applies to queued mail);
        the stored one when the address now routes elsewhere than to SMTP."""
        stored = Route.from_dict(recipient.route)
        try:
            route = self.route_final(parse_mailbox(recipient.address))
        except (AddressError, ValueError):
            return stored
        return route if route.kind == "relay" else stored

    # -- recording ---------------------------------------------------------

    def _log_attempt(self, envelope: Envelope, applied: Applied, attempt: Attempt, now: float) -> None:
        if attempt.host is not None:
            metrics.outbound_sessions.labels("yes" if attempt.tls else "no").inc()
        destination = None
        for result in applied.results:
            outcome = result.outcome
            destination = destination or destination_of(result.address)
            metrics.deliveries.labels(result.status, destination).inc()
            if result.status == "sent":
                metrics.delivery_latency.observe(max(0.0, now - envelope.arrival))
            line = senderlog_line(
                now,
                envelope.queue_id,
                envelope.sender,
                result.address,
                attempt.host or "none",
                now - envelope.arrival,
                result.attempt,
                result.status,
                status_code(outcome),
                reply_text(outcome),
            )
            self._write_log(self.senderlog, "senderlog", line)
            if result.status == "bounced":
                reply = reply_text(outcome) if outcome.code is not None else None
                line = faillog_line(now, envelope.queue_id, self.hostname, envelope.sender, result.address, reply)
                self._write_log(self.faillog, "faillog", line)

    @staticmethod
    def _write_log(target: LineLog, name: str, line: str) -> None:
        """A log line that cannot be written (a full disk) goes into our own log
        instead, in one warning line; the attempt is recorded all the same."""
        try:
            target.write(line)
        except OSError as error:
            log.warn("cannot write {name} ({error}); the line: {line}", name=name, error=error, line=line)

    def _settle_alone(self, queue_id: str) -> None:
        """Settle a message that has no delivery job, then let it go from memory."""

        def forget(result):
            message = self._messages.get(queue_id)
            if message is not None and message.refs <= 0:
                del self._messages[queue_id]
            return result

        defer.ensureDeferred(self._settle(queue_id)).addBoth(forget).addErrback(self._log_failure, queue_id)

    async def _settle(self, queue_id: str, remote: str | None = None) -> None:
        """Bounce what failed, then bring the queue in line: remove, move to deferred or update."""
        message = self._messages.get(queue_id)
        if message is None:
            return
        failed = [i for i in unreported_failures(message.envelope) if i not in message.bouncing]
        if failed:
            message.bouncing.update(failed)  # before any wait: another job's settle must not bounce them too
            try:
                queued = await self._bounce(message, failed, remote)
            finally:
                message.bouncing.difference_update(failed)
            if not queued:
                self.reactor.callLater(self.error_retry, self._resettle, queue_id)
        await message.lock.run(self._save, message)

    async def _save(self, message: _Message) -> None:
        """Write the newest envelope, holding the message's lock: grouped with every
        other message's, never on the reactor (a write may wait for the store's lock
        while a commit is being flushed), by the spool worker in the daemon
        (`SpoolWorkerService.record`), else in the pool (`Spool.record`).
        Delivery bookkeeping: durable=False (see the module's docstring)."""
        envelope = message.envelope
        if finished(envelope):
            change = Change(envelope.queue_id, message.queue)
        elif message.queue == "incoming" and envelope.retries:
            change = Change(envelope.queue_id, "incoming", envelope, "deferred")
        else:
            change = Change(envelope.queue_id, message.queue, envelope)
        await self.record(change)
        if change.target:
            message.queue = change.target
        if message.envelope is envelope:
            message.unsaved = False

    async def _bounce(self, message: _Message, indexes: list[int], remote: str | None) -> bool:
        """Queue the DSN and mark the recipients; False when it could not be queued for
        now (spool trouble): they stay unmarked and are tried again later."""
        envelope = message.envelope
        if should_bounce(envelope.sender):
            failed = [self._failed_recipient(envelope.recipients[i], remote) for i in indexes]
            try:
                headers = await message.lock.run(deferToThreadPool, self.reactor, self.pool, self._headers, message)
                bounce_id = await self.bounces.send(envelope, headers, failed)
            except OSError as error:  # SpoolError included: a full disk passes
                log.emit(
                    LogLevel.warn if error.errno in DISK_FULL_ERRNOS else LogLevel.error,
                    "{queue_id}: cannot queue the bounce to <{sender}> now: {error}; trying again later",
                    queue_id=envelope.queue_id, sender=envelope.sender, error=error,
                )
                return False
            except Exception as error:  # no route back to the sender: nobody to tell
                log.error(
                    "{queue_id}: cannot queue the bounce to <{sender}>: {error}; it is dropped",
                    queue_id=envelope.queue_id, sender=envelope.sender, error=error,
                )
            else:
                log.info(
                    "{queue_id}: bounce {bounce_id} queued to <{sender}>",
                    queue_id=envelope.queue_id, bounce_id=bounce_id, sender=envelope.sender,
                )
        # Other recipients may have changed while we waited: mark only ours.
        current = message.envelope
        for i in indexes:
            current = current.with_recipient(i, dsn_sent=True)
        message.envelope = current
        return True

    def _resettle(self, queue_id: str) -> None:
        """Another go at a bounce that could not be queued."""
        if not self.running:
            return
        if queue_id in self._messages:
            self._settle_alone(queue_id)
            return
        d = defer.ensureDeferred(self._load(queue_id))
        d.addCallback(lambda message: message is not None and self._settle_alone(queue_id))
        d.addErrback(self._log_failure, queue_id)

    def _warning_due(self, envelope: Envelope, now: float) -> bool:
        return (
            self.delay_warning > 0
            and not envelope.delay_warned
            and bool(envelope.pending())
            and now - envelope.arrival >= self.delay_warning
            and should_bounce(envelope.sender)
        )

    async def _warn_delayed(self, message: _Message, deferred: list, remote: str | None) -> None:
        """The "still trying" DSN (Action: delayed), once per message (Postfix's delay_warning_time)."""
        if not deferred:
            return
        message.envelope = replace(message.envelope, delay_warned=True)  # once, even if queueing it fails
        envelope = message.envelope
        delayed = [
            FailedRecipient(r.address, status_code(r.outcome), action="delayed", remote_mta=remote,
                            diagnostic=reply_text(r.outcome))
            for r in deferred
        ]
        try:
            headers = await message.lock.run(deferToThreadPool, self.reactor, self.pool, self._headers, message)
            warning_id = await self.bounces.send(envelope, headers, delayed)
        except Exception as error:
            log.error("{queue_id}: cannot queue the delay warning: {error}", queue_id=envelope.queue_id, error=error)
        else:
            log.info("{queue_id}: delay warning {warning_id} queued to <{sender}>",
                     queue_id=envelope.queue_id, warning_id=warning_id, sender=envelope.sender)

    @staticmethod
    def _failed_recipient(recipient, remote: str | None) -> FailedRecipient:
        text = recipient.last_reply
        code = int(text[:3]) if text[:3].isdigit() else None
        outcome = Outcome(code, text[4:] if code is not None else text, "")
        status = status_code(outcome)
        if status.startswith("2"):
            status = "5.0.0"
        return FailedRecipient(recipient.address, status, remote_mta=remote, diagnostic=text or None)

    def _headers(self, message: _Message) -> bytes:
        content = self.spool.open_content(message.envelope.queue_id)
        try:
            return original_headers(content.read(64 * 1024, 0))
        finally:
            content.close()

    # -- Domain.mri ----------------------------------------------------------

    @staticmethod
    def _log_failure(failure, about: str) -> None:
        log.failure("{about}: bookkeeping failed", failure, about=about)

    # -- operator actions: epost flush / hold / release / delete / reroute ---

    def flush_some(self, ids: Sequence[str] = (), domain: str | None = None) -> OperationResult:
        """Make the chosen messages (or, with neither, everything) due now."""
        if not ids and domain is None:
            self.flush()
            return OperationResult(["*"], [])
        wanted = set(ids)
        picked: set[str] = set()

        def match(job: Job) -> bool:
            if job.queue_id in wanted or job.destination == domain:
                picked.add(job.queue_id)
                return True
            return False

        self.scheduler.flush(match)
        errors = [f"{queue_id}: not waiting for a retry" for queue_id in sorted(wanted - picked)]
        return OperationResult(sorted(picked), errors)

    async def hold(self, ids: Sequence[str] = (), domain: str | None = None) -> OperationResult:
        return await self._surgery(self._select(ids, domain), self._hold_one)

    async def delete(self, ids: Sequence[str] = (), domain: str | None = None) -> OperationResult:
        return await self._surgery(self._select(ids, domain), self._delete_one)

    async def reroute(self, ids: Sequence[str] = (), domain: str | None = None) -> OperationResult:
        return await self._surgery(self._select(ids, domain), self._reroute_one)

    async def release(self, ids: Sequence[str] = (), domain: str | None = None) -> OperationResult:
        if domain is not None:
            held = await deferToThreadPool(self.reactor, self.pool, surgery.waiting_for, self.spool, domain, ("hold",))
            ids = [*ids, *held]
        return await self._each(list(dict.fromkeys(ids)), self._release_one)

    def _select(self, ids: Sequence[str], domain: str | None) -> list[str]:
        chosen = list(ids)
        if domain is not None:
            chosen += sorted({job.queue_id for job in self.scheduler.jobs_for(domain)})
        return list(dict.fromkeys(chosen))

    async def _each(self, ids: list[str], action) -> OperationResult:
        done, errors = [], []
        for queue_id in ids:
            try:
                note = await action(queue_id)
            except LookupError as error:
                errors.append(str(error).strip("'\""))
            except Exception as error:
                log.failure("{queue_id}: operator action failed", queue_id=queue_id)
                errors.append(f"{queue_id}: {error}")
            else:
                done.append(queue_id)
                errors.extend(note or [])
        return OperationResult(done, errors)

    async def _surgery(self, ids: list[str], action) -> OperationResult:
        taken, refused = self._take_out(ids)
        result = await self._each(list(taken), lambda queue_id: action(queue_id, taken[queue_id]))
        return OperationResult(result.done, refused + result.errors)

    def _take_out(self, ids: list[str]) -> tuple[dict[str, _Message], list[str]]:
        """Unschedule the messages' jobs, all in one pass; refuses those being delivered."""
        taken: dict[str, _Message] = {}
        refused, jobs = [], []
        for queue_id in ids:
            mine = self.scheduler.jobs_of(queue_id)
            busy = any(job in self._jobs_running for job in mine)
            if busy or (self.local_claim is not None and not self.local_claim(queue_id)):
                refused.append(f"{queue_id}: being delivered right now; try again in a moment")
                continue
            jobs.extend(mine)
            taken[queue_id] = self._messages.pop(queue_id, None) or _Message(Envelope(queue_id, "", (), 0.0, 0), "")
        destinations = set()
        for job in self.scheduler.forget_many(jobs):
            self.domains.not_waiting(job.destination, job.queue_id, save=False)
            destinations.add(job.destination)
        for destination in destinations:
            self.domains.save(destination)
        return taken, refused

    async def _hold_one(self, queue_id: str, message: _Message) -> None:
        await message.lock.run(deferToThreadPool, self.reactor, self.pool, surgery.hold, self.spool, queue_id)
        log.info("{queue_id}: put on hold by the operator", queue_id=queue_id)

    async def _delete_one(self, queue_id: str, message: _Message) -> None:
        await message.lock.run(deferToThreadPool, self.reactor, self.pool, surgery.delete, self.spool, queue_id)
        log.info("{queue_id}: deleted by the operator", queue_id=queue_id)

    async def _release_one(self, queue_id: str) -> None:
        envelope, target = await deferToThreadPool(
            self.reactor, self.pool, surgery.release, self.spool, queue_id, self.reactor.seconds()
        )
        log.info("{queue_id}: released by the operator", queue_id=queue_id)
        if target == "incoming":
            if self.local_enqueue is not None:
                self.local_enqueue(queue_id)
            return
        self._schedule_deferred(envelope, self.reactor.seconds())
        self.scheduler.flush(lambda job: job.queue_id == queue_id)  # a dead destination may be probed now

    async def _reroute_one(self, queue_id: str, message: _Message) -> list[str]:
        queue, envelope, problems = await message.lock.run(
            deferToThreadPool, self.reactor, self.pool, surgery.reroute, self.spool, queue_id, self.route_final
        )
        if queue == "deferred":
            self._schedule_deferred(envelope, self.reactor.seconds())
        elif queue == "incoming" and has_local_pending(envelope):
            if self.local_enqueue is not None:
                self.local_enqueue(queue_id)  # the local runner first, as for new mail
        elif queue == "incoming":
            self._accept(queue_id, envelope, "incoming")
        return problems

    def _schedule_deferred(self, envelope: Envelope, due: float) -> None:
        for destination in relay_groups(envelope):
            job = Job(envelope.queue_id, destination)
            if not self.scheduler.knows(job):
                self.scheduler.add_deferred(job, due)
                self.domains.waiting(destination, envelope.queue_id)
                self.domains.save(destination)

    # -- for tests and the admin pages ---------------------------------------

    def domain_state(self, destination: str) -> DomainState | None:
        return self.domains.state(destination)

    def domain_states(self) -> list[DomainState]:
        return self.domains.states()


@dataclass(frozen=True)
class OperationResult:
    """What an operator action did: the IDs it handled and one line per problem."""

    done: list[str]
    errors: list[str]

