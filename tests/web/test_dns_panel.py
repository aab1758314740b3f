"""Mail Control's dashboard shows `epost check-dns` for the local domains (SPEC §9, issue 15):
run off the reactor, kept for some minutes, run again on request."""

from __future__ import annotations

from functools import partial

from epost.admin.dns_check import DnsRun, Finding
from epost.config import load_config
from epost.routing.users import Users, parse_user_line
from epost.web.dns_panel import CACHE_SECONDS, MAX_DOMAINS, DnsChecks, dashboard_domains
from fakes import HeldThreadPool, SynchronousThreadPool
from tests.routing.dnsmasq import Dnsmasq


def test_the_dashboard_shows_the_real_checks_of_each_local_domain(world, admin, tmp_path):
    dns = Dnsmasq([
        "--mx-host=example.test,mx.example.test,10",
        "--host-record=mx.example.test,192.0.2.25",
        "--txt-record=example.test,v=spf1 ip4:198.51.100.7 -all",
        "--txt-record=_dmarc.example.test,v=DMARC1; p=none",
        "--local=/in-addr.arpa/",
    ])
    dns.start()
    try:
        toml = tmp_path / "checks.toml"
        toml.write_text(f'[server]\nhostname = "mx.example.test"\n[routing]\ndns_servers = ["127.0.0.1:{dns.port}"]\n')
        checks = DnsChecks(world.clock, SynchronousThreadPool(), partial(DnsRun.of_config, load_config(toml, {})))
        world.site.context.dns_checks = checks
        page = admin.get("/")
    finally:
        dns.cleanup()
    assert page.code == 200
    card = page.body.split('id="dns-example.test"', 1)[1].split('<div class="card', 1)[0]
    assert "<h2>DNS checks</h2>" in page.body
    assert '<tr class="dns-ok"><td>ok</td><td>mx</td><td>example.test: MX 10 mx.example.test (192.0.2.25)' in card
    assert '<tr class="dns-fail"><td>fail</td><td>spf</td><td>example.test: fail for 192.0.2.25' in card
    assert "fix: publish example.test. IN TXT &quot;v=spf1 ip4:192.0.2.25 ip4:198.51.100.7 -all&quot;" in card
    assert '<tr class="dns-warn"><td>warn</td><td>dmarc</td>' in card
    assert '<tr class="dns-ok"><td>ok</td><td>rdns</td><td>192.0.2.25: PTR mx.example.test resolves back' in card
    assert '<strong>example.test</strong><span class="dns-fail">fail</span>' in card


def test_results_are_kept_for_some_minutes_and_check_dns_now_runs_them_again(world, admin):
    runs = world.site.context.dns_checks._new_run.runs
    assert "example.test: checked by the test" in admin.get("/").body
    admin.get("/")
    assert runs == ["example.test"]  # the second view used the kept result
    world.clock.advance(CACHE_SECONDS + 1)
    admin.get("/")
    assert runs == ["example.test"] * 2
    page = admin.get("/")
    reply = admin.post("/", {"csrf": page.csrf(), "action": "dns-refresh"})
    assert reply.code == 303 and reply.header("location") == "/"
    assert runs == ["example.test"] * 3
    assert "DNS checks started" in admin.get("/").body


def test_the_refresh_needs_the_csrf_token(world, admin):
    runs = world.site.context.dns_checks._new_run.runs
    admin.get("/")
    assert admin.post("/", {"action": "dns-refresh"}).code == 403
    assert runs == ["example.test"]


def test_the_page_never_waits_for_a_check_and_one_check_runs_at_a_time_per_domain(world, admin):
    pool = HeldThreadPool()
    runs = []
    world.site.context.dns_checks = DnsChecks(world.clock, pool, lambda: lambda domain: runs.append(domain) or [])
    page = admin.get("/")
    assert page.code == 200 and "Checking; reload the page in a few seconds." in page.body
    admin.post("/", {"csrf": page.csrf(), "action": "dns-refresh"})
    assert len(pool.calls) == 1  # still running: not started twice
    pool.run_one()
    assert runs == ["example.test"] and "Checking" not in admin.get("/").body


