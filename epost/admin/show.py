"""`epost show ID` (SPEC §4): one queued message, envelope then content, like Postfix's `postcat`.

Read-only and without the spool lock, so it works while the daemon runs. The
daemon may move the message between queues (or finish it) while we look: the
lookup is tried twice, the content is followed to its new queue, and a
message whose content left the queue while it was printed is reported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from epost.admin.queue_listing import PENDING_STATE
from epost.logs import printable
from epost.queue import surgery
from epost.queue.envelope import Envelope, EnvelopeError
from epost.queue.spool import QUEUE_ID, QUEUES, Spool


def open_queued(spool: Spool, queue_id: str) -> tuple[str, Envelope, int]:
    """The queue holding `queue_id`, its envelope and a read-only descriptor of its content.

    LookupError when it is not queued (after a second look, so a message
    that was being moved is found in its new queue); EnvelopeError when
    its envelope cannot be read."""
    if not QUEUE_ID.fullmatch(queue_id):
        raise LookupError(f"{queue_id}: not a queue ID (17 hex digits, as `epost queue` shows)")
    for _ in range(2):
        try:
            queue = surgery.locate(spool, queue_id)
            envelope = spool.load(queue_id, queue)
        except (LookupError, FileNotFoundError):
            continue
        except EnvelopeError:
            if _located(spool, queue_id) is None:  # read while it went: not damaged, gone
                continue
            raise
        if envelope.queue_id != queue_id:  # a reused spool file, read as it was overwritten
            continue
        try:
            return queue, envelope, spool.open_content(queue_id, queue)
        except FileNotFoundError:
            continue
    raise LookupError(f"{queue_id}: not queued (delivered, deleted, or never here)")


def _located(spool: Spool, queue_id: str) -> str | None:
    """The queue holding the message now, or None."""
    try:
        return surgery.locate(spool, queue_id)
    except LookupError:
        return None


def still_queued(spool: Spool, queue_id: str, fd: int) -> bool:
    """Whether the file open as `fd` is still the message's content in some queue.

    A finished message's files go to the spool's pool of spare files and may
    be reused for a new message at once: once it left, the bytes read may
    not all be this message's."""
    mine = os.fstat(fd)
    for queue in QUEUES:
        try:
            found = os.stat(spool.content_path(queue_id, queue))
        except FileNotFoundError:
            continue
        if (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino):
            return True
    return False


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
        state = PENDING_STATE[queue] if recipient.state == "pending" else recipient.state
        lines += [
            f"  state: {state}",
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


def content_chunks(fd: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """The content's bytes, as stored."""
    offset = 0
    while chunk := os.pread(fd, size, offset):
        offset += len(chunk)
        yield chunk


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
