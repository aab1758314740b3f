"""Recipient verification by probe (SPEC §3.5): verdicts, their cache, and
the one probe per address in flight.

`Verifier.verdict(address, route)` answers at once from the cache (a
`Verdict`), or returns a Deferred firing with a Verdict within the budget
(8 s) whatever the next hop does. Accepted verdicts are kept 1 day, refused
ones 1 hour, temporary ones not at all. Every session asking about an
address that is being probed waits for that probe; addresses for the same
next hop waiting together go into one probe session; at most
`max_per_destination` probe sessions run per next hop (the outbound limit of
[delivery]). The cache is saved in the spool (`verify.cache`, JSON) every
few seconds when it changed and at stop, so a restart does not re-probe
everything; a damaged file is set aside with one log line.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epost import metrics
from epost.delivery.courier import Attempt
from epost.delivery.smtp_client import Outcome
from epost.fsutil import write_atomically
from epost.logs import printable
from epost.routing.resolver import Route

log = Logger()

ACCEPTED, REFUSED, TEMPORARY = "accepted", "refused", "temporary"
ACCEPTED_TTL = 24 * 3600  # seconds a positive verdict is trusted
REFUSED_TTL = 3600  # seconds a negative one is
CACHE_FILE = "verify.cache"
MAX_ENTRIES = 200_000  # a flood of random addresses cannot grow the cache without bound
MAX_BATCH = 20  # addresses asked in one probe session
# Addresses waiting for a probe session, per next hop: past it a new address is
# answered temporary at once (450), so a flood of random RCPTs while the
# sessions are busy cannot grow the queue without bound.
MAX_QUEUED = 1000
SAVE_INTERVAL = 5.0  # seconds between saves of a changed cache
TEXT_LIMIT = 300  # characters of the next hop's reply carried in ours


@dataclass(frozen=True)
class Verdict:
    """What the next hop said about one address: `status` accepted, refused
    or temporary; `text` its reply (or why there was none), one printable
    line; `host` who said it; `expires` (Unix time) for a cached verdict."""

    status: str
    text: str
    host: str | None = None
    expires: float = 0.0


def verdict_for(outcome: Outcome, host: str | None) -> Verdict:
    """The verdict one probe outcome gives (pure).

    2xx at RCPT: accepted. 5xx at RCPT, or DNS saying the domain cannot
    take mail: refused. Anything else is temporary: 4xx, no answer, and a
    5xx to the greeting, EHLO or `MAIL FROM:<>` too, which refuses the probe
    rather than the address (RFC 5321 §4.5.5 asks every server to take the
    null sender) and must not turn into an hour of refused mail."""
    text = printable(f"{outcome.code} {outcome.text}" if outcome.code is not None else outcome.text, TEXT_LIMIT)
    if outcome.code is not None and outcome.stage == "rcpt" and outcome.code // 100 == 2:
        return Verdict(ACCEPTED, text, host)
    if outcome.code is not None and outcome.code // 100 == 5 and outcome.stage in ("rcpt", "dns"):
        return Verdict(REFUSED, text, host)
    return Verdict(TEMPORARY, text, host)


def with_expiry(verdict: Verdict, now: float) -> Verdict:
    ttl = ACCEPTED_TTL if verdict.status == ACCEPTED else REFUSED_TTL
    return Verdict(verdict.status, verdict.text, verdict.host, now + ttl)


def cache_key(address: str) -> str:
    """The domain case-folded (domains ignore case), the local part as given:
    RFC 5321 §2.4 leaves its case to the next hop, and a verdict is about the
    exact address relayed there (a case-sensitive next hop that refuses `Bob`
    but takes `bob` must not have us accept mail for `Bob`, then bounce it)."""
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}" if at else address


class VerdictCache:
    """Accepted and refused verdicts per address, until they expire; kept in `path`."""

    def __init__(self, path: Path | None, clock: Callable[[], float], max_entries: int = MAX_ENTRIES) -> None:
        self.path = Path(path) if path is not None else None
        self.clock = clock
        self.max_entries = max_entries
        self.entries: OrderedDict[str, Verdict] = OrderedDict()
        self.dirty = False

    def get(self, address: str) -> Verdict | None:
        key = cache_key(address)
        verdict = self.entries.get(key)
        if verdict is not None and verdict.expires <= self.clock():
            del self.entries[key]
            self.dirty = True
            return None
        return verdict

    def put(self, address: str, verdict: Verdict) -> Verdict:
        """Keep an accepted or refused verdict (a temporary one is not kept); the verdict with its expiry."""
        if verdict.status == TEMPORARY:
            return verdict
        verdict = with_expiry(verdict, self.clock())
        key = cache_key(address)
        self.entries.pop(key, None)
        self.entries[key] = verdict
        self.dirty = True
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)  # the oldest verdict goes first
        return verdict

    def __len__(self) -> int:
        return len(self.entries)

    # --- the file ----------------------------------------------------------

    def serialize(self) -> bytes:
        now = self.clock()
        entries = {a: [v.status, v.text, v.host, v.expires] for a, v in self.entries.items() if v.expires > now}
        return json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()

    def load(self) -> None:
        """Read the file; a missing one is an empty cache, a damaged one is
        renamed `verify.cache.damaged` (one log line) and the cache starts empty."""
        if self.path is None:
            return
        try:
            self.entries = parse_cache(self.path.read_bytes(), self.clock())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            aside = self.path.with_name(self.path.name + ".damaged")
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            log.error(
                "{path}: damaged verification cache set aside as {aside} ({error}); verifying with an empty cache",
                path=self.path, aside=aside.name, error=error,
            )
            self.entries = OrderedDict()

    def save(self) -> None:
        """Write the file now (blocking)."""
        if self.path is not None:
            data = self.serialize()
            self.dirty = False
            write_atomically(self.path, data)


def parse_cache(data: bytes, now: float) -> OrderedDict[str, Verdict]:
    """The cache file's unexpired verdicts; ValueError when it is not one."""
    document = json.loads(data)
    if not isinstance(document, dict) or document.get("version") != 1 or not isinstance(document.get("entries"), dict):
        raise ValueError("not an epost verification cache (version 1)")
    entries: OrderedDict[str, Verdict] = OrderedDict()
    for address, value in document["entries"].items():
        if not (isinstance(value, list) and len(value) == 4):
            raise ValueError(f"bad entry for {address!r}")
        status, text, host, expires = value
        if status not in (ACCEPTED, REFUSED) or not isinstance(text, str) or not isinstance(expires, (int, float)):
            raise ValueError(f"bad entry for {address!r}")
        if host is not None and not isinstance(host, str):
            raise ValueError(f"bad entry for {address!r}")
        if expires > now:
            entries[cache_key(address)] = Verdict(status, text, host, float(expires))
    return entries


