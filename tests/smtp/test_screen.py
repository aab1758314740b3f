"""Screening's DNSBL side (epost/smtp/screen.py): the TTL cache, shared lookups, the verdict's
deadline over task.Clock, who is exempt, and the twisted.names lookup against a real dnsmasq."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest

from epost import metrics
from epost.smtp.dnsbl import parse_dnsbl_site
from epost.smtp.screen import (
    DNSBL_WAIT,
    MAX_TTL,
    MIN_TTL,
    Answer,
    DnsblChecker,
    Screening,
    TTLCache,
    dnsbl_refusal,
    names_lookup,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "routing"))
from dnsmasq import DNSMASQ, Dnsmasq  # noqa: E402

ZEN, COP = "zen.example", "cop.example"
CLIENT = "192.0.2.99"
RELAY_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


class FakeDNS:
    """A Lookup whose answers the test gives, one pending Deferred per query name."""

    def __init__(self):
        self.asked: list[str] = []
        self.pending: dict[str, list[defer.Deferred]] = {}

    def __call__(self, name: str) -> defer.Deferred:
        self.asked.append(name)
        d = defer.Deferred()
        self.pending.setdefault(name, []).append(d)
        return d

    def answer(self, name: str, *addresses: str, ttl: int = 300) -> None:
        self.pending.pop(name).pop(0).callback(Answer(tuple(addresses), ttl))

    def fail(self, name: str, error: Exception) -> None:
        self.pending.pop(name).pop(0).errback(error)


def counted(zone: str, result: str) -> float:
    return metrics.REGISTRY.get_sample_value("epost_dnsbl_lookups_total", {"zone": zone, "result": result}) or 0.0


# ---- the cache ----------------------------------------------------------------------------------


class TTLCacheTests(unittest.TestCase):
    def test_an_answer_lives_for_its_ttl(self):
        clock = task.Clock()
        cache = TTLCache(clock)
        cache.put("a", Answer(("127.0.0.2",), 300))
        clock.advance(299.9)
        self.assertEqual(cache.get("a"), Answer(("127.0.0.2",), 300))
        clock.advance(0.1)
        self.assertIsNone(cache.get("a"))
        self.assertEqual(len(cache), 0)

    def test_ttls_are_clamped_to_a_minute_and_an_hour(self):
        clock = task.Clock()
        cache = TTLCache(clock)
        cache.put("zero", Answer((), 0))  # dnsmasq's default TTL for its own records
        cache.put("week", Answer(("127.0.0.2",), 7 * 86400))
        clock.advance(MIN_TTL - 1)
        self.assertIsNotNone(cache.get("zero"))
        clock.advance(1)
        self.assertIsNone(cache.get("zero"))
        clock.advance(MAX_TTL - MIN_TTL - 1)
        self.assertIsNotNone(cache.get("week"))
        clock.advance(1)
        self.assertIsNone(cache.get("week"))

    def test_a_full_cache_forgets_the_oldest_first(self):
        cache = TTLCache(task.Clock(), size=3)
        for name in "abcd":
            cache.put(name, Answer((), 300))
        self.assertEqual([cache.get(n) is not None for n in "abcd"], [False, True, True, True])
        cache.put("b", Answer((), 300))  # renewed: now the newest
        cache.put("e", Answer((), 300))
        self.assertEqual([cache.get(n) is not None for n in "bcde"], [True, False, True, True])


# ---- the checker ----------------------------------------------------------------------------------


def checker(dns: FakeDNS, clock: task.Clock, *entries: str, threshold: int = 1) -> DnsblChecker:
    sites = [parse_dnsbl_site(e) for e in (entries or (f"{ZEN}*2", f"{COP}"))]
    return DnsblChecker(sites, threshold, dns, clock)


class DnsblCheckerTests(unittest.TestCase):
    def setUp(self):
        self.clock, self.dns = task.Clock(), FakeDNS()
        self.checker = checker(self.dns, self.clock)

    def test_one_query_per_name_in_flight_and_the_answer_cached_for_its_ttl(self):
        first, second = self.checker.query(CLIENT, ZEN), self.checker.query(CLIENT, ZEN)
        self.assertEqual(self.dns.asked, ["99.2.0.192.zen.example"])
        self.dns.answer("99.2.0.192.zen.example", "127.0.0.2", ttl=120)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (("127.0.0.2",), ("127.0.0.2",)))
        self.clock.advance(119)
        self.assertEqual(self.successResultOf(self.checker.query(CLIENT, ZEN)), ("127.0.0.2",))
        self.assertEqual(len(self.dns.asked), 1)
        self.clock.advance(1)
        self.checker.query(CLIENT, ZEN)
        self.assertEqual(len(self.dns.asked), 2)

    def test_a_failed_lookup_is_none_and_not_cached(self):
        before = counted(ZEN, "error")
        result = self.checker.query(CLIENT, ZEN)
        self.dns.fail("99.2.0.192.zen.example", OSError("timeout"))
        self.assertIsNone(self.successResultOf(result))
        self.assertEqual(counted(ZEN, "error"), before + 1)
        self.checker.query(CLIENT, ZEN)
        self.assertEqual(len(self.dns.asked), 2)

    def test_a_spamhaus_error_code_is_a_failure_warned_once_per_zone_in_ten_minutes(self):
        with capturedLogs() as events:
            for ip in ("192.0.2.1", "192.0.2.2"):
                result = self.checker.query(ip, ZEN)
                self.dns.answer(query_name_of(ip, ZEN), "127.255.255.254")
                self.assertIsNone(self.successResultOf(result))
            self.clock.advance(600)
            result = self.checker.query("192.0.2.3", ZEN)
            self.dns.answer(query_name_of("192.0.2.3", ZEN), "127.255.255.254")
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        self.assertIn("dns_servers", warnings[0]["log_format"])
        self.assertEqual(len(self.checker.cache), 0)


def query_name_of(ip: str, zone: str) -> str:
    from epost.smtp.dnsbl import query_name

    return query_name(ip, zone)


# ---- one connection's verdict ----------------------------------------------------------------------


class ClientScreenTests(unittest.TestCase):
    def setUp(self):
        self.clock, self.dns = task.Clock(), FakeDNS()

    def screening(self, greet_wait: float = 0, *entries: str, threshold: int = 1) -> Screening:
        return Screening(self.clock, greet_wait, RELAY_NETWORKS, checker(self.dns, self.clock, *entries, threshold=threshold))

    def test_lookups_start_at_connect_in_parallel_in_every_zone(self):
        self.screening().for_client(CLIENT)
        self.assertEqual(sorted(self.dns.asked), ["99.2.0.192.cop.example", "99.2.0.192.zen.example"])

    def test_a_listed_client_is_refused_naming_the_zone(self):
        screen = self.screening().for_client(CLIENT)
        self.dns.answer("99.2.0.192.zen.example", "127.0.0.2")
        verdict = screen.verdict()
        self.assertNoResult(verdict)  # cop.example has not answered yet
        self.dns.answer("99.2.0.192.cop.example")
        self.assertEqual(self.successResultOf(verdict), dnsbl_refusal(CLIENT, ZEN))
        self.assertEqual(str(dnsbl_refusal(CLIENT, ZEN).encode(), "ascii"), "554 5.7.1 Service unavailable; client [192.0.2.99] blocked using zen.example\r\n")

    def test_below_the_threshold_the_client_passes(self):
        screen = self.screening(0, f"{ZEN}*2", f"{COP}", threshold=3).for_client(CLIENT)
        self.dns.answer("99.2.0.192.zen.example", "127.0.0.2")
        self.dns.answer("99.2.0.192.cop.example")
        self.assertIsNone(self.successResultOf(screen.verdict()))

    def test_dns_failure_never_blocks(self):
        screen = self.screening().for_client(CLIENT)
        self.dns.fail("99.2.0.192.zen.example", OSError("SERVFAIL"))
        self.dns.fail("99.2.0.192.cop.example", OSError("refused"))
        self.assertIsNone(self.successResultOf(screen.verdict()))

    def test_a_silent_dns_server_holds_the_first_command_at_most_dnsbl_wait_after_connect(self):
        screen = self.screening().for_client(CLIENT)
        self.clock.advance(0.5)  # the client's first command comes half a second after connect
        verdict = screen.verdict()
        self.clock.advance(DNSBL_WAIT - 0.5 - 0.01)
        self.assertNoResult(verdict)
        self.clock.advance(0.01)
        self.assertIsNone(self.successResultOf(verdict))
        # an answer after the deadline is too late for this connection, but cached for the next
        self.dns.answer("99.2.0.192.zen.example", "127.0.0.2")
        self.assertIsNone(self.successResultOf(screen.verdict()))

    def test_with_a_greet_wait_the_lookups_have_until_its_end_and_nothing_waits_after_it(self):
        screen = self.screening(6).for_client(CLIENT)
        self.clock.advance(5.9)
        self.dns.answer("99.2.0.192.zen.example", "127.0.0.2")
        self.clock.advance(0.1)  # the greeting goes out now; cop.example never answered
        self.assertEqual(self.successResultOf(screen.verdict()), dnsbl_refusal(CLIENT, ZEN))

    def test_a_late_answer_is_cached_for_the_clients_next_connection(self):
        screening = self.screening()
        screening.for_client(CLIENT).verdict()
        self.clock.advance(DNSBL_WAIT)
        self.dns.answer("99.2.0.192.zen.example", "127.0.0.2")
        self.dns.answer("99.2.0.192.cop.example")
        screen = screening.for_client(CLIENT)
        self.assertEqual(len(self.dns.asked), 2)  # both answers came from the cache
        self.assertEqual(self.successResultOf(screen.verdict()), dnsbl_refusal(CLIENT, ZEN))

    def test_closing_the_connection_stops_its_timer(self):
        screen = self.screening().for_client(CLIENT)
        screen.verdict()
        screen.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.dns.answer("99.2.0.192.zen.example", "127.0.0.2")  # arrives into the cache, harmlessly

    def test_relay_networks_and_socket_peers_are_never_screened(self):
        screening = self.screening(6)
        for ip in ("127.0.0.1", "10.1.2.3", "::1", "::ffff:10.1.2.3", "", "not-an-ip"):
            self.assertIsNone(screening.for_client(ip), ip)
        self.assertEqual(self.dns.asked, [])
        self.assertIsNotNone(screening.for_client("2001:db8::1"))

    def test_an_ipv6_client_is_looked_up_by_its_nibbles(self):
        screen = self.screening().for_client("2001:db8::1")
        name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.example"
        self.assertIn(name, self.dns.asked)
        self.dns.answer(name, "127.0.0.2")
        self.dns.answer(name.replace("zen", "cop"))
        self.assertEqual(self.successResultOf(screen.verdict()), dnsbl_refusal("2001:db8::1", ZEN))

    def test_pregreet_only_screening_looks_nothing_up(self):
        screen = Screening(self.clock, 6, RELAY_NETWORKS).for_client(CLIENT)
        self.assertEqual(screen.greet_wait, 6)
        self.assertIsNone(self.successResultOf(screen.verdict()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


# ---- the twisted.names lookup against a real DNS server -------------------------------------------

RECORDS = [
    "--host-record=2.0.0.127.zen.test,127.0.0.2",
    "--host-record=3.0.0.127.zen.test,127.0.0.4",
    "--host-record=3.0.0.127.zen.test,127.0.0.10",
    "--host-record=1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.test,127.0.0.3",
    "--txt-record=4.0.0.127.zen.test,only a TXT record",
    "--local-ttl=120",
]


class NamesLookupTests(unittest.TestCase):
    def setUp(self):
        if DNSMASQ is None:
            self.skipTest("dnsmasq is not installed (Debian: dnsmasq-base)")
        server = Dnsmasq(RECORDS)
        self.addCleanup(server.cleanup)
        server.start()
        from twisted.internet import reactor

        self.lookup = names_lookup(reactor, [("127.0.0.1", server.port)])

    @defer.inlineCallbacks
    def test_listed_unlisted_and_nodata(self):
        self.assertEqual((yield self.lookup("2.0.0.127.zen.test")), Answer(("127.0.0.2",), 120))
        self.assertEqual(sorted((yield self.lookup("3.0.0.127.zen.test")).addresses), ["127.0.0.10", "127.0.0.4"])
        self.assertEqual((yield self.lookup("1.0.0.127.zen.test")).addresses, ())  # NXDOMAIN
        self.assertEqual((yield self.lookup("4.0.0.127.zen.test")).addresses, ())  # NODATA

    @defer.inlineCallbacks
    def test_ipv6_nibble_name(self):
        from epost.smtp.dnsbl import query_name

        self.assertEqual((yield self.lookup(query_name("2001:db8::1", "zen.test"))).addresses, ("127.0.0.3",))

    @defer.inlineCallbacks
    def test_refused_fails(self):
        # dnsmasq has no upstream: a name outside its zone is REFUSED, as a DNSBL refusing us would be
        yield self.assertFailure(self.lookup("2.0.0.127.elsewhere.example"), Exception)


class SilentServerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_silent_server_fails_the_lookup_after_its_timeouts(self):
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        from twisted.internet import reactor

        lookup = names_lookup(reactor, [("127.0.0.1", silent.getsockname()[1])], timeout=(0.2, 0.3))
        started = reactor.seconds()
        yield self.assertFailure(lookup("2.0.0.127.zen.test"), Exception)
        self.assertLess(reactor.seconds() - started, 2)