def test_a_check_that_raises_shows_as_a_fail_line(world, admin):
    def broken(domain):
        raise RuntimeError("boom")

    world.site.context.dns_checks = DnsChecks(world.clock, SynchronousThreadPool(), lambda: broken)
    body = admin.get("/").body
    assert "the check itself failed (boom)" in body


def test_dashboard_domains_are_the_local_domains_and_the_users_tables_by_name():
    users = Users.of(parse_user_line(a) for a in ("a@b.test", "c@A.test", "d@b.test"))
    assert dashboard_domains(["z.test", "a.test"], users) == ["a.test", "b.test", "z.test"]
    many = [f"d{i:03}.test" for i in range(MAX_DOMAINS + 5)]
    assert dashboard_domains(many, Users()) == many[:MAX_DOMAINS]


def test_record_text_with_escapes_and_stray_bytes_renders_escaped(world, admin):
    finding = Finding("fail", "spf", "example.test: v=spf1 \x1b[2J \udcff -all <b>", 'publish "\x1b[31m"')
    world.site.context.dns_checks = DnsChecks(world.clock, SynchronousThreadPool(), lambda: lambda domain: [finding])
    page = admin.get("/")
    assert page.code == 200
    assert "example.test: v=spf1 \\x1b[2J \\udcff -all &lt;b&gt;" in page.body
    assert "fix: publish &quot;\\x1b[31m&quot;" in page.body


def test_results_of_domains_no_longer_local_are_dropped():
    """The cache's bound: the domains last asked for (and those in flight), not every domain ever seen."""
    from fakes import ClockReactor

    checks = DnsChecks(ClockReactor(), SynchronousThreadPool(), lambda: lambda domain: [Finding("ok", "mx", domain)])
    checks.start([f"d{n}.test" for n in range(MAX_DOMAINS)])
    checks.start(["d0.test", "new.test"])
    assert checks.result("d0.test") is not None and checks.result("new.test") is not None
    assert checks.result("d1.test") is None
    assert len(checks._results) == 2


def test_one_start_is_one_run_asking_each_name_once_and_check_dns_now_asks_the_dns_again():
    """The checks started together share their DNS answers, the public addresses' reverse DNS and
    the key files; a forced refresh (or any later start) keeps nothing of them: a record just
    fixed is seen at once, whatever its TTL or how soon the refresh comes."""
    from types import SimpleNamespace

    from fakes import ClockReactor

    host = "mx.example.test"
    records = {("example.test", "MX"): [(10, host)], ("other.test", "MX"): [(10, host)],
               (host, "A"): ["192.0.2.25"], ("25.2.0.192.in-addr.arpa", "PTR"): [host]}
    asked = []

    def lookup(name, rdtype):
        asked.append((name, rdtype))
        return list(records.get((name, rdtype), []))

    config = SimpleNamespace(server=SimpleNamespace(hostname=host, public_addresses=()), dkim=SimpleNamespace(keys=()))
    clock = ClockReactor()
    checks = DnsChecks(clock, SynchronousThreadPool(), lambda: DnsRun.of_config(config, lookup=lookup))
    checks.start(["example.test", "other.test"])
    assert asked and len(asked) == len(set(asked))  # within the run, each (name, type) asked once
    assert asked.count((host, "A")) == 1
    before = [f for f in checks.result("example.test").findings if f.check == "dmarc"]
    assert [f.status for f in before] == ["fail"]
    records["_dmarc.example.test", "TXT"] = ["v=DMARC1; p=reject"]  # the operator fixes it
    first = list(asked)
    clock.advance(1)  # well within any TTL, and within a minute
    checks.start(["example.test", "other.test"], force=True)
    again = asked[len(first):]
    assert sorted(again) == sorted(first)  # everything asked again, once
    assert [f.status for f in checks.result("example.test").findings if f.check == "dmarc"] == ["ok"]
