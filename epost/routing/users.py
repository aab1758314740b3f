"""The users table (`etc/users`, SPEC §3.2): local mailboxes and their AUTH password hashes.

One line per mailbox, `user@domain:HASH`, or `user@domain` for a mailbox that
cannot log in. Lookups ignore case in both parts, so `Alice@Example.JP` and
`alice@example.jp` are one mailbox and one Maildir folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from epost.routing.tables import PackedMap, TableError, iter_table_lines
from epost.address import Address, AddressError, parse_mailbox


@dataclass(frozen=True, slots=True)
class User:
    address: Address  # canonical: local part and domain lower-case
    password_hash: str | None  # None: receives mail but cannot log in

    @property
    def mailbox(self) -> str:
        """Maildir path under `mailboxes/`: `domain/user`."""
        return f"{self.address.domain}/{self.address.local}"


class Users:
    """The table, kept compact: `local@domain` -> hash ("" for a mailbox that cannot log in)
    in a PackedMap, so a replaced table's memory goes back to the system (docs/routing.md,
    "Memory"). Users are made on lookup.
    """

    __slots__ = ("_hashes", "_domains")

    def __init__(self, hashes: dict[str, str | None] | None = None) -> None:
        self._hashes = PackedMap({key: value or "" for key, value in (hashes or {}).items()})
        self._domains: frozenset[str] | None = None  # made on first ask; the table never changes

    @classmethod
    def of(cls, users: Iterable[User]) -> Users:
        return cls({_key(user.address): user.password_hash for user in users})

    def get(self, address: Address) -> User | None:
        stored = self._hashes.get(_key(address))
        if stored is None:
            return None
        return User(_canonical(address), stored or None)

    def mailbox(self, address: Address) -> str | None:
        """`domain/user` (lower-case) for a known mailbox, else None."""
        return f"{address.domain}/{address.local.lower()}" if _key(address) in self._hashes else None

    def password_hash(self, address: Address) -> str | None:
        """The stored hash; None for an unknown address or one that cannot log in."""
        return self._hashes.get(_key(address)) or None

    def domains(self) -> frozenset[str]:
        """The domains that have a mailbox here (Mail Control's DNS checks): walked once per
        table, not per dashboard view; it lives and goes with the table (one name per domain)."""
        if self._domains is None:
            self._domains = frozenset(key.rpartition("@")[2] for key in self._hashes.keys())
        return self._domains

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, address: Address) -> bool:
        return _key(address) in self._hashes


def load_users(path: Path) -> Users:
    """Parse the users file; a missing file is an empty table, a bad line raises TableError."""
    hashes: dict[str, str | None] = {}
    for number, text in iter_table_lines(path):
        try:
            user = parse_user_line(text)
        except ValueError as error:
            raise TableError(path, number, str(error)) from None
        key = _key(user.address)
        if key in hashes:
            raise TableError(path, number, f"duplicate address {user.address}")
        hashes[key] = user.password_hash
    return Users(hashes)


def parse_user_line(text: str) -> User:
    """`user@domain[:HASH]` -> User; AddressError (a ValueError) saying what is wrong."""
    address_text, password_hash = split_hash(text)
    try:
        address = _canonical(parse_mailbox(address_text.strip()))
    except AddressError as error:
        shown = address_text.partition(":")[0].strip()  # never echo a hash into the log
        raise AddressError(f"bad address {shown!r}: {error}") from None
    if address.is_literal:
        raise AddressError(f"mailbox domain must be a name, not {address.domain}")
    # The local part becomes a folder name under mailboxes/<domain>/.
    if "/" in address.local or address.local.startswith("."):
        raise AddressError(f"local part {address.local!r} cannot be a mailbox folder name")
    if password_hash is not None:
        password_hash = password_hash.strip()
        if not password_hash:
            raise AddressError("empty password hash (omit the ':' for a mailbox that cannot log in)")
    return User(address, password_hash)


def split_hash(text: str) -> tuple[str, str | None]:
    """(address, hash or None): the address ends at the first ':' leaving a valid mailbox on its left,
    since a quoted local part may itself hold ':'."""
    start = 0
    while (colon := text.find(":", start)) != -1:
        try:
            parse_mailbox(text[:colon].strip())
        except AddressError:
            start = colon + 1
            continue
        return text[:colon], text[colon + 1 :]
    return text, None


def _canonical(address: Address) -> Address:
    return Address(address.local.lower(), address.domain)


def _key(address: Address) -> str:
    """The lookup key: `local@domain`, local part lower-cased (the domain can hold no `@`)."""
    return f"{address.local.lower()}@{address.domain}"
