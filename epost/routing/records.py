"""DNS records as plain values, through one small seam, and SPF evaluated over it.

`Lookup` is what the SPF, DKIM and DMARC checks ask: a name and a record
type in, plain values out (`epost check-dns` and the inbound
Authentication-Results both use it), so their verdicts are tested without a
DNS server. `DnspythonLookup` is the real one; `SpfQuery` is pyspf's RFC 7208
evaluation asking through a `Lookup` instead of pyspf's module-wide resolver.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import dns.exception
import dns.name
import dns.resolver
import spf


class DnsUnavailable(Exception):
    """The DNS gave no usable answer (timeout, SERVFAIL, refused): the check could not be made."""


# name, record type ("MX", "TXT", "A", "AAAA", "PTR") -> values; [] for NXDOMAIN or no data.
# TXT: each record's strings joined; MX: (preference, exchange) with "" for the root;
# A/AAAA: address text; PTR: host name. Names are lower-case without the final dot.
Lookup = Callable[[str, str], list]


class DnspythonLookup:
    """The `Lookup` over a dnspython resolver; each query gives up after `lifetime` seconds."""

    def __init__(self, resolver: dns.resolver.Resolver, lifetime: float = 4.0) -> None:
        self._resolver = resolver
        self._lifetime = lifetime

    def __call__(self, name: str, rdtype: str) -> list:
        name = name.rstrip(".").lower()
        if not name:
            return []
        try:
            answer = self._resolver.resolve(name, rdtype, lifetime=self._lifetime, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.SyntaxError, dns.name.NameTooLong, dns.name.IDNAException):
            return []  # not a name anyone can publish (e.g. a bad SPF macro expansion)
        except dns.exception.Timeout:
            raise DnsUnavailable(f"{name} {rdtype}: no answer within {self._lifetime:g} s") from None
        except dns.resolver.NoNameservers:
            raise DnsUnavailable(f"{name} {rdtype}: no DNS server answered (SERVFAIL or refused)") from None
        except dns.exception.DNSException as error:
            raise DnsUnavailable(f"{name} {rdtype}: {type(error).__name__}") from None
        if rdtype == "TXT":
            return [b"".join(r.strings).decode("utf-8", "surrogateescape") for r in answer]
        if rdtype == "MX":
            return [(r.preference, "" if r.exchange == dns.name.root else r.exchange.to_text(True).lower()) for r in answer]
        if rdtype in ("A", "AAAA"):
            return [r.address for r in answer]
        if rdtype == "PTR":
            return [r.target.to_text(True).lower() for r in answer]
        raise ValueError(f"unsupported record type {rdtype}")


def memoized(lookup: Lookup) -> Lookup:
    """One answer per (name, type) for one run of the checks (failures are asked again).

    Safe to share between threads: a (name, type) being asked by one thread is
    waited for by the others rather than asked again; different ones go in parallel."""
    answers: dict[tuple[str, str], list] = {}
    asking: dict[tuple[str, str], threading.Lock] = {}
    guard = threading.Lock()

    def cached(name: str, rdtype: str) -> list:
        key = (name.rstrip(".").lower(), rdtype)
        with guard:
            lock = asking.setdefault(key, threading.Lock())
        with lock:
            if key not in answers:
                answers[key] = lookup(*key)
            return list(answers[key])

    return cached


class SpfQuery(spf.query):
    """pyspf's RFC 7208 evaluation, its DNS asked through our `Lookup`.

    pyspf's own `dns` calls a module-wide resolver (the system's); overriding
    this one method keeps its parsing, macro expansion and lookup limits
    and lets each check use the configured DNS servers."""

    def __init__(self, lookup: Lookup, address: str, sender: str, helo: str) -> None:
        super().__init__(i=address, s=sender, h=helo, strict=True)
        self._lookup = lookup

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        try:
            values = self._lookup(str(name).rstrip(".").lower(), qtype) if qtype != "SPF" else []
        except DnsUnavailable as error:
            raise spf.TempError(f"DNS {error}") from None
        if qtype == "TXT":
            values = [(value.encode("utf-8", "surrogateescape"),) for value in values]
        if not values and not ignore_void:  # RFC 7208 4.6.4: at most two lookups with no answer
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return values
