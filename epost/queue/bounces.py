"""Queues DSN bounces as ordinary new mail from the null sender (SPEC §6).

A bounce is committed like any received message, so it is as durable as
one and is delivered, retried and logged the same way. It travels with the
null sender, so when it fails in turn nothing bounces it again: it is
logged in faillog and dropped.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from epost.delivery.bounce import FailedRecipient, build_dsn
from epost.store.envelope import Envelope, Recipient
from epost.address import parse_mailbox

log = Logger()

HEADER_LIMIT = 64 * 1024  # the original headers returned in the DSN, at most


def original_headers(content: bytes) -> bytes:
    """The header block of a message (up to the blank line), capped at HEADER_LIMIT."""
    head = content[:HEADER_LIMIT]
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = head.find(separator)
        if end >= 0:
            return head[: end + len(separator) // 2]
    return head


class BounceSender:
    """Builds the DSN for failed recipients and commits it into the queue.

    `store` has `open_message()` (the spool worker service); `resolve` is the
    routing Resolver's `resolve`, so the bounce is routed like received mail.
    """

    def __init__(self, store: Any, resolve: Callable, hostname: str, clock: Callable[[], float]) -> None:
        self.store = store
        self.resolve = resolve
        self.hostname = hostname
        self.clock = clock

    def send(self, original: Envelope, headers: bytes, failed: list[FailedRecipient]) -> Deferred[str]:
        """Fires with the bounce's queue ID once it is durable; fails when it cannot be queued or routed."""
        try:
            recipients = self._recipients(original.sender)
            dsn = build_dsn(
                hostname=self.hostname,
                queue_id=original.queue_id,
                sender=original.sender,
                arrival=original.arrival,
                original_headers=headers,
                recipients=failed,
                now=self.clock(),
            )
            writer = self.store.open_message()
        except Exception as error:  # unroutable sender, alias loop, spool trouble: one log line
            return fail(error)
        writer.write(dsn)
        envelope = Envelope(
            queue_id=writer.queue_id,
            sender="",
            recipients=recipients,
            arrival=self.clock(),
            size=len(dsn),
            client="localhost [bounce]",
            listener="bounce",
            trusted=True,  # epost's own message: signed when its From domain has a key (docs/authentication.md)
        )
        return writer.commit(envelope)

    def _recipients(self, sender: str) -> tuple[Recipient, ...]:
        resolution = self.resolve(parse_mailbox(sender))
        if resolution.rejected:
            raise ValueError(f"no route back to {sender}: {resolution.finals[0][1].reply}")
        return tuple(Recipient(str(final), route.to_dict()) for final, route in resolution.finals if route.kind != "reject")
