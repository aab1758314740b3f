"""Routing step 5: MX ordering, and MXResolver against a real dnsmasq on loopback."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

from dnsmasq import DNSMASQ, Dnsmasq
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from epost.config import HostPort
from epost.routing.dns import DNSError, MXHost, MXResolver, order_mx, read_hosts

# ---- order_mx: a pure function --------------------------------------------------------------

hosts = st.sampled_from(["a.test", "b.test", "c.test", "d.test", "e.test", "f.test"])
records = st.lists(st.builds(MXHost, hosts, st.integers(0, 3) | st.integers(0, 65535)), max_size=12)


@given(records, st.integers())
def test_order_mx_is_sorted_by_best_preference_and_lists_each_host_once(mx: list[MXHost], seed: int) -> None:
    ordered = order_mx(mx, random.Random(seed))
    best = {r.host: min(o.preference for o in mx if o.host == r.host) for r in mx}
    assert sorted(ordered) == sorted(best)
    assert [best[h] for h in ordered] == sorted(best[h] for h in ordered)


@given(records, st.integers(), st.randoms(use_true_random=False))
def test_order_mx_depends_only_on_the_records_and_the_seed(mx: list[MXHost], seed: int, shuffler: random.Random) -> None:
    shuffled = list(mx)
    shuffler.shuffle(shuffled)
    assert order_mx(mx, random.Random(seed)) == order_mx(shuffled, random.Random(seed))


def test_order_mx_puts_equal_preferences_in_every_order_over_seeds() -> None:
    mx = [MXHost("a.test", 10), MXHost("b.test", 10), MXHost("c.test", 10), MXHost("backup.test", 20)]
    seen = {tuple(order_mx(mx, random.Random(seed))) for seed in range(200)}
    assert {o[-1] for o in seen} == {"backup.test"}
    assert len(seen) == 6  # all permutations of a, b, c


def test_mx_host_is_lower_case_without_the_trailing_dot() -> None:
    assert MXHost("MX1.Example.JP.", 10) == MXHost("mx1.example.jp", 10)
    assert MXHost(".", 0).host == ""


def test_hosts_file_parser_skips_comments_and_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(
        "# comment\n127.0.0.1 localhost\n\n2001:db8::1  Mail.Example.JP. mail # trailing\n"
        "not-an-ip bogus.example\n192.0.2.1\tmail.example.jp\n127.0.0.1 localhost\n"
    )
    assert read_hosts(path) == {
        "localhost": ["127.0.0.1"],
        "mail.example.jp": ["2001:db8::1", "192.0.2.1"],
        "mail": ["2001:db8::1"],
    }
    assert read_hosts(tmp_path / "missing") == {}


# ---- MXResolver against dnsmasq ------------------------------------------------------------

RECORDS = [
    "--mx-host=pref.test,mx20.pref.test,20",
    "--mx-host=pref.test,MX10.Pref.test,10",
    "--mx-host=pref.test,mx30.pref.test,30",
    "--mx-host=equal.test,a.equal.test,10",
    "--mx-host=equal.test,b.equal.test,10",
    "--mx-host=equal.test,backup.equal.test,20",
    "--mx-host=nullmx.test,.,0",
    "--host-record=implicit.test,192.0.2.7",
    "--host-record=v6only.test,2001:db8::6",
    "--host-record=mx10.pref.test,2001:db8::10,192.0.2.10",
    "--txt-record=noaddr.test,no MX and no address",
]


class ThreadPoolMixin:
    def start_pool(self: unittest.TestCase) -> ThreadPool:
        pool = ThreadPool(minthreads=1, maxthreads=4, name="dns-test")
        pool.start()
        self.addCleanup(pool.stop)
        return pool


class MXResolverTests(ThreadPoolMixin, unittest.TestCase):
    """Real lookups through a thread pool against a real DNS server."""

    def setUp(self) -> None:
        if DNSMASQ is None:
            self.skipTest("dnsmasq is not installed (Debian: dnsmasq-base)")
        server = Dnsmasq(RECORDS)
        self.addCleanup(server.cleanup)
        server.start()
        self.server = HostPort("127.0.0.1", server.port)
        self.pool = self.start_pool()
        self.no_hosts = Path(self.mktemp())  # does not exist: /etc/hosts must not leak in

    def resolver(self, rng: random.Random | None = None, hosts_file: Path | None = None) -> MXResolver:
        from twisted.internet import reactor

        return MXResolver(reactor, self.pool, (self.server,), timeout=5.0, rng=rng, hosts_file=hosts_file or self.no_hosts)

    @defer.inlineCallbacks
    def test_mx_hosts_come_by_preference_lower_case(self):
        hosts = yield self.resolver().resolve_mx("Pref.Test.")
        self.assertEqual(hosts, ["mx10.pref.test", "mx20.pref.test", "mx30.pref.test"])

    @defer.inlineCallbacks
    def test_equal_preferences_come_in_both_orders_over_seeds(self):
        seen = set()
        for seed in range(30):
            hosts = yield self.resolver(random.Random(seed)).resolve_mx("equal.test")
            self.assertEqual(hosts[-1], "backup.equal.test")
            seen.add(tuple(hosts))
        self.assertEqual(len(seen), 2)

    @defer.inlineCallbacks
    def test_same_seed_gives_same_order(self):
        first = yield self.resolver(random.Random(7)).resolve_mx("equal.test")
        second = yield self.resolver(random.Random(7)).resolve_mx("equal.test")
        self.assertEqual(first, second)

    @defer.inlineCallbacks
    def test_no_mx_but_an_address_is_an_implicit_mx(self):
        self.assertEqual((yield self.resolver().resolve_mx("implicit.test")), ["implicit.test"])
        self.assertEqual((yield self.resolver().resolve_mx("v6only.test")), ["v6only.test"])

    @defer.inlineCallbacks
    def test_nxdomain_is_permanent_5_1_2(self):
        error = yield self.assertFailure(self.resolver().resolve_mx("nope.test"), DNSError)
        self.assertEqual((error.permanent, error.enhanced, str(error)), (True, "5.1.2", "nope.test: domain not found"))

    @defer.inlineCallbacks
    def test_no_mx_and_no_address_is_permanent_5_1_2(self):
        error = yield self.assertFailure(self.resolver().resolve_mx("noaddr.test"), DNSError)
        self.assertEqual((error.permanent, error.enhanced), (True, "5.1.2"))
        self.assertIn("no MX or address", str(error))

    @defer.inlineCallbacks
    def test_null_mx_is_permanent_5_1_10(self):
        error = yield self.assertFailure(self.resolver().resolve_mx("nullmx.test"), DNSError)
        self.assertEqual((error.permanent, error.enhanced), (True, "5.1.10"))
        self.assertEqual(str(error), "nullmx.test: domain accepts no mail (null MX)")

    @defer.inlineCallbacks
    def test_refused_is_temporary_4_4_3(self):
        # dnsmasq has no upstream, so a name outside its zone is REFUSED, as a broken server would.
        error = yield self.assertFailure(self.resolver().resolve_mx("elsewhere.example"), DNSError)
        self.assertEqual((error.permanent, error.enhanced), (False, "4.4.3"))

    @defer.inlineCallbacks
    def test_addresses_come_ipv4_first(self):
        addresses = yield self.resolver().resolve_addresses("mx10.pref.test")
        self.assertEqual(addresses, ["192.0.2.10", "2001:db8::10"])

    @defer.inlineCallbacks
    def test_hosts_file_wins_over_dns(self):
        hosts = Path(self.mktemp())
        hosts.write_text("2001:db8::99 mx10.pref.test\n192.0.2.99 MX10.pref.test intranet.test\n")
        resolver = self.resolver(hosts_file=hosts)
        self.assertEqual((yield resolver.resolve_addresses("mx10.pref.test")), ["192.0.2.99", "2001:db8::99"])
        # A name DNS does not know, but the hosts file does, is its own mail host.
        self.assertEqual((yield resolver.resolve_mx("intranet.test")), ["intranet.test"])
        self.assertEqual((yield resolver.resolve_addresses("intranet.test")), ["192.0.2.99"])
        # MX records still win over the hosts file for the domain itself.
        hosts.write_text("192.0.2.98 pref.test\n")
        self.assertEqual((yield resolver.resolve_mx("pref.test"))[0], "mx10.pref.test")

    @defer.inlineCallbacks
    def test_unknown_host_has_no_address_permanently(self):
        for host in ("nope.test", "noaddr.test"):
            error = yield self.assertFailure(self.resolver().resolve_addresses(host), DNSError)
            self.assertEqual((error.permanent, error.enhanced), (True, "5.4.4"))

    @defer.inlineCallbacks
    def test_ip_literal_is_its_own_address(self):
        self.assertEqual((yield self.resolver().resolve_addresses("192.0.2.1")), ["192.0.2.1"])


class SilentServerTests(ThreadPoolMixin, unittest.TestCase):
    """A DNS server that never answers: a temporary failure within the timeout, reactor still running."""

    def setUp(self) -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        from twisted.internet import reactor

        self.reactor = reactor
        self.resolver = MXResolver(
            reactor,
            self.start_pool(),
            (HostPort("127.0.0.1", silent.getsockname()[1]),),
            timeout=1.0,
            hosts_file=Path(self.mktemp()),
        )

    @defer.inlineCallbacks
    def test_timeout_is_temporary_and_the_reactor_keeps_running(self):
        ticks = []
        loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
        loop.clock = self.reactor
        loop.start(0.05)
        self.addCleanup(lambda: loop.running and loop.stop())
        start = time.monotonic()
        for lookup in (self.resolver.resolve_mx, self.resolver.resolve_addresses):
            with self.assertRaises(DNSError) as caught:
                yield lookup("slow.test")
            self.assertEqual((caught.exception.permanent, caught.exception.enhanced), (False, "4.4.3"))
            self.assertIn("timed out", str(caught.exception))
        elapsed = time.monotonic() - start
        self.assertGreaterEqual(elapsed, 1.8)
        self.assertLess(elapsed, 4.0)  # each lookup is bounded by its 1 s timeout, A + AAAA included
        self.assertGreater(len(ticks), 20)  # ~40 expected at 50 ms

    @defer.inlineCallbacks
    def test_invalid_names_fail_permanently_without_asking(self):
        start = time.monotonic()
        for name in ("", ".", "a..test", "x" * 64 + ".test"):
            for lookup in (self.resolver.resolve_mx, self.resolver.resolve_addresses):
                error = yield self.assertFailure(lookup(name), DNSError)
                self.assertEqual((error.permanent, error.enhanced), (True, "5.1.2"))
                self.assertIn("not a valid domain name", str(error))
        self.assertLess(time.monotonic() - start, 0.5)  # the silent server was never waited for
