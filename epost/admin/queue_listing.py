"""A snapshot of the queue read from the queue store, so `epost queue` works without the daemon.

Each state is read by one query of its own connection (a consistent
snapshot of that state); the daemon may move or finish messages between
them. A damaged envelope is shown as unreadable rather than stopping the
listing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from epost.logs import printable
from epost.store.envelope import Envelope, EnvelopeError, Recipient
from epost.address import destination_of
from epost.store.database import QUEUES
from epost.store.spool import Spool

# What a pending recipient is called in each queue (SPEC §8).
PENDING_STATE = {"incoming": "incoming", "deferred": "deferred", "hold": "held"}


def recipient_state(queue: str, state: str) -> str:
    """`incoming`/`deferred`/`held` for a recipient pending in `queue`, else its own `delivered`/`failed`."""
    return PENDING_STATE[queue] if state == "pending" else state


@dataclass(frozen=True)
class QueuedMessage:
    queue_id: str
    queue: str  # the state: incoming, deferred or hold
    envelope: Envelope | None  # None when the envelope could not be read
    error: str = ""  # why the envelope is unreadable

    def recipient_state(self, state: str) -> str:
        return recipient_state(self.queue, state)


def read_queue(spool: Spool) -> list[QueuedMessage]:
    """Every message in incoming, deferred and hold, sorted by queue ID.

    A message seen in two states (moved while we listed) is shown once, from
    the state read last.
    """
    found: dict[str, QueuedMessage] = {}
    for queue in QUEUES:
        for message in _read_state(spool, queue):
            found[message.queue_id] = message
    return [found[queue_id] for queue_id in sorted(found)]


def _read_state(spool: Spool, queue: str) -> list[QueuedMessage]:
    """The whole state by one query a page; a damaged envelope is listed as such."""
    messages: list[QueuedMessage] = []

    def damaged(queue_id: str, error: EnvelopeError) -> None:
        messages.append(QueuedMessage(queue_id, queue, None, str(error)))

    for envelope in spool.load_many(queue, damaged):
        messages.append(QueuedMessage(envelope.queue_id, queue, envelope))
    return messages


def format_age(seconds: float) -> str:
    """Compact age in the largest whole unit: `45s`, `3m`, `2h`, `5d`."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_text(messages: list[QueuedMessage], now: float) -> list[str]:
    """One line per message, then `N messages` (or `queue is empty`)."""
    lines = []
    for message in messages:
        envelope = message.envelope
        if envelope is None:
            lines.append(printable(f"{message.queue_id}: unreadable envelope ({message.error})", join_lines=False))
            continue
        recipients = " ".join(_recipient_text(message, r, now) for r in envelope.recipients)
        age = format_age(now - envelope.arrival)
        line = f"{message.queue_id} {age:>4} {envelope.size:>9} <{envelope.sender}> {recipients}"
        lines.append(printable(line, join_lines=False))
    if not messages:
        lines.append("queue is empty")
    else:
        lines.append(f"{len(messages)} message{'s' if len(messages) != 1 else ''}")
    return lines


def to_json(messages: list[QueuedMessage], now: float) -> list[dict[str, Any]]:
    """The listing as JSON-ready objects; an unreadable message has `error` instead of envelope fields."""
    result: list[dict[str, Any]] = []
    for message in messages:
        envelope = message.envelope
        if envelope is None:
            result.append({"id": message.queue_id, "queue": message.queue, "error": message.error})
            continue
        result.append({
            "id": message.queue_id,
            "queue": message.queue,
            "age_seconds": max(0, int(now - envelope.arrival)),
            "size": envelope.size,
            "sender": envelope.sender,
            "recipients": [
                {
                    "address": r.address,
                    "state": message.recipient_state(r.state),
                    "attempts": r.attempts,
                    "next_attempt": next_attempt(message, r),
                    "last_reply": r.last_reply,
                    "route": r.route,
                }
                for r in envelope.recipients
            ],
        })
    return result


def next_attempt(message: QueuedMessage, recipient: Recipient) -> float | None:
    """When a deferred recipient is tried next (Unix time); None when not waiting for a retry."""
    if message.queue != "deferred" or recipient.state != "pending" or message.envelope is None:
        return None
    state = message.envelope.retries.get(destination_of(recipient.address)) or {}
    return state.get("next_attempt")


def recipient_details(message: QueuedMessage, recipient: Recipient) -> dict[str, Any]:
    """What the listing says of a recipient beyond its state, once there is anything:
    `attempts`, `next` (Unix time), `via` (route rule), `reply` (unless delivered).
    Shared by `epost queue` and the Mail Control queue page."""
    details: dict[str, Any] = {}
    if recipient.attempts:
        details["attempts"] = recipient.attempts
    when = next_attempt(message, recipient)
    if when is not None:
        details["next"] = when
    if recipient.route and recipient.route.get("rule"):
        details["via"] = recipient.route["rule"]
    if recipient.last_reply and recipient.state != "delivered":
        details["reply"] = recipient.last_reply
    return details


def _recipient_text(message: QueuedMessage, recipient: Recipient, now: float) -> str:
    """`address(state attempts=N next=HH:MM:SS via=rule reply="...")`."""
    parts = [message.recipient_state(recipient.state)]
    for key, value in recipient_details(message, recipient).items():
        if key == "next":
            value = format_when(value, now)
        elif key == "reply":
            value = '"' + value.replace('"', "'") + '"'
        parts.append(f"{key}={value}")
    return f"{recipient.address}({' '.join(parts)})"


def format_when(when: float, now: float) -> str:
    """Local `HH:MM:SS` within a day from now, else `YYYY-MM-DDTHH:MM`."""
    moment = time.localtime(when)
    if abs(when - now) < 86400:
        return time.strftime("%H:%M:%S", moment)
    return time.strftime("%Y-%m-%dT%H:%M", moment)


def matches(message: QueuedMessage, domain: str | None, state: str | None) -> bool:
    """The `--domain` / `--state` filters: some recipient for that domain, some recipient in that state."""
    envelope = message.envelope
    if envelope is None:
        return domain is None and state is None
    if domain is not None and not any(destination_of(r.address) == domain for r in envelope.recipients):
        return False
    if state is not None and not any(message.recipient_state(r.state) == state for r in envelope.recipients):
        return False
    return True
