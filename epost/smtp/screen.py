"""Connection screening on the relay port (SPEC §5), Postfix postscreen's two cheapest tests.

- **Pregreet**: with `greet_wait` > 0 the session waits that long before its
  `220`; a client that talks first is a bot that does not wait for its turn
  and gets `554 5.5.1` and is dropped (the session does this; see
  `SMTPServer`).
- **DNSBL**: the client's address is looked up in every `dnsbl` zone at
  connect time, in parallel and without blocking the reactor; at its first
  command the weights of the listing zones are summed (epost/smtp/dnsbl.py)
  and a client reaching `dnsbl_threshold` gets `554 5.7.1 Service
  unavailable; client [IP] blocked using ZONE` and is dropped.

The first command waits for lookups still outstanding, but never past
`max(greet_wait, DNSBL_WAIT)` after the connection was made: with a
greet_wait of some seconds the lookups have had that long and nothing waits
at all; with none, a client's first command waits at most 2 s for a slow
DNS server, once per connection. The greeting itself never waits for DNS. A
lookup that fails or has not answered by then counts as "not listed": DNS
trouble never blocks mail. Lookups keep running after that point (up to
the resolver's own timeout), so their answers are cached for the client's
next connection.

Answers are cached by query name for their TTL, clamped to 60 s..1 h
(postscreen_dnsbl_min_ttl / postscreen_dnsbl_max_ttl); concurrent
connections from one client share one query per zone. Clients in
`relay_networks` are never screened (postscreen's `permit_mynetworks`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from epost import metrics
from epost.smtp.dnsbl import DnsblSite, blocking_zone, query_name
from epost.reply import Reply
from epost.smtp.policy import client_address, in_networks

log = Logger(namespace="epost.smtp")

DNSBL_WAIT = 2.0  # seconds after connect the first command may wait for DNSBL answers, at least
MIN_TTL, MAX_TTL = 60, 3600
CACHE_SIZE = 50_000  # query names; a few MB
# Answers in 127.255.255.0/24 are a DNSBL's error codes, not listings (Spamhaus: 127.255.255.254
# "query via public resolver", .255 "excessive queries", .252 "typo in the zone"): a failed lookup.
REFUSED_PREFIX = "127.255.255."
REFUSED_WARNING_INTERVAL = 600.0
PREGREET_REASON, DNSBL_REASON = "pregreet", "dnsbl"  # SessionEvents reasons: log lines, metric labels
PREGREET = Reply(554, "5.5.1", "Error: SMTP protocol violation (talking before the greeting)")


def dnsbl_refusal(ip: str, zone: str) -> Reply:
    return Reply(554, "5.7.1", f"Service unavailable; client [{ip}] blocked using {zone}")


@dataclass(frozen=True)
class Answer:
    """What a DNSBL said about one query name: its A records (empty: not listed) and their TTL."""

    addresses: tuple[str, ...]
    ttl: int


Lookup = Callable[[str], "defer.Deferred[Answer]"]


class TTLCache:
    """Answers by query name until their TTL (clamped to [MIN_TTL, MAX_TTL]) runs out on `clock`.

    Bounded: past `size` entries the oldest entry goes first."""

    def __init__(self, clock: IReactorTime, size: int = CACHE_SIZE):
        self.clock = clock
        self.size = size
        self._entries: OrderedDict[str, tuple[float, Answer]] = OrderedDict()

    def get(self, name: str) -> Answer | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        expires, answer = entry
        if self.clock.seconds() >= expires:
            del self._entries[name]
            return None
        return answer

    def put(self, name: str, answer: Answer) -> None:
        ttl = min(max(answer.ttl, MIN_TTL), MAX_TTL)
        self._entries.pop(name, None)
        self._entries[name] = (self.clock.seconds() + ttl, answer)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class DnsblChecker:
    """Looks a client up in every zone, through the cache; one query per name in flight."""

    def __init__(self, sites: Sequence[DnsblSite], threshold: int, lookup: Lookup, clock: IReactorTime, cache: TTLCache | None = None):
        self.sites = tuple(sites)
        self.zones = tuple(dict.fromkeys(site.zone for site in self.sites))
        self.threshold = threshold
        self.lookup = lookup
        self.clock = clock
        self.cache = cache or TTLCache(clock)
        self._in_flight: dict[str, list[defer.Deferred]] = {}
        self._refused_warned: dict[str, float] = {}

    def blocking_zone(self, answers: dict[str, tuple[str, ...]]) -> str | None:
        return blocking_zone(self.sites, answers, self.threshold)

    def query(self, ip: str, zone: str) -> defer.Deferred:
        """Fires with the zone's A answers for `ip` (empty: not listed), or None when the lookup failed."""
        name = query_name(ip, zone)
        cached = self.cache.get(name)
        if cached is not None:
            return defer.succeed(cached.addresses)
        waiting = self._in_flight.get(name)
        result: defer.Deferred = defer.Deferred()
        if waiting is not None:
            waiting.append(result)
            return result
        self._in_flight[name] = [result]
        defer.maybeDeferred(self.lookup, name).addBoth(self._answered, name, zone)
        return result

    def _warn_refused(self, zone: str, name: str, addresses: tuple[str, ...]) -> None:
        """At most one warning per zone in REFUSED_WARNING_INTERVAL: it repeats for every client."""
        now = self.clock.seconds()
        if now < self._refused_warned.get(zone, float("-inf")) + REFUSED_WARNING_INTERVAL:
            return
        self._refused_warned[zone] = now
        log.warn(
            "dnsbl {zone} refused to answer ({name} -> {answer}): it does not serve queries relayed by"
            " public or shared resolvers (Spamhaus), or wants a key; set [routing] dns_servers to a resolver"
            " of your own. Counted as not listed.",
            zone=zone,
            name=name,
            answer=", ".join(addresses),
        )

    def _answered(self, outcome, name: str, zone: str) -> None:
        if isinstance(outcome, Failure):
            metrics.dnsbl_lookups.labels(zone=zone, result="error").inc()
            log.info("dnsbl lookup failed: {name}: {error}", name=name, error=outcome.getErrorMessage() or outcome.type.__name__)
            addresses = None
        elif any(address.startswith(REFUSED_PREFIX) for address in outcome.addresses):
            metrics.dnsbl_lookups.labels(zone=zone, result="error").inc()
            self._warn_refused(zone, name, outcome.addresses)
            addresses = None
        else:
            addresses = outcome.addresses
            metrics.dnsbl_lookups.labels(zone=zone, result="listed" if addresses else "clean").inc()
            self.cache.put(name, outcome)
        for waiter in self._in_flight.pop(name, []):
            waiter.callback(addresses)


