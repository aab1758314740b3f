"""DNSBL sites in Postfix postscreen's syntax, and the verdict they give (SPEC §5).

Pure values and functions, no I/O: `[server] dnsbl` entries are parsed here
when the config is loaded, and a client's verdict is computed here from the
answers `epost/smtp/screen.py` collected.

An entry is `zone[=filter][*weight]` (postscreen_dnsbl_sites):
- `zone`: the DNSBL's domain, e.g. `zen.spamhaus.org`;
- `filter`: which answers count, four dot-separated octet patterns, each a
  number or `[...]` holding `;`-separated numbers and `a..b` ranges, e.g.
  `127.0.0.[2..11]` or `127.0.[2..15].[0;1]`; without one, any answer in
  127.0.0.0/8 counts except 127.255.255.0/24 (the error codes Spamhaus sends
  to public resolvers) — postscreen counts any answer, but an answer outside
  127/8 comes from a resolver that rewrites NXDOMAIN, not from a DNSBL;
- `weight`: an integer added to the client's score when the zone lists it
  with a matching answer, default 1; negative for allow lists (list.dnswl.org).
A zone may appear in several entries (each with its own filter and weight);
each entry adds its weight at most once however many answers match.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")
_WEIGHT = re.compile(r"[+-]?[0-9]{1,9}\Z")
_NUMBER = re.compile(r"[0-9]{1,3}\Z")
# The longest query name is an IPv6 client's: 32 nibbles and their dots before the zone.
MAX_ZONE_LENGTH = 253 - 64


@dataclass(frozen=True)
class DnsblSite:
    """One `zone[=filter][*weight]` entry; `octets` is None without a filter."""

    zone: str
    octets: tuple[frozenset[int], frozenset[int], frozenset[int], frozenset[int]] | None = None
    weight: int = 1
    text: str = ""  # the entry as written, for messages

    def matches(self, addresses: Iterable[str]) -> bool:
        """Does any of the zone's A answers count for this entry?"""
        for address in addresses:
            try:
                parts = [int(octet) for octet in str(ipaddress.IPv4Address(address)).split(".")]
            except ValueError:
                continue
            if self.octets is None:
                if parts[0] == 127 and parts[1:3] != [255, 255]:
                    return True
            elif all(part in allowed for part, allowed in zip(parts, self.octets)):
                return True
        return False


def parse_dnsbl_site(text: str) -> DnsblSite:
    """`zone[=filter][*weight]` as postscreen reads it; ValueError naming the entry and the problem."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string like 'zen.spamhaus.org*2', got {text!r}")
    entry = text.strip()
    rest, star, weight_text = entry.partition("*")
    weight = 1
    if star:
        if not _WEIGHT.match(weight_text):
            raise ValueError(f"bad weight {weight_text!r} in {entry!r}: must be an integer (negative for allow lists)")
        weight = int(weight_text)
    zone, equals, filter_text = rest.partition("=")
    octets = _parse_filter(filter_text, entry) if equals else None
    return DnsblSite(_parse_zone(zone, entry), octets, weight, entry)


def _parse_zone(zone: str, entry: str) -> str:
    name = zone.lower().removesuffix(".")
    if not name:
        raise ValueError(f"no DNSBL zone in {entry!r}")
    if len(name) > MAX_ZONE_LENGTH or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"bad DNSBL zone {zone!r} in {entry!r}: must be a domain name of at most {MAX_ZONE_LENGTH} characters")
    return name


def _parse_filter(text: str, entry: str) -> tuple[frozenset[int], ...]:
    fields, field, inside = [], "", False  # split at the dots outside [...]: a range has dots of its own
    for char in text:
        if char == "." and not inside:
            fields.append(field)
            field = ""
            continue
        if char == "[":
            inside = True
        elif char == "]":
            inside = False
        field += char
    fields.append(field)
    if len(fields) != 4:
        raise ValueError(f"bad filter {text!r} in {entry!r}: must be four octet patterns like 127.0.0.[2..11]")
    return tuple(_parse_octet(field, entry) for field in fields)


def _parse_octet(field: str, entry: str) -> frozenset[int]:
    def number(item: str) -> int:
        if not _NUMBER.match(item) or int(item) > 255:
            raise ValueError(f"bad octet {item!r} in {entry!r}: must be 0..255")
        return int(item)

    if not (field.startswith("[") and field.endswith("]") and len(field) > 2):
        return frozenset({number(field)})
    allowed: set[int] = set()
    for item in field[1:-1].split(";"):
        low, dots, high = item.partition("..")
        first, last = number(low), number(high) if dots else number(low)
        if first > last:
            raise ValueError(f"bad range {item!r} in {entry!r}: the first number is larger")
        allowed.update(range(first, last + 1))
    return frozenset(allowed)


def query_name(ip: str, zone: str) -> str:
    """The name to look up: the octets reversed for IPv4, the 32 nibbles reversed for
    IPv6 (RFC 5782 §2.1, 2.4); an IPv4-mapped IPv6 address is looked up as IPv4."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.reverse_pointer.rsplit(".", 2)[0] + "." + zone


@dataclass(frozen=True)
class Score:
    total: int
    zone: str | None  # the zone that contributed the largest weight (postscreen names it)


def dnsbl_score(sites: Sequence[DnsblSite], answers: Mapping[str, Iterable[str]]) -> Score:
    """Sum of the weights of the entries whose zone answered and whose filter matched.
    `answers` maps a zone to its A answers; a zone that did not answer is absent."""
    total, best, best_weight = 0, None, 0
    for site in sites:
        addresses = answers.get(site.zone)
        if addresses and site.matches(addresses):
            total += site.weight
            if best is None or site.weight > best_weight:
                best, best_weight = site.zone, site.weight
    return Score(total, best)


def blocking_zone(sites: Sequence[DnsblSite], answers: Mapping[str, Iterable[str]], threshold: int) -> str | None:
    """The zone to name in the refusal when the score reaches `threshold`, else None."""
    score = dnsbl_score(sites, answers)
    return score.zone if score.total >= threshold and score.zone is not None else None
