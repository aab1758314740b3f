"""LMTP (RFC 2033) to Dovecot for local recipients (SPEC §10, docs/mailboxes.md): the small part
Twisted lacks, on our outbound SMTP client.

LMTP is SMTP with LHLO for EHLO and, after the final dot, one reply per
accepted recipient in RCPT order, so Sieve and quotas can answer each one
(over quota: 552 5.2.2). The caller treats each Outcome like an SMTP reply:
2xx delivered, 4xx retried, 5xx bounced, no answer (Dovecot down) deferred.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol

from epost.delivery.smtp_client import Outcome, SMTPClient, TransactionResult

__all__ = ["LMTPClient", "deliver_lmtp", "lmtp_endpoint"]


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
    reactor: Any, endpoint: Any, hostname: str, sender: str, recipients: list[str], content: bytes,
    timeouts: dict[str, float] | None = None,
) -> defer.Deferred[TransactionResult]:
    """One LMTP transaction; fires with every recipient's Outcome. Never fails: a refused
    connection is an Outcome with code None for everyone (deferred, nothing lost)."""

    def chunks() -> Iterable[bytes]:
        return [content]

    client = LMTPClient(hostname, sender, recipients, chunks, len(content), True, reactor, timeouts=timeouts)

    def not_connected(failure: Any) -> TransactionResult:
        text = f"4.4.1 LMTP connection failed: {failure.getErrorMessage()}"
        return TransactionResult({r: Outcome(None, text, "connect") for r in recipients}, False, False)

    d = connectProtocol(endpoint, client)
    d.addCallbacks(lambda _: client.done, not_connected)
    return d
