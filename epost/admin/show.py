"""`epost show ID` (SPEC §4): one queued message, envelope then content, like Postfix's `postcat`.

Read-only and without the spool lock, so it works while the daemon runs: the
queue store gives a reader a consistent snapshot. The envelope is read first,
in one query with its queue, then the content is opened (a move leaves the
content as it is; a message finished in between is not queued). Once open, the content stays readable to the end even if the message
leaves the queue meanwhile (a large message's file is unlinked, never reused).
A message still queued whose large file is missing (docs/queue.md: its content is
lost) is shown all the same: its envelope, and a line on stderr naming the file.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from epost.admin.queue_listing import recipient_state
from epost.logs import printable
from epost.store.envelope import Envelope
from epost.store.database import QUEUE_ID
from epost.store.spool import ContentHandle, Spool


def open_queued(spool: Spool | None, queue_id: str) -> tuple[str, Envelope, ContentHandle | None]:
    """The queue holding `queue_id`, its envelope and its content, open for reading;
    None for the content when the message is queued but its large file is missing
    (`lost_content` names it). `spool` None: no queue store yet (`open_store`).

    LookupError when it is not queued (the queue and envelope are read by
    one query, so a message being moved is found in one queue or the
    other); EnvelopeError when its envelope cannot be read."""
    if not QUEUE_ID.fullmatch(queue_id):
        raise LookupError(f"{queue_id}: not a queue ID (17 hex digits, as `epost queue` shows)")
    if spool is None:
        raise LookupError(f"{queue_id}: not queued (the spool has no queue yet)")
    gone = LookupError(f"{queue_id}: not queued (delivered, deleted, or never here)")
    found = spool.find(queue_id)
    if found is None:
        raise gone
    try:
        content = spool.open_content(queue_id)  # it retries once itself
    except FileNotFoundError:
        if spool.state_of(queue_id) is None:  # finished since `find`
            raise gone from None
        return *found, None  # still queued: its large file is missing
    return *found, content


def lost_content(spool: Spool, queue_id: str) -> str:
    """What `epost show` says of a queued message whose large file is missing."""
    return f"{queue_id}: content lost: {spool.store.large / queue_id} is missing (the envelope above is all that is left)"


def envelope_lines(queue: str, envelope: Envelope) -> list[str]:
    """Everything the envelope holds as `key: value` lines, recipients and
    retry states as indented blocks; every value made printable on one line."""
    lines = [
        f"queue-id: {envelope.queue_id}",
        f"queue: {queue}",
        f"arrival: {_when(envelope.arrival)}",
        f"size: {envelope.size}",
        f"sender: <{envelope.sender}>",
        f"client: {envelope.client}",
        f"listener: {envelope.listener}",
        f"auth: {envelope.auth or ''}",
        f"body: {envelope.body}",
        f"delay-warned: {_yes(envelope.delay_warned)}",
        f"trusted: {_yes(envelope.trusted)}",  # DKIM: authenticated or relay_networks (docs/authentication.md)
    ]
    # Each DKIM-Signature made at commit (sent before the content over SMTP only), unfolded.
    lines += [f"dkim: {' '.join(field.split())}" for field in re.split(r"\r\n(?=\S)", envelope.dkim) if field.strip()]
    for recipient in envelope.recipients:
        lines.append(f"recipient: <{recipient.address}>")
        lines += [
            f"  state: {recipient_state(queue, recipient.state)}",
            f"  attempts: {recipient.attempts}",
            f"  failures-5xx: {recipient.failures_5xx}",
            f"  dsn-sent: {_yes(recipient.dsn_sent)}",
            f"  last-reply: {recipient.last_reply}",
            f"  route: {_compact(recipient.route) if recipient.route is not None else ''}",
        ]
    for destination, state in sorted(envelope.retries.items()):
        lines.append(f"retry: {destination}")
        lines += [f"  {key.replace('_', '-')}: {_retry_value(key, value)}" for key, value in state.items()]
    return [printable(line, join_lines=False) for line in lines]


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _retry_value(key: str, value: Any) -> str:
    """Times (`first_failure`, `last_failure`, `next_attempt`) as UTC, the rest as stored."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith(("_failure", "_attempt")):
        return _when(value)
    return value if isinstance(value, str) else _compact(value)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