class ClientScreen:
    """One connection's screening: its greet wait, and the DNSBL verdict at its first command."""

    def __init__(self, ip: str, greet_wait: float, checker: DnsblChecker | None, clock: IReactorTime):
        self.ip = ip
        self.greet_wait = greet_wait
        self._checker = checker
        self._answers: dict[str, tuple[str, ...]] = {}
        self._pending = 0
        self._waiters: list[defer.Deferred] = []
        self._deadline = None
        if checker is None:
            return
        for zone in checker.zones:
            self._pending += 1
            checker.query(ip, zone).addCallback(self._answered, zone)
        if self._pending:
            self._deadline = clock.callLater(max(greet_wait, DNSBL_WAIT), self._settle)

    def _answered(self, addresses: tuple[str, ...] | None, zone: str) -> None:
        if self._pending == 0:  # settled already: too late for this connection, cached for the next
            return
        if addresses is not None:
            self._answers[zone] = addresses
        self._pending -= 1
        if self._pending == 0:
            self._settle()

    def _settle(self) -> None:
        self._pending = 0
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._refusal())

    def _refusal(self) -> Reply | None:
        if self._checker is None:
            return None
        zone = self._checker.blocking_zone(self._answers)
        return None if zone is None else dnsbl_refusal(self.ip, zone)

    def verdict(self) -> defer.Deferred:
        """Fires with the refusal to send (a Reply) or None, once every lookup has
        answered or the deadline has passed; at once when that is already so."""
        if self._pending == 0:
            return defer.succeed(self._refusal())
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def close(self) -> None:
        """The connection is gone: stop the deadline timer (the lookups finish into the cache)."""
        self._waiters = []
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._pending = 0