def destination_key(route: Route) -> tuple:
    """Probes for one next hop share sessions and its connection limit."""
    return (route.hosts, route.mx_domain)


class Verifier:
    """Verdicts for addresses: from the cache, else from one probe per address in flight.

    `probe(route, addresses)` -> Deferred[Attempt] (epost.delivery.probe.Prober.probe)."""

    def __init__(
        self,
        reactor,
        cache: VerdictCache,
        probe: Callable[[Route, list[str]], defer.Deferred[Attempt]],
        *,
        budget: float = 8.0,
        max_per_destination: int = 10,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.reactor = reactor
        self.cache = cache
        self.probe = probe
        self.budget = budget
        self.max_per_destination = max_per_destination
        self.max_batch = max_batch
        self._waiting: dict[str, list[defer.Deferred[Verdict]]] = {}  # cache key -> sessions waiting for its probe
        # next hop -> addresses not yet in a probe session, as the first session to ask gave them
        self._queued: dict[tuple, list[str]] = {}
        self._routes: dict[tuple, Route] = {}
        self._active: dict[tuple, int] = {}  # next hop -> probe sessions running
        self.probes = 0  # probe sessions started
        self.probed = 0  # addresses asked about
        self._saver: task.LoopingCall | None = None
        self._saving = False

    def cached(self, address: str) -> Verdict | None:
        return self.cache.get(address)

    def verdict(self, address: str, route: Route | dict, fresh: bool = False) -> Verdict | defer.Deferred[Verdict]:
        """The cached verdict at once, or a Deferred firing within the budget;
        `fresh` (epost verify) skips the cache."""
        if not fresh:
            verdict = self.cache.get(address)
            if verdict is not None:
                metrics.verify_cache.labels("hit").inc()
                return verdict
            metrics.verify_cache.labels("miss").inc()
        if isinstance(route, dict):
            route = Route.from_dict(route)
        key = cache_key(address)
        destination = destination_key(route)
        if key not in self._waiting and len(self._queued.get(destination, ())) >= MAX_QUEUED:
            return Verdict(TEMPORARY, "too many addresses waiting for verification at the next hop")
        waiter: defer.Deferred[Verdict] = defer.Deferred(lambda d: self._drop_waiter(key, d))
        timer = self.reactor.callLater(self.budget, self._too_late, key, waiter)
        waiter.addBoth(self._stop_timer, timer)
        if key in self._waiting:
            self._waiting[key].append(waiter)
            return waiter
        self._waiting[key] = [waiter]
        self._routes.setdefault(destination, route)
        self._queued.setdefault(destination, []).append(address)  # the probe asks for it as given
        self._pump(destination)
        return waiter

    @staticmethod
    def _stop_timer(result, timer):
        if timer.active():
            timer.cancel()
        return result

    def _drop_waiter(self, key: str, waiter) -> None:
        waiters = self._waiting.get(key)
        if waiters and waiter in waiters:
            waiters.remove(waiter)

    def _too_late(self, key: str, waiter: defer.Deferred[Verdict]) -> None:
        """No verdict within the budget: this session gets a temporary one; the
        probe goes on and its verdict is cached for the client's retry."""
        self._drop_waiter(key, waiter)
        if not waiter.called:
            waiter.callback(Verdict(TEMPORARY, f"no verdict from the next hop within {self.budget:g} s"))

    def _pump(self, destination: tuple) -> None:
        queued = self._queued.get(destination)
        while queued and self._active.get(destination, 0) < self.max_per_destination:
            batch, queued[:] = queued[: self.max_batch], queued[self.max_batch :]
            self._active[destination] = self._active.get(destination, 0) + 1
            self._start(destination, batch)
        if not queued:
            self._queued.pop(destination, None)
            if not self._active.get(destination):
                self._routes.pop(destination, None)

    def _start(self, destination: tuple, addresses: list[str]) -> None:
        route = self._routes[destination]
        started = self.reactor.seconds()
        self.probes += 1
        self.probed += len(addresses)
        d = defer.maybeDeferred(self.probe, route, addresses)
        closed = getattr(d, "closed", None)  # Prober: the connections are gone too
        d.addCallbacks(self._answered, self._probe_failed, (addresses, started), None, (addresses,))
        (closed if closed is not None else d).addBoth(self._session_over, destination)

    def _answered(self, attempt: Attempt, addresses: list[str], started: float) -> None:
        metrics.verify_probe_seconds.observe(max(0.0, self.reactor.seconds() - started))
        for address in addresses:
            outcome = attempt.outcomes.get(address, Outcome(None, "no answer", "connect"))
            self._settle(address, verdict_for(outcome, attempt.host))

    def _probe_failed(self, failure, addresses: list[str]) -> None:
        log.failure("address verification probe failed", failure)
        for address in addresses:
            self._settle(address, Verdict(TEMPORARY, f"internal error: {failure.getErrorMessage()}"))

    def _settle(self, address: str, verdict: Verdict) -> None:
        verdict = self.cache.put(address, verdict)
        for waiter in self._waiting.pop(cache_key(address), []):
            if not waiter.called:
                waiter.callback(verdict)

    def _session_over(self, _, destination: tuple) -> None:
        self._active[destination] -= 1
        if not self._active[destination]:
            del self._active[destination]
        self._pump(destination)

    # --- the file ----------------------------------------------------------

    def start(self, threadpool=None) -> None:
        """Load the cache and save it every SAVE_INTERVAL seconds when it changed."""
        self.cache.load()
        self._threadpool = threadpool
        self._saver = task.LoopingCall(self.save_soon)
        self._saver.clock = self.reactor
        self._saver.start(SAVE_INTERVAL, now=False)

    def save_soon(self) -> defer.Deferred | None:
        if not self.cache.dirty or self._saving or self.cache.path is None:
            return None
        self._saving = True
        data = self.cache.serialize()
        self.cache.dirty = False
        write = (lambda: write_atomically(self.cache.path, data))
        d = deferToThreadPool(self.reactor, self._threadpool, write) if self._threadpool is not None else defer.maybeDeferred(write)

        def failed(failure):
            self.cache.dirty = True
            log.error("{path}: cannot save the verification cache: {error}", path=self.cache.path, error=failure.value)

        d.addErrback(failed)
        d.addBoth(lambda _: setattr(self, "_saving", False))
        return d

    def stop(self) -> None:
        if self._saver is not None and self._saver.running:
            self._saver.stop()
        if self.cache.dirty:
            try:
                self.cache.save()
            except OSError as error:
                log.error("{path}: cannot save the verification cache: {error}", path=self.cache.path, error=error)


def read_cached(spool: Path, address: str, now: float) -> Verdict | None:
    """The saved verdict for `address` in the spool's cache file (for `epost route`); None when none or unreadable."""
    try:
        entries = parse_cache((Path(spool) / CACHE_FILE).read_bytes(), now)
    except (OSError, ValueError):
        return None
    return entries.get(cache_key(address))


class VerifierService(Service):
    """Loads the verification cache at start, saves it while running and at stop."""

    def __init__(self, verifier: Verifier, threadpool=None) -> None:
        self.verifier = verifier
        self.threadpool = threadpool

    def startService(self) -> None:
        super().startService()
        self.verifier.start(self.threadpool)

    def stopService(self) -> None:
        super().stopService()
        self.verifier.stop()


def make_verifier(config, reactor, dns_pool) -> Verifier:
    """The daemon's verifier: probes from the daemon with the outbound client
    (STARTTLS when offered), at most [delivery] max_per_destination probe
    sessions per next hop, the cache in `<spool>/verify.cache`."""
    from epost.delivery.probe import PROBE_BUDGET, Prober
    from epost.routing.dns import MXResolver
    from epost.tls import client_context

    resolver = MXResolver(reactor, dns_pool, config.routing.dns_servers, timeout=PROBE_BUDGET)
    prober = Prober(reactor, resolver, config.server.hostname, client_context(), PROBE_BUDGET)
    cache = VerdictCache(Path(config.server.spool) / CACHE_FILE, reactor.seconds)
    return Verifier(reactor, cache, prober.probe, budget=PROBE_BUDGET, max_per_destination=config.delivery.max_per_destination)


def verify_now(verifier: Verifier, route_final: Callable, address_text: str) -> defer.Deferred[Verdict]:
    """`epost verify`: probe `address_text` now, whatever the cache says, and
    cache the verdict; ValueError for an address that is not sent onward over SMTP."""
    from epost.address import parse_mailbox

    address = parse_mailbox(address_text)
    route = route_final(address)
    if route.kind != "relay":
        raise ValueError(f"{address}: not verified: its route is {route.kind} via {route.rule}")
    return defer.maybeDeferred(verifier.verdict, str(address), route, True)
