"""LMTP (RFC 2033) to Dovecot for local recipients (SPEC §10, docs/mailboxes.md): the small part
Twisted lacks, on our outbound SMTP client.

LMTP is SMTP with LHLO for EHLO and, after the final dot, one reply per
accepted recipient in RCPT order, so Sieve and quotas can answer each one
(over quota: 552 5.2.2). The caller treats each Outcome like an SMTP reply:
2xx delivered, 4xx retried, 5xx bounced, no answer (Dovecot down) deferred.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epost.delivery.smtp_client import Outcome, SMTPClient, TransactionResult

__all__ = ["LMTPClient", "deliver_lmtp", "deliver_lmtp_batch", "lmtp_endpoint"]

log = Logger()


class LMTPClient(SMTPClient):
    """SMTPClient speaking LMTP: LHLO, no HELO fallback, no STARTTLS (a local socket), per-recipient DATA replies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("tls_context", None)
        super().__init__(*args, **kwargs)
        self._data_replies = 0

    def _on_greeting(self, code: int, text: str) -> None:
        if code == 220:
            self._send((f"LHLO {self.hostname}", "ehlo", self._on_ehlo))
        else:
            self._fail("greeting", code, text)

    def _on_ehlo(self, code: int, text: str) -> None:
        if code // 100 == 5:  # no HELO in LMTP
            self._fail("ehlo", code, text)
        else:
            super()._on_ehlo(code, text)

    def _can_starttls(self) -> bool:
        return False

    def _on_data_end(self, code: int, text: str) -> None:
        recipient = self._accepted[self._data_replies]
        self._outcomes[recipient] = Outcome(code, text, "data")
        self._data_replies += 1
        if self._data_replies < len(self._accepted):
            self._await("data_end", self._on_data_end)
        else:
            self._finish()


def lmtp_endpoint(reactor: Any, transport: str) -> Any:
    """`lmtp:unix:/run/dovecot/lmtp` or `lmtp:tcp:HOST:PORT` -> a client endpoint; ValueError otherwise."""
    kind, _, where = transport.partition(":")
    if kind != "lmtp" or not where.startswith(("unix:", "tcp:")):
        raise ValueError(f"local_transport must be lmtp:unix:/PATH or lmtp:tcp:HOST:PORT, not {transport!r}")
    return clientFromString(reactor, where)


def deliver_lmtp(
    reactor: Any, endpoint: Any, hostname: str, sender: str, recipients: list[str],
    chunks: Callable[[], Iterable[bytes]], size: int, timeouts: dict[str, float] | None = None,
) -> defer.Deferred[TransactionResult]:
    """One LMTP transaction; fires with every recipient's Outcome. Never fails: a refused
    connection is an Outcome with code None for everyone (deferred, nothing lost).

    `chunks` gives the content's chunks (a fresh pass each call) and `size` its
    length, so a large message is streamed, never held whole."""
    client = LMTPClient(hostname, sender, recipients, chunks, size, True, reactor, timeouts=timeouts)

    def not_connected(failure: Any) -> TransactionResult:
        text = f"4.4.1 LMTP connection failed: {failure.getErrorMessage()}"
        return TransactionResult({r: Outcome(None, text, "connect") for r in recipients}, False, False)

    d = connectProtocol(endpoint, client)
    d.addCallbacks(lambda _: client.done, not_connected)
    return d


def deliver_lmtp_batch(
    spool: Any,
    queue_ids: list[str],
    *,
    reactor: Any,
    threadpool: Any,
    endpoint: Any,
    hostname: str,
    give_up_after: float = 8 * 3600,
    now: Callable[[], float] = time.time,
) -> defer.Deferred[dict[str, str]]:
    """LocalDeliveryRunner's `deliver` for `local_transport = "lmtp:..."`: the same verdicts as
    deliver_local_batch (DONE, RETRY, PASSED), one LMTP transaction per message.

    2xx: delivered. 5xx: failed (the manager bounces it). 4xx or no answer
    (Dovecot down): pending, retried by the runner until `give_up_after`
    (E-Post's 4xx period), then failed. Spool reads and writes run in `threadpool`.
    What the batch did is written in one transaction at its end (runner.record_passes),
    as for Maildir: a message whose content cannot be read is RETRY, the others are
    still recorded; a crash before that write delivers the batch again.
    """
    return defer.ensureDeferred(_lmtp_batch(spool, queue_ids, reactor, threadpool, endpoint, hostname,
                                            give_up_after, now))


async def _lmtp_batch(spool, queue_ids, reactor, threadpool, endpoint, hostname, give_up_after, now):
    from epost.store.envelope import EnvelopeError
    from epost.queue.runner import DONE, record_passes, settle_recipient

    def in_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(reactor, threadpool, f, *args)

    verdicts = dict.fromkeys(queue_ids, DONE)
    passes = []
    for queue_id in queue_ids:
        try:
            envelope = await in_thread(spool.load, queue_id)
        except FileNotFoundError:
            continue
        except EnvelopeError:
            log.failure("{queue_id}: unreadable, left for the operator", queue_id=queue_id)
            continue
        local = [i for i in envelope.pending() if (envelope.recipients[i].route or {}).get("kind") == "local"]
        failed = False
        if local:
            rcpt = {i: _lmtp_address(envelope.recipients[i]) for i in local}
            # Streamed from the store a chunk at a time: a large message never sits whole in the daemon.
            try:
                content = await in_thread(spool.open_content, queue_id)
            except FileNotFoundError:
                continue  # gone meanwhile (deleted by the operator)
            except OSError:  # the store could not read it: this one waits, the batch's others are still recorded
                log.failure("{queue_id}: cannot read its content", queue_id=queue_id)
                passes.append((envelope, False, True))
                continue
            try:
                result = await deliver_lmtp(reactor, endpoint, hostname, envelope.sender,
                                            sorted(set(rcpt.values())), content.chunks, envelope.size)
            finally:
                content.close()
            for index in local:
                outcome = result.recipients[rcpt[index]]
                reply = f"{outcome.code} {outcome.text}" if outcome.code else outcome.text
                klass = outcome.code // 100 if outcome.code is not None else None
                envelope, retry = settle_recipient(envelope, index, f"lmtp: {reply}", delivered=klass == 2,
                                                   permanent=klass == 5, give_up_after=give_up_after, now=now)
                failed = failed or retry
        passes.append((envelope, bool(local), failed))
    verdicts.update(await in_thread(record_passes, spool, passes))  # one transaction for the batch
    return verdicts


def _lmtp_address(recipient: Any) -> str:
    """The mailbox the router chose (`domain/user`, after aliases) as Dovecot's user name `user@domain`."""
    domain, _, user = str((recipient.route or {}).get("mailbox", "")).partition("/")
    return f"{user}@{domain}" if user and domain else recipient.address
