"""An SMTP reply as a value: routing decides them (a `reject` route carries
one), the SMTP listener sends them, the queue and admin show them.

Kept apart from `epost/smtp/` so the deciding parts need not import the
listener's package to name a reply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """An SMTP reply with its enhanced status code (RFC 3463)."""

    code: int
    enhanced: str
    text: str

    def encode(self) -> bytes:
        parts = (str(self.code), self.enhanced, self.text) if self.enhanced else (str(self.code), self.text)
        return (" ".join(parts) + "\r\n").encode("utf-8", "replace")