class Screening:
    """The relay listener's screening, shared by its sessions: which clients are
    screened and how. Built only when `greet_wait` or `dnsbl` is set."""

    def __init__(self, clock: IReactorTime, greet_wait: float, relay_networks: Iterable, checker: DnsblChecker | None = None):
        self.clock = clock
        self.greet_wait = greet_wait
        self.relay_networks = tuple(relay_networks)
        self.checker = checker

    def exempt(self, ip: str) -> bool:
        """Trusted clients (relay_networks) and peers without an IP address (a UNIX socket)."""
        return client_address(ip) is None or in_networks(ip, self.relay_networks)

    def for_client(self, ip: str) -> ClientScreen | None:
        """Starts the DNSBL lookups of a new connection; None when the client is not screened."""
        if self.exempt(ip):
            return None
        return ClientScreen(str(client_address(ip)), self.greet_wait, self.checker, self.clock)


def names_lookup(reactor, servers: Sequence[tuple[str, int]], timeout: Sequence[int] = (1, 3)) -> Lookup:
    """A Lookup over twisted.names: UDP on the reactor, no threads; each query tries every
    server with each timeout in turn (with one server: 1 s, then 3 s). NXDOMAIN and NODATA
    are "not listed", with the negative TTL from the SOA when there is one; any other
    failure (timeout, SERVFAIL, REFUSED) fails the Deferred."""
    from twisted.names import client, dns, error

    resolver = client.Resolver(servers=list(servers), reactor=reactor, timeout=tuple(timeout))

    def negative_ttl(authority) -> int:
        ttls = [min(r.ttl, r.payload.minimum) for r in authority if r.type == dns.SOA]
        return min(ttls, default=MIN_TTL)

    def answered(result) -> Answer:
        answers, authority, _additional = result
        records = [r for r in answers if r.type == dns.A]
        if not records:
            return Answer((), negative_ttl(authority))
        return Answer(tuple(r.payload.dottedQuad() for r in records), min(r.ttl for r in records))

    def not_found(failure: Failure) -> Answer:
        failure.trap(error.DNSNameError)  # NXDOMAIN only: REFUSED, SERVFAIL... are DomainErrors too
        message = failure.value.args[0] if failure.value.args else None
        return Answer((), negative_ttl(getattr(message, "authority", [])))

    def lookup(name: str) -> defer.Deferred:
        return resolver.lookupAddress(name).addCallbacks(answered, not_found)

    return lookup


def system_dns_servers() -> list[tuple[str, int]]:
    """The servers of /etc/resolv.conf (read once, at start), as dnspython finds them."""
    import dns.resolver

    try:
        return [(server, 53) for server in dns.resolver.Resolver(configure=True).nameservers]
    except dns.resolver.NoResolverConfiguration:
        return [("127.0.0.1", 53)]


def build_screening(config, reactor) -> Screening | None:
    """The relay listener's screening from `[server]` (greet_wait, dnsbl, dnsbl_threshold,
    relay_networks) and `[routing] dns_servers`; None when both tests are off."""
    server = config.server
    if not server.greet_wait and not server.dnsbl:
        return None
    checker = None
    if server.dnsbl:
        servers = [(s.host, s.port) for s in config.routing.dns_servers] or system_dns_servers()
        checker = DnsblChecker(server.dnsbl, server.dnsbl_threshold, names_lookup(reactor, servers), reactor)
    return Screening(reactor, server.greet_wait, server.relay_networks, checker)
