"""The IReceiver the listeners use: recipient policy in, spool out."""

from __future__ import annotations

import functools
from email.utils import format_datetime
from datetime import datetime, timezone
from typing import Callable

from twisted.logger import Logger
from zope.interface import implementer

from epost import metrics
from epost.store.envelope import Envelope, Recipient
from epost.store.database import SpoolError
from epost.store.spool import SpoolStopping
from epost.address import Address
from epost.smtp.authresults import ResultsFilter, authentication_results
from epost.reply import Reply
from epost.smtp.interfaces import IMessageWriter, IReceiver, Rejected, Session
from epost.smtp.policy import RecipientPolicy, client_address

log = Logger()

# Bytes that all messages waiting for their Authentication-Results checks may
# hold in memory together (a DKIM verifier needs the whole message), counted
# from the first byte held until the message is written to the spool and its
# check's thread job has ended (a late job still has the message). A message
# that does not fit is streamed to the spool as usual, unchecked: its header
# says `none` and why, and forged headers with our name are removed all the same.
HOLD_LIMIT = 64 * 1024 * 1024


class HoldBudget:
    """The bytes held for checks, shared by every session of the daemon."""

    def __init__(self, limit: int = HOLD_LIMIT):
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


def received_header(session: Session, hostname: str, queue_id: str, recipients: list[Address], when: float) -> bytes:
    """RFC 5321 §4.4 trace header; the protocol name follows RFC 3848."""
    protocol = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        protocol += "S"
    if session.user:
        protocol += "A"
    lines = [f"Received: from {session.client_name or 'unknown'} ([{session.client_ip}])"]
    if session.tls:
        lines.append(f"(using {session.tls})")
    if session.user:
        lines.append(f"(authenticated as {session.user})")
    lines.append(f"by {hostname} (epost) with {protocol} id {queue_id}")
    if len(recipients) == 1:
        lines.append(f"for <{recipients[0]}>")
    lines[-1] += ";"
    lines.append(_received_date(int(when)))
    return "\r\n\t".join(lines).encode("utf-8", "replace") + b"\r\n"


@functools.lru_cache(maxsize=4)  # messages come in bursts within the same second
def _received_date(seconds: int) -> str:
    return format_datetime(datetime.fromtimestamp(seconds, timezone.utc))


def envelope_recipients(accepted: list[tuple[Address, list[dict]]]) -> tuple[Recipient, ...]:
    """One envelope recipient per final address (after alias expansion),
    first occurrence kept; a final the routers refused is recorded as
    failed with its reply, for the bounce."""
    seen: dict[str, Recipient] = {}
    for _, finals in accepted:
        for final in finals:
            route = final["route"]
            if final["address"] in seen:
                continue
            if route["kind"] == "reject":
                reply = route["reply"]
                last = f"{reply['code']} {reply['enhanced']} {reply['text']}"
                seen[final["address"]] = Recipient(final["address"], route=route, state="failed", last_reply=last)
            else:
                seen[final["address"]] = Recipient(final["address"], route=route)
    return tuple(seen.values())


def _client_text(session: Session) -> str:
    return f"{session.client_name or 'unknown'} [{session.client_ip}]"


