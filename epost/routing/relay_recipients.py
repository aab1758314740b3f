"""The relay_recipients table (SPEC §3.5): the valid addresses of operated domains.

One entry a line: `user@domain` (one address) or `@domain` (every address
of that domain), `#` comments, blank lines ignored; anything after the
address on a line (Postfix's relay_recipient_maps have a value column) is
refused, so a typo never silently widens the table. Lookups ignore case in
both parts, like the users table. A missing file is not an empty table but
*no* table: `present` is False and recipient verification by probe decides
instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from epost.routing.tables import TableError, read_table_lines
from epost.address import Address, AddressError, normalize_domain, parse_mailbox


@dataclass(frozen=True)
class RelayRecipients:
    """`addresses` maps "user@domain" (lower case) and `domains` "domain" to the line that lists it."""

    present: bool = False
    addresses: dict[str, int] = field(default_factory=dict)
    domains: dict[str, int] = field(default_factory=dict)

    def lookup(self, address: Address) -> int | None:
        """The line listing `address` (itself, or its `@domain`), else None."""
        line = self.addresses.get(f"{address.local.lower()}@{address.domain}")
        return line if line is not None else self.domains.get(address.domain)

    def __len__(self) -> int:
        return len(self.addresses) + len(self.domains)


def parse_relay_recipient(text: str) -> tuple[str, str]:
    """`user@domain` -> ("address", "user@domain"); `@domain` -> ("domain", "domain"); ValueError otherwise."""
    if len(text.split()) != 1:
        raise ValueError(f"expected one address a line (user@domain or @domain), got {text!r}")
    if text.startswith("@"):
        try:
            return "domain", normalize_domain(text[1:])
        except AddressError as error:
            raise ValueError(f"bad domain {text!r}: {error}") from None
    try:
        address = parse_mailbox(text)
    except AddressError as error:
        raise ValueError(f"bad address {text!r}: {error}") from None
    if address.is_literal:
        raise ValueError(f"{text!r}: an address literal is never an operated domain")
    return "address", f"{address.local.lower()}@{address.domain}"


def load_relay_recipients(path: Path) -> RelayRecipients:
    """Parse the file; a missing file gives `present=False`, a bad line raises TableError."""
    path = Path(path)
    if not path.exists():
        return RelayRecipients()
    addresses: dict[str, int] = {}
    domains: dict[str, int] = {}
    for number, text in read_table_lines(path):
        try:
            kind, key = parse_relay_recipient(text)
        except ValueError as error:
            raise TableError(path, number, str(error)) from None
        (domains if kind == "domain" else addresses).setdefault(key, number)
    return RelayRecipients(True, addresses, domains)
