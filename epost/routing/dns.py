"""Routing step 5 (SPEC §3): MX and address lookups with dnspython, off the reactor thread.

dnspython's blocking resolver is the complete one (TCP fallback, retries,
CNAMEs, NXDOMAIN vs NODATA), so each lookup runs in a thread pool, is bounded
by `timeout` seconds in all, and comes back as a Deferred. Failures are
DNSError, which says whether retrying can help and which enhanced code to use.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from epost.config import HostPort

HOSTS_FILE = Path("/etc/hosts")


@dataclass(frozen=True)
class MXHost:
    """One MX record. `host` is lower-case without the trailing dot; the root (".") becomes ""."""

    host: str
    preference: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", self.host.rstrip(".").lower())


class DNSError(Exception):
    """A lookup that gave no usable answer; str() is one line naming the name and the problem."""

    def __init__(self, message: str, *, permanent: bool, enhanced: str) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.enhanced = enhanced


def _permanent(message: str, enhanced: str = "5.1.2") -> DNSError:
    return DNSError(message, permanent=True, enhanced=enhanced)


def _temporary(message: str) -> DNSError:
    return DNSError(message, permanent=False, enhanced="4.4.3")


def order_mx(records: Sequence[MXHost], rng: random.Random) -> list[str]:
    """Hosts to try, lowest preference first, shuffled by `rng` among equal preferences.

    A host listed twice keeps its best preference. The result depends only on
    the set of records and the rng state, not on the order of `records`.
    """
    best: dict[str, int] = {}
    for record in records:
        best[record.host] = min(record.preference, best.get(record.host, record.preference))
    ordered = sorted(best.items(), key=lambda item: (item[1], item[0]))
    hosts: list[str] = []
    for _, group in groupby(ordered, key=lambda item: item[1]):
        same = [host for host, _ in group]
        rng.shuffle(same)
        hosts.extend(same)
    return hosts


def read_hosts(path: Path) -> dict[str, list[str]]:
    """Lower-case name -> addresses in file order, from an /etc/hosts-style file.

    A missing or unreadable file is empty; lines whose first field is not an
    IP address are skipped, as the C library does.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            addresses = table.setdefault(name.rstrip(".").lower(), [])
            if address not in addresses:
                addresses.append(address)
    return table


def _ipv4_first(addresses: list[str]) -> list[str]:
    return sorted(addresses, key=lambda address: ":" in address)


def make_resolver(servers: Sequence[HostPort] = (), cache: bool = False) -> dns.resolver.Resolver:
    """A dnspython resolver asking `servers` ([routing] dns_servers), or the system's when there are none;
    with `cache`, answers are kept for their TTL (dnspython's LRUCache is thread-safe: a pool may share it)."""
    if not servers:
        resolver = dns.resolver.Resolver(configure=True)
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(s.host, port=s.port) for s in servers]
    if cache:
        resolver.cache = dns.resolver.LRUCache()
    return resolver


