"""gateway.dat (SPEC §3.3): `pattern,gateway[,port]` rules, first match in file order wins.

Patterns and the looked-up domain are compared in one canonical form (lower-case
A-labels, no trailing dot), so `*.日本.jp` and `*.XN--WGV71A.jp` are one rule.
A lookup never scans the table: it walks the domain's parent suffixes through
dicts, so it costs at most one dict probe per label, whatever the table size.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from epost.routing.tables import TableError, read_table_lines
from epost.address import AddressError, normalize_domain

DEFAULT_PORT = 25
_PORT = re.compile(r"[0-9]{1,5}\Z")
_NONE = 1 << 62  # a line index larger than any real one


@dataclass(frozen=True)
class GatewayRule:
    """One line of gateway.dat, canonical: str(rule) parses back to an equal rule."""

    line: int  # the line number in the file, for logs and `epost route`
    pattern: str  # "*", "*.abc.jp" or "abc.jp"; A-labels, lower-case
    gateway: str | None  # host name or IP address (no brackets); None for `mx`
    port: int = DEFAULT_PORT  # always 25 for `mx`

    def __str__(self) -> str:
        if self.gateway is None:
            return f"{self.pattern},mx"
        host = f"[{self.gateway}]" if ":" in self.gateway else self.gateway
        return f"{self.pattern},{host},{self.port}"


def parse_gateway_rule(text: str, line: int = 0) -> GatewayRule:
    """One `pattern,gateway[,port]` line -> GatewayRule; ValueError saying what is wrong."""
    fields = [field.strip() for field in text.split(",")]
    if len(fields) not in (2, 3):
        raise ValueError(f"expected pattern,gateway[,port], got {len(fields)} field(s)")
    pattern, gateway = _parse_pattern(fields[0]), _parse_gateway(fields[1])
    port = _parse_port(fields[2]) if len(fields) == 3 else DEFAULT_PORT
    if gateway is None and port != DEFAULT_PORT:
        raise ValueError(f"`mx` resolves normally and delivers on port {DEFAULT_PORT}; port {port} would be ignored")
    return GatewayRule(line, pattern, gateway, port)


def _parse_pattern(text: str) -> str:
    if not text:
        raise ValueError("empty pattern")
    if text == "*":
        return text
    wildcard = text.startswith("*.")
    try:
        domain = normalize_domain(text[2:] if wildcard else text)
    except AddressError as error:
        raise ValueError(f"bad pattern {text!r}: {error}") from None
    return f"*.{domain}" if wildcard else domain


def _parse_gateway(text: str) -> str | None:
    if text.lower() == "mx":
        return None
    bracketed = text.startswith("[") and text.endswith("]")
    # Only an address can be bracketed, hold a colon or end in an all-digit label.
    if bracketed or ":" in text or text.rpartition(".")[2].isdigit():
        try:
            return ipaddress.ip_address(text[1:-1] if bracketed else text).compressed
        except ValueError:
            raise ValueError(f"bad gateway {text!r}: not an IP address") from None
    try:
        return normalize_domain(text)
    except AddressError as error:
        raise ValueError(f"bad gateway {text!r}: {error}") from None


def _parse_port(text: str) -> int:
    if not _PORT.match(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"bad port {text!r}: must be 1..65535")
    return int(text)


class GatewayTable:
    """The rules in file order, indexed so that `lookup` is O(labels), not O(rules)."""

    def __init__(self, rules: Iterable[GatewayRule] = ()) -> None:
        self.rules: tuple[GatewayRule, ...] = tuple(rules)
        self._exact: dict[str, int] = {}  # domain -> index of its first exact rule
        self._wildcard: dict[str, int] = {}  # "abc.jp" for `*.abc.jp` -> first index
        self._star = _NONE  # index of the first `*` rule
        for index, rule in enumerate(self.rules):
            if rule.pattern == "*":
                self._star = min(self._star, index)
            elif rule.pattern.startswith("*."):
                self._wildcard.setdefault(rule.pattern[2:], index)
            else:
                self._exact.setdefault(rule.pattern, index)

    def __len__(self) -> int:
        return len(self.rules)

    def lookup(self, domain: str) -> GatewayRule | None:
        """The first rule in file order matching `domain`; an address literal matches only `*`."""
        first = min(self._first_specific(domain), self._star)
        return self.rules[first] if first != _NONE else None

    def is_operated(self, domain: str) -> bool:
        """True when an exact or `*.d` rule matches `domain` (SPEC §3.3): the relay port accepts it."""
        return self._first_specific(domain) != _NONE

    def operated_domains(self) -> frozenset[str]:
        """The exact patterns; `*.d` rules are answered by `is_operated`."""
        return frozenset(self._exact)

    def _first_specific(self, domain: str) -> int:
        """Index of the first matching exact or `*.d` rule, or _NONE."""
        try:
            domain = normalize_domain(domain)
        except AddressError:
            return _NONE
        first = self._exact.get(domain, _NONE)
        dot = domain.find(".")
        while dot != -1:  # every proper parent: "b.c" then "c" for "a.b.c"
            first = min(first, self._wildcard.get(domain[dot + 1 :], _NONE))
            dot = domain.find(".", dot + 1)
        return first


def parse_gateway_table(lines: Iterable[tuple[int, str]], path: Path | str) -> GatewayTable:
    """(line number, text) pairs as from `read_table_lines` -> table; TableError on the first bad line."""
    rules = []
    for number, text in lines:
        try:
            rules.append(parse_gateway_rule(text, number))
        except ValueError as error:
            raise TableError(path, number, str(error)) from None
    return GatewayTable(rules)


def load_gateway_table(path: Path) -> GatewayTable:
    """Parse gateway.dat; a missing file is an empty table, a bad line raises TableError."""
    return parse_gateway_table(read_table_lines(path), path)
