"""Envelope addresses: parse RFC 5321 paths into one canonical form.

Every later decision (local user? relay allowed? which route?) looks only at
`Address.domain`, which is lower-case, IDNA A-label, without a trailing dot.
Routing syntax that older MTAs honoured (`%` hack, `!` paths, source routes)
is never interpreted: `%` and `!` stay in the local part, and a source route
is dropped in favour of the final mailbox (RFC 5321 §C), so the relay
decision is always made on the domain the mail would really go to.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"\Z')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")  # "_" tolerated, as in DNS
_SOURCE_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")

MAX_LOCAL_PART = 64
MAX_PATH = 256


class AddressError(ValueError):
    """A path that is not a valid RFC 5321 mailbox."""


@dataclass(frozen=True)
class Address:
    local: str  # as given; quoted-string content unquoted
    domain: str  # canonical: lower-case A-labels or "[literal]"

    def __str__(self) -> str:
        local = self.local
        if not _DOT_STRING.match(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}"

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def literal_ip(self) -> str | None:
        """The IP an address literal names (`[IPv6:...]` prefix dropped), else None."""
        if not self.is_literal:
            return None
        inner = self.domain[1:-1]
        return inner[5:] if inner[:5].lower() == "ipv6:" else inner


@functools.lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """Lower-case, strip one trailing dot, convert U-labels to A-labels.

    Cached: the same few domains come by several times per message.

    Raises AddressError (a ValueError) for anything that is not a valid
    host name; an all-numeric last label is refused (`u@1.2.3.4` must be
    written as a literal).
    """
    domain = domain.strip()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain:
        raise AddressError("empty domain")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as error:
            raise AddressError(f"bad international domain: {error}") from None
    domain = domain.lower()
    labels = domain.split(".")
    if len(domain) > 253 or not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise AddressError(f"bad domain {domain!r}")
    return domain


def destination_of(address: str) -> str:
    """The destination domain of an address: what Domain.mri and the connection limits count by."""
    return address.rpartition("@")[2].rstrip(".").lower()


def _normalize_literal(literal: str) -> str:
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError(f"bad address literal {literal!r}") from None


@functools.lru_cache(maxsize=4096)
def parse_mailbox(text: str) -> Address:
    """Parse `local@domain` (no angle brackets); cached (an Address is immutable)."""
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("address must be local@domain")
    local, domain = text[:at], text[at + 1 :]
    quoted = _QUOTED_STRING.match(local)
    if quoted:
        local = re.sub(r"\\(.)", r"\1", quoted.group(1))
    elif not _DOT_STRING.match(local):
        raise AddressError(f"bad local part {local!r}")
    if len(local) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if domain.startswith("[") and domain.endswith("]"):
        return Address(local, _normalize_literal(domain))
    return Address(local, normalize_domain(domain))


def parse_path(text: str, *, allow_null: bool) -> Address | None:
    """Parse `<...>` from MAIL FROM / RCPT TO; `<>` gives None when allowed."""
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("address must be in angle brackets")
    inner = text[1:-1]
    if len(inner) > MAX_PATH:
        raise AddressError("path too long")
    if not inner:
        if allow_null:
            return None
        raise AddressError("null address not allowed here")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end() :]
    if not inner.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8")
    return parse_mailbox(inner)