class MXResolver:
    """The one DNS seam of epost: MX hosts for a domain, addresses for a host.

    Lookups run in `threadpool` (which the caller starts and stops); the
    reactor thread never blocks. With `servers` those DNS servers are asked,
    otherwise the system's (/etc/resolv.conf). `hosts_file` is read on every
    address lookup, like the C library does, and wins over DNS.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        servers: tuple[HostPort, ...] = (),
        timeout: float = 8.0,
        rng: random.Random | None = None,
        hosts_file: Path = HOSTS_FILE,
    ) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._timeout = timeout
        self._rng = rng if rng is not None else random.Random()
        self._hosts_file = hosts_file
        self._resolver = make_resolver(servers, cache=True)

    def resolve_mx(self, domain: str) -> Deferred[list[str]]:
        """Host names to try for `domain`, in order; fails with DNSError.

        MX hosts ordered by order_mx; with no MX records the domain itself if
        it has an address (implicit MX, hosts file included); NXDOMAIN or no
        address is 5.1.2, a null MX (RFC 7505) 5.1.10.
        """
        d = deferToThreadPool(self._reactor, self._threadpool, self._mx_records, domain)
        d.addCallback(order_mx, self._rng)  # on the reactor thread: the rng is not shared with threads
        return d

    def resolve_addresses(self, host: str) -> Deferred[list[str]]:
        """IPv4 then IPv6 addresses of `host`, hosts file first; fails with DNSError (5.4.4 or 4.4.3).

        An IP address (a gateway.dat host, often) is its own answer, without a thread hop."""
        try:
            return succeed([str(ipaddress.ip_address(host.rstrip(".")))])
        except ValueError:
            pass
        return deferToThreadPool(self._reactor, self._threadpool, self._address_records, host)

    def lookup_mx(self, domain: str) -> list[str]:
        """Blocking resolve_mx, for command-line tools that have no reactor."""
        return order_mx(self._mx_records(domain), self._rng)

    # The methods below run in the thread pool.

    def _mx_records(self, domain: str) -> list[MXHost]:
        name = domain.rstrip(".").lower()
        deadline = time.monotonic() + self._timeout
        try:
            answer = self._query(name, "MX", deadline)
        except dns.resolver.NXDOMAIN:
            if name in read_hosts(self._hosts_file):
                return [MXHost(name, 0)]
            raise _permanent(f"{name}: domain not found") from None
        except dns.resolver.NoAnswer:
            try:
                self._addresses(name, deadline)
            except DNSError as error:
                if error.permanent:
                    raise _permanent(f"{name}: domain has no MX or address records") from None
                raise
            return [MXHost(name, 0)]
        records = [MXHost(record.exchange.to_text(), record.preference) for record in answer]
        usable = [record for record in records if record.host]
        if not usable:  # RFC 7505: "0 ." alone; a lone root exchange at another preference is no better
            raise _permanent(f"{name}: domain accepts no mail (null MX)", "5.1.10")
        return usable

    def _address_records(self, host: str) -> list[str]:
        return self._addresses(host, time.monotonic() + self._timeout)

    def _addresses(self, host: str, deadline: float) -> list[str]:
        name = host.rstrip(".").lower()
        known = read_hosts(self._hosts_file).get(name)
        if known:
            return _ipv4_first(known)
        try:
            return [str(ipaddress.ip_address(name))]
        except ValueError:
            pass
        found: list[str] = []
        failure: DNSError | None = None
        for rdtype in ("A", "AAAA"):
            try:
                found += [record.address for record in self._query(name, rdtype, deadline)]
            except dns.resolver.NoAnswer:
                pass
            except dns.resolver.NXDOMAIN:
                raise _permanent(f"{name}: host not found", "5.4.4") from None
            except DNSError as error:
                if error.permanent:
                    raise
                failure = error
        if found:  # one family is enough to deliver
            return found
        if failure is not None:
            raise failure
        raise _permanent(f"{name}: host has no address", "5.4.4")

    def _query(self, name: str, rdtype: str, deadline: float) -> dns.resolver.Answer:
        """One query within what is left of the lookup's time; NXDOMAIN and NoAnswer pass through."""
        if not name:  # dnspython would ask for the root
            raise _permanent("<empty>: not a valid domain name")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _temporary(f"{name}: DNS lookup timed out")
        try:
            return self._resolver.resolve(name, rdtype, lifetime=remaining, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise
        except dns.exception.Timeout:
            raise _temporary(f"{name}: DNS lookup timed out") from None
        except dns.resolver.NoNameservers:
            raise _temporary(f"{name}: no DNS server answered {rdtype} (SERVFAIL or refused)") from None
        except (dns.exception.SyntaxError, dns.name.NameTooLong):
            raise _permanent(f"{name}: not a valid domain name") from None
        except dns.exception.DNSException as error:
            raise _temporary(f"{name}: DNS lookup failed ({type(error).__name__})") from None
