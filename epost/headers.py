"""Reading a message's header section: where it ends and its From: domains.

A leaf of pure helpers, shared by the receiving checks (Authentication-Results,
DMARC) and outbound DKIM signing, so both read a message's From: alike.
"""

from __future__ import annotations


def header_end(message: bytes) -> int:
    """Offset just past the header section's last field (before the empty line), or len(message)."""
    if message.startswith(b"\r\n"):
        return 0
    end = message.find(b"\r\n\r\n")
    return len(message) if end < 0 else end + 2


def header_from_domains(head: bytes) -> list[str]:
    """The domains of the RFC 5322 From addresses (DMARC's identifier), lower case, in order."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32
    from email.utils import getaddresses

    fields = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n").get_all("From") or []
    domains = []
    for _name, address in getaddresses([str(value) for value in fields]):
        local, at, domain = address.rpartition("@")
        domains.append(domain.strip().rstrip(".").lower() if at and local and domain.strip() else "")
    return domains


def from_domain(message: bytes) -> str | None:
    """The first From: address's domain, read from the header section of `message`
    (or of its first bytes), or None."""
    domains = header_from_domains(message[: header_end(message)])
    return domains[0] if domains and domains[0] else None