@implementer(IMessageWriter)
class SpoolMessage:
    """One message on its way into the spool; knows how to build its envelope."""

    def __init__(self, writer, session: Session, sender: Address | None, recipients, params: dict, now: Callable[[], float],
                 checker=None, hostname: str = "", hold: HoldBudget | None = None):
        """With `checker` (a PendingCheck: SPF under way) the content is held
        (within `hold`) until the end of DATA, checked, and written behind an
        Authentication-Results header."""
        self._writer = writer
        self._session = session
        self._sender = sender
        self._recipients = recipients
        self._params = params
        self._now = now
        self._checker = checker
        self._hostname = hostname
        self._hold = hold if hold is not None else HoldBudget()
        self._held: list[bytes] | None = [] if checker is not None else None
        self._held_size = 0
        # RFC 8601 §5 on every message, checked or not, from any client: fields
        # claiming our name go as the data arrives (cheap: the header section only).
        self._filter = ResultsFilter(hostname)
        self.queue_id = writer.queue_id
        self.trusted = False  # set by the receiver: authenticated or relay_networks (DKIM signing)

    def write(self, data: bytes) -> None:
        data = self._filter.feed(data)
        if self._held is not None:
            if self._hold.take(len(data)):
                self._held.append(data)
                self._held_size += len(data)
                return
            self._stream_unchecked()
        self._writer.write(data)

    def _stream_unchecked(self) -> None:
        """Memory for held messages is spent: this one goes on to the spool now, unchecked."""
        held, self._held = b"".join(self._held), None
        self._release()
        self._writer.write(authentication_results(self._hostname, [], why_none="not checked: too much mail waiting for its checks"))
        self._writer.write(held)

    def _release(self) -> None:
        self._hold.give(self._held_size)
        self._held_size = 0

    def abort(self) -> None:
        self._held = None
        self._release()
        self._writer.abort()

    def registerProducer(self, producer, streaming: bool) -> None:
        self._writer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._writer.unregisterProducer()

    def commit(self):
        rest = self._filter.flush()
        if self._held is None:
            self._writer.write(rest)
            return self._commit()
        self._held.append(rest)
        content, self._held = b"".join(self._held), None
        # The held bytes are given back when both are done with the message:
        # this side (written to the spool) and the check's thread job.
        size, self._held_size = self._held_size, 0
        owners = [2]

        def let_go(result=None):
            owners[0] -= 1
            if not owners[0]:
                self._hold.give(size)
            return result

        d = self._checker.finish(content, let_go)
        d.addCallback(self._write_checked, content)
        d.addBoth(let_go)
        return d.addCallback(lambda _: self._commit())

    def _write_checked(self, results, content: bytes) -> None:
        """RFC 8601 §5: our header first (after Received:); the fields claiming our name are already gone."""
        try:
            header = authentication_results(self._hostname, results)
        except Exception:
            log.failure("building Authentication-Results failed for {queue_id}", queue_id=self.queue_id)
            header = b""
        self._writer.write(header)
        self._writer.write(content)

    def _commit(self):
        envelope = Envelope(
            queue_id=self.queue_id,
            sender=str(self._sender) if self._sender else "",
            recipients=envelope_recipients(self._recipients),
            arrival=self._now(),
            size=self._writer.size,
            client=_client_text(self._session),
            listener=self._session.listener,
            auth=self._session.user,
            body=(self._params.get("BODY") or "7BIT").upper(),
            trusted=self.trusted,
        )
        d = self._writer.commit(envelope).addErrback(self._storage_failed)
        return d.addCallback(self._count, self._session)

    @staticmethod
    def _count(queue_id, session: Session):
        """After the commit: nothing here may turn a stored message into a 4xx."""
        try:
            metrics.received.labels(session.listener, "yes" if session.tls else "no").inc()
        except Exception:
            log.failure("counting a received message failed")
        return queue_id

    def _storage_failed(self, failure):
        """Said in the log, then a 4xx: 452 for a full disk, 421 when the daemon is stopping, else 451."""
        failure.trap(SpoolError)
        log.error("message {queue_id} from {client} not queued: {error}", queue_id=self.queue_id,
                  client=_client_text(self._session), error=failure.value)
        if isinstance(failure.value, SpoolStopping):
            raise Rejected(Reply(421, "4.3.2", "Service shutting down"))
        if failure.value.disk_full:
            raise Rejected(Reply(452, "4.3.1", "Insufficient system storage"))
        raise Rejected(Reply(451, "4.3.0", "Error: queue file write error"))


@implementer(IReceiver)
class SpoolingReceiver:
    def __init__(self, store, policy: RecipientPolicy, hostname: str, now: Callable[[], float], checker=None):
        """`store` has `open_message()`: the Spool itself, or the spool worker process;
        `checker` (epost/smtp/authcheck.py) adds Authentication-Results, None does not."""
        self.store = store
        self.policy = policy
        self.hostname = hostname
        self.now = now
        self.checker = checker
        self.hold = HoldBudget()

    def wants_results(self, session: Session, trusted: bool) -> bool:
        """SPEC §9: the relay port's clients that are neither authenticated nor
        in relay_networks (`trusted`: RecipientPolicy.trusted) and have an IP
        (not a UNIX socket: nothing for SPF to check)."""
        if self.checker is None or trusted or session.listener != "relay":
            return False
        return client_address(session.client_ip) is not None

    def check_sender(self, session: Session, sender: Address | None, params: dict) -> None:
        self.policy.check_sender(session, sender)

    def check_recipient(self, session: Session, sender: Address | None, recipient: Address):
        return self.policy.check_recipient(session, sender, recipient)

    def open_message(self, session: Session, sender: Address | None, recipients: list, params: dict) -> SpoolMessage:
        try:
            writer = self.store.open_message()
        except OSError as error:
            raise Rejected(Reply(451, "4.3.0", f"Error: cannot create queue file ({error.strerror})")) from None
        addresses = [address for address, _ in recipients]
        writer.write(received_header(session, self.hostname, writer.queue_id, addresses, self.now()))
        trusted = self.policy is not None and self.policy.trusted(session)
        checker = None
        if self.wants_results(session, trusted):
            checker = self.checker.begin(session.client_ip, session.client_name, str(sender) if sender else None)
        message = SpoolMessage(writer, session, sender, recipients, params, self.now, checker, self.hostname, self.hold)
        message.trusted = trusted
        return message
