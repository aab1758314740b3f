"""The check-dns verdicts and proposed records (SPEC §9, issue 15), over a dict standing in for the DNS."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epost.admin.dns_check import (
    DnsRun,
    DnsUnavailable,
    Finding,
    check_dmarc,
    check_mx,
    check_rdns,
    check_spf,
    dkim_verdict,
    evaluate_spf,
    format_finding,
    run_checks,
    spf_with,
    zone_txt,
)

DOMAIN = "example.test"
HOST = "mail.example.test"


class FakeDns:
    """`Lookup` over {(name, type): [values]}; names in `silent` raise DnsUnavailable; counts queries."""

    def __init__(self, records: dict[tuple[str, str], list] | None = None, silent: frozenset[str] = frozenset()):
        self.records = dict(records or {})
        self.silent = silent
        self.asked: list[tuple[str, str]] = []

    def __call__(self, name: str, rdtype: str) -> list:
        self.asked.append((name, rdtype))
        if name in self.silent:
            raise DnsUnavailable(f"{name} {rdtype}: no answer within 4 s")
        return list(self.records.get((name, rdtype), []))


def spf_dns(record: str, more: dict[tuple[str, str], list] | None = None) -> FakeDns:
    return FakeDns({(DOMAIN, "TXT"): [record], **(more or {})})


def spf(record: str, address: str, dns: FakeDns | None = None) -> str:
    return evaluate_spf(address, DOMAIN, HOST, dns or spf_dns(record))[0]


@pytest.fixture(autouse=True)
def no_system_resolver(monkeypatch):
    """pyspf must ask only through our lookup, never its module-wide resolver (the system's DNS)."""
    import spf

    def refuse(*args, **kwargs):
        raise AssertionError(f"pyspf asked the system resolver: {args}")

    monkeypatch.setattr(spf, "DNSLookup", refuse)


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
# An IPv4-mapped address (::ffff:a.b.c.d) is an IPv4 client to SPF (RFC 7208 §5.6), tested apart below.
MAPPED = ipaddress.ip_network("::ffff:0:0/96")
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: a not in MAPPED).map(str)
QUALIFIED = {"-": "fail", "~": "softfail", "?": "neutral", "+": "pass", "": "pass"}


# --- SPF evaluation (pyspf through our lookup) -------------------------------------------


@given(network=ipv4, prefix=st.integers(0, 32), address=ipv4)
def test_ip4_with_a_prefix_passes_exactly_the_addresses_inside(network, prefix, address):
    net = ipaddress.ip_network(f"{network}/{prefix}", strict=False)
    expected = "pass" if ipaddress.ip_address(address) in net else "fail"
    assert spf(f"v=spf1 ip4:{network}/{prefix} -all", address) == expected


@given(network=ipv6, prefix=st.integers(0, 128), address=ipv6)
def test_ip6_with_a_prefix_passes_exactly_the_addresses_inside(network, prefix, address):
    net = ipaddress.ip_network(f"{network}/{prefix}", strict=False)
    expected = "pass" if ipaddress.ip_address(address) in net else "fail"
    assert spf(f"v=spf1 ip6:{network}/{prefix} -all", address) == expected


# Two uniform addresses share a /N with odds 2**-N: the tests above reach "pass" for long
# prefixes only through Hypothesis' lean to small integers (0.0.0.x). These draw the address
# from inside the network by construction, and just past either end.
def inside_passes_and_neighbours_fail(mechanism: str, network: str, prefix: int, host: int) -> None:
    net = ipaddress.ip_network(f"{network}/{prefix}", strict=False)
    record = f"v=spf1 {mechanism}:{network}/{prefix} -all"
    inside = net.network_address + host % net.num_addresses
    if inside not in MAPPED:
        assert spf(record, str(inside)) == "pass"
    for outside in (int(net.network_address) - 1, int(net.broadcast_address) + 1):
        # a /1 has a neighbour on one side only
        if 0 <= outside < 2**net.max_prefixlen and (neighbour := type(inside)(outside)) not in MAPPED:
            assert spf(record, str(neighbour)) == "fail"


@given(network=ipv4, prefix=st.integers(1, 32), host=st.integers(0, 2**32 - 1))
def test_ip4_passes_every_address_inside_a_long_prefix_and_fails_its_neighbours(network, prefix, host):
    inside_passes_and_neighbours_fail("ip4", network, prefix, host)


@given(network=ipv6, prefix=st.integers(1, 128), host=st.integers(0, 2**128 - 1))
def test_ip6_passes_every_address_inside_a_long_prefix_and_fails_its_neighbours(network, prefix, host):
    inside_passes_and_neighbours_fail("ip6", network, prefix, host)


@given(address=ipv4)
def test_an_ipv4_mapped_ipv6_sender_is_judged_as_its_ipv4_address(address):
    mapped = f"::ffff:{address}"
    assert spf(f"v=spf1 ip4:{address} -all", mapped) == "pass"
    assert spf("v=spf1 ip6:::ffff:0:0/96 -all", mapped) == "fail"


@given(address=ipv4, ipv6_address=ipv6)
def test_an_ip4_term_never_matches_an_ipv6_sender_nor_ip6_an_ipv4_one(address, ipv6_address):
    assert spf(f"v=spf1 ip4:{address} ~all", ipv6_address) == "softfail"
    assert spf(f"v=spf1 ip6:{ipv6_address} ~all", address) == "softfail"


@given(qualifier=st.sampled_from(sorted(QUALIFIED)), address=ipv4)
def test_all_gives_its_qualifiers_result(qualifier, address):
    assert spf(f"v=spf1 {qualifier}all", address) == QUALIFIED[qualifier]


def drawn_address(network: str, prefix: int, address: str, host: int | None) -> str:
    """`address`, or (host given) an address inside the network: a uniform one falls inside a /N only 2**-N of the time."""
    if host is None:
        return address
    net = ipaddress.ip_network(f"{network}/{prefix}", strict=False)
    return str(net.network_address + host % net.num_addresses)


inside_host = st.none() | st.integers(0, 2**32 - 1)


@given(network=ipv4, prefix=st.integers(8, 32), address=ipv4, host=inside_host,
       inner_all=st.sampled_from(["-all", "~all", "?all"]))
def test_include_passes_what_the_included_record_passes_and_otherwise_goes_on(network, prefix, address, host, inner_all):
    address = drawn_address(network, prefix, address, host)
    dns = spf_dns("v=spf1 include:_spf.example.test ~all",
                  {("_spf.example.test", "TXT"): [f"v=spf1 ip4:{network}/{prefix} {inner_all}"]})
    inside = ipaddress.ip_address(address) in ipaddress.ip_network(f"{network}/{prefix}", strict=False)
    # an include that does not pass is "no match": the outer ~all decides, whatever the inner all says
    assert spf("", address, dns) == ("pass" if inside else "softfail")


@given(network=ipv4, prefix=st.integers(8, 32), address=ipv4, host=inside_host,
       qualifier=st.sampled_from(["-", "~", "?"]))
def test_redirect_hands_the_whole_verdict_to_the_other_record(network, prefix, address, host, qualifier):
    address = drawn_address(network, prefix, address, host)
    dns = spf_dns("v=spf1 redirect=spf.other.test", {("spf.other.test", "TXT"): [f"v=spf1 ip4:{network}/{prefix} {qualifier}all"]})
    inside = ipaddress.ip_address(address) in ipaddress.ip_network(f"{network}/{prefix}", strict=False)
    assert spf("", address, dns) == ("pass" if inside else QUALIFIED[qualifier])


def test_include_of_a_name_without_a_record_is_permerror_and_a_missing_redirect_too():
    assert spf("v=spf1 include:nothing.test -all", "192.0.2.1") == "permerror"
    assert spf("v=spf1 redirect=nothing.test", "192.0.2.1") == "permerror"


@settings(max_examples=30)
@given(count=st.integers(0, 14))
def test_more_than_ten_dns_querying_terms_is_permerror(count):
    """RFC 7208 4.6.4: a, mx, include, ptr, exists, redirect count; ip4/ip6/all do not."""
    hosts = {(f"h{i}.example.test", "A"): [f"198.51.100.{i + 1}"] for i in range(count)}
    record = "v=spf1 " + " ".join(f"a:h{i}.example.test" for i in range(count)) + " ip4:192.0.2.25 -all"
    result = spf("", "192.0.2.25", spf_dns(record, hosts))
    assert result == ("pass" if count <= 10 else "permerror")


@pytest.mark.parametrize("voids, result", [(2, "pass"), (3, "permerror")])
def test_more_than_two_lookups_without_an_answer_is_permerror(voids, result):
    """RFC 7208 4.6.4: the void-lookup limit, counted by our lookup seam."""
    record = "v=spf1 " + " ".join(f"a:void{i}.example.test" for i in range(voids)) + " ip4:192.0.2.25 -all"
    assert spf(record, "192.0.2.25") == result


def test_a_and_mx_terms_use_the_domains_own_records():
    dns = FakeDns({
        (DOMAIN, "TXT"): ["v=spf1 mx a -all"],
        (DOMAIN, "MX"): [(10, HOST)],
        (HOST, "A"): ["192.0.2.25"],
        (DOMAIN, "A"): ["192.0.2.80"],
    })
    assert spf("", "192.0.2.25", dns) == "pass"
    assert spf("", "192.0.2.80", dns) == "pass"
    assert spf("", "192.0.2.81", dns) == "fail"


def test_no_record_is_none_and_two_records_permerror():
    assert spf("", "192.0.2.1", FakeDns()) == "none"
    dns = FakeDns({(DOMAIN, "TXT"): ["v=spf1 -all", "v=spf1 +all"]})
    assert spf("", "192.0.2.1", dns) == "permerror"


def test_a_dns_that_does_not_answer_is_temperror():
    dns = FakeDns({(DOMAIN, "TXT"): ["v=spf1 include:slow.test -all"]}, silent=frozenset({"slow.test"}))
    assert spf("", "192.0.2.1", dns) == "temperror"


# --- the SPF fix -----------------------------------------------------------------------


@given(network=ipv4, prefix=st.integers(8, 32), qualifier=st.sampled_from(["-", "~", "?"]),
       addresses=st.lists(st.one_of(ipv4, ipv6), min_size=1, max_size=3, unique=True))
def test_the_proposed_record_passes_every_address_and_keeps_what_passed_before(network, prefix, qualifier, addresses):
    record = f"v=spf1 ip4:{network}/{prefix} {qualifier}all"
    fixed = spf_with(record, addresses)
    assert fixed.startswith("v=spf1 ") and fixed.endswith(f"ip4:{network}/{prefix} {qualifier}all")
    for address in addresses:
        assert spf(fixed, address) == "pass"
    assert spf(fixed, network) == "pass"  # the network it allowed still passes


def test_a_new_record_allows_just_the_public_addresses():
    assert spf_with(None, ["192.0.2.25", "2001:DB8::25"]) == "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 -all"


def test_check_spf_gives_a_line_per_address_and_one_fix_adding_every_failing_one():
    dns = FakeDns({(DOMAIN, "TXT"): ["v=spf1 ip4:192.0.2.25 ~all", "unrelated text"]})
    findings = check_spf(DOMAIN, ["192.0.2.25", "192.0.2.26", "2001:db8::25"], HOST, dns)
    assert [(f.status, f.detail.split(" (")[0]) for f in findings] == [
        ("ok", f"{DOMAIN}: pass for 192.0.2.25"),
        ("fail", f"{DOMAIN}: softfail for 192.0.2.26"),
        ("fail", f"{DOMAIN}: softfail for 2001:db8::25"),
    ]
    assert findings[1].fix == findings[2].fix == \
        f'publish {DOMAIN}. IN TXT "v=spf1 ip4:192.0.2.26 ip6:2001:db8::25 ip4:192.0.2.25 ~all"'


def test_check_spf_without_a_record_proposes_one():
    [finding] = check_spf(DOMAIN, ["192.0.2.25"], HOST, FakeDns())
    assert finding.status == "fail" and "no SPF record" in finding.detail
    assert finding.fix == f'publish {DOMAIN}. IN TXT "v=spf1 ip4:192.0.2.25 -all"'


def test_a_permerror_record_gets_a_fresh_record_as_the_fix():
    dns = FakeDns({(DOMAIN, "TXT"): ["v=spf1 ip4:192.0.2.25 include:gone.test moo -all"]})
    [finding] = check_spf(DOMAIN, ["192.0.2.99"], HOST, dns)
    assert finding.status == "fail" and "permerror" in finding.detail
    assert finding.fix.startswith(f'publish {DOMAIN}. IN TXT "v=spf1 ip4:192.0.2.99 -all"')


# --- MX ------------------------------------------------------------------------------


def test_mx_lines():
    good = FakeDns({(DOMAIN, "MX"): [(20, "b.example.test"), (10, HOST)], (HOST, "A"): ["192.0.2.25"],
                    ("b.example.test", "AAAA"): ["2001:db8::2"]})
    assert [format_finding(f) for f in check_mx(DOMAIN, HOST, good)] == [
        "ok    mx     example.test: MX 10 mail.example.test (192.0.2.25)",
        "ok    mx     example.test: MX 20 b.example.test (2001:db8::2)",
    ]
    implicit = check_mx(DOMAIN, HOST, FakeDns({(DOMAIN, "A"): ["192.0.2.80"]}))
    assert [(f.status, f.fix) for f in implicit] == [("warn", f"publish {DOMAIN}. IN MX 10 {HOST}.")]
    nothing = check_mx(DOMAIN, HOST, FakeDns())
    assert [(f.status, f.fix) for f in nothing] == [("fail", f"publish {DOMAIN}. IN MX 10 {HOST}.")]
    null = check_mx(DOMAIN, HOST, FakeDns({(DOMAIN, "MX"): [(0, "")]}))
    assert null[0].status == "fail" and "null MX" in null[0].detail
    dangling = check_mx(DOMAIN, HOST, FakeDns({(DOMAIN, "MX"): [(10, "gone.example.test")]}))
    assert dangling[0].status == "fail" and dangling[0].fix.startswith("publish gone.example.test. IN A ")


# --- DKIM ----------------------------------------------------------------------------


def test_dkim_verdicts():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    spki = base64.b64encode(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    pkcs1 = base64.b64encode(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)).decode()
    assert dkim_verdict([f"v=DKIM1; k=rsa; p={spki}"], "rsa", spki)[0] == "ok"
    assert dkim_verdict([f"v=DKIM1; p={pkcs1[:40]} {pkcs1[40:]}"], "rsa", spki)[0] == "ok"  # other DER form, FWS, k= default
    for texts, words in [
        ([], "no record"),
        ([f"v=DKIM1; p={spki}"] * 2, "2 TXT records"),
        (["v=DKIM1; k=rsa; p="], "revoked"),
        ([f"v=DKIM1; k=ed25519; p={spki}"], "k=ed25519"),
        ([f"v=DKIM1; p={spki[:-8]}AAAAAAA="], "another key"),
        ([f"k=rsa; v=DKIM1; p={spki}"], "come first"),
        (["v=DKIM1; k=rsa"], "no p="),
        ([f"v=DKIM1; k=rsa; k=rsa; p={spki}"], "twice"),
    ]:
        status, detail = dkim_verdict(texts, "rsa", spki)
        assert status == "fail" and words in detail, (texts, detail)


# --- DMARC ---------------------------------------------------------------------------


@pytest.mark.parametrize("records, status, words", [
    (["v=DMARC1; p=reject; rua=mailto:d@example.test"], "ok", "p=reject"),
    (["v=DMARC1;p=quarantine;pct=50"], "ok", "p=quarantine"),
    (["v=DMARC1; p=none; rua=mailto:d@example.test"], "warn", "p=none"),
    ([], "fail", "no record"),
    (["v=DMARC1; p=none", "v=DMARC1; p=reject"], "fail", "2 records"),
    (["v=DMARC1; p=block"], "fail", "p= must be none, quarantine or reject, got 'block'"),
    (["v=DMARC1; rua=mailto:d@example.test"], "fail", "p= must be"),
    (["v=DMARC1; p=reject; adkim=x"], "fail", "adkim= must be r or s"),
    (["v=DMARC1; p=reject; pct=150"], "fail", "pct= must be 0..100"),
    (["v=DMARC1; p=reject; rua=d@example.test"], "fail", "rua= needs URIs"),
    (["v=DMARC1; p=reject; sp=maybe"], "fail", "sp= must be"),
    (["v=dmarc1; p=reject"], "fail", "must start with v=DMARC1"),  # receivers ignore it: said so, not "no record"
    (["v=DMARC10; p=reject"], "fail", "must start with v=DMARC1"),
    (["v=dmarc1; p=none", "v=DMARC1; p=reject"], "ok", "p=reject"),  # the precise one is the record
])
def test_dmarc_verdicts(records, status, words):
    dns = FakeDns({(f"_dmarc.{DOMAIN}", "TXT"): [*records, "some other text"]})
    [finding] = check_dmarc(DOMAIN, dns)
    assert finding.status == status and words in finding.detail, finding
    if status != "ok":
        assert finding.fix.startswith(("publish _dmarc.example.test. IN TXT \"v=DMARC1; p=",
                                       "when ready, publish _dmarc.example.test. IN TXT \"v=DMARC1; p=quarantine"))


def test_dmarc_fix_keeps_the_report_address_given():
    dns = FakeDns({(f"_dmarc.{DOMAIN}", "TXT"): ["v=DMARC1; p=none; rua=mailto:reports@example.test"]})
    assert check_dmarc(DOMAIN, dns)[0].fix == \
        'when ready, publish _dmarc.example.test. IN TXT "v=DMARC1; p=quarantine; rua=mailto:reports@example.test"'


# --- reverse DNS ---------------------------------------------------------------------


def test_forward_confirmed_reverse_dns():
    reverse = "25.2.0.192.in-addr.arpa"
    six = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    dns = FakeDns({(reverse, "PTR"): [HOST], (HOST, "A"): ["192.0.2.25"], (six, "PTR"): [HOST], (HOST, "AAAA"): ["2001:db8::25"]})
    assert [f.status for f in check_rdns(["192.0.2.25", "2001:db8::25"], HOST, dns)] == ["ok", "ok"]
    [none] = check_rdns(["192.0.2.25"], HOST, FakeDns())
    assert none.status == "fail" and none.fix.startswith(f"publish {reverse}. IN PTR {HOST}. ")
    [unconfirmed] = check_rdns(["192.0.2.25"], HOST, FakeDns({(reverse, "PTR"): [HOST], (HOST, "A"): ["192.0.2.26"]}))
    assert unconfirmed.status == "fail" and unconfirmed.fix == f"publish {HOST}. IN A 192.0.2.25"
    other = FakeDns({(reverse, "PTR"): ["host-25.isp.test"], ("host-25.isp.test", "A"): ["192.0.2.25"]})
    [mismatch] = check_rdns(["192.0.2.25"], HOST, other)
    assert mismatch.status == "warn" and "EHLO mail.example.test" in mismatch.detail


# --- the whole run -------------------------------------------------------------------


def test_a_dns_that_answers_nothing_is_one_fail_line():
    dns = FakeDns(silent=frozenset({DOMAIN}))
    [finding] = run_checks(DOMAIN, HOST, [], [], dns)
    assert finding.status == "fail" and finding.check == "dns" and "no answer" in finding.detail
    assert len(dns.asked) == 1


def test_without_public_addresses_the_hostnames_addresses_are_checked_and_each_query_asked_once():
    dns = FakeDns({(HOST, "A"): ["192.0.2.25"], (DOMAIN, "TXT"): ["v=spf1 a:mail.example.test -all"]})
    findings = run_checks(DOMAIN, HOST, [], [], dns)
    assert ("ok", "addresses") in [(f.status, f.check) for f in findings]
    assert [f.status for f in findings if f.check == "spf"] == ["ok"]
    assert len(dns.asked) == len(set(dns.asked))
    hostless = run_checks(DOMAIN, HOST, [], [], FakeDns())
    assert [f.status for f in hostless if f.check == "addresses"] == ["fail"]
    assert not [f for f in hostless if f.check in ("spf", "rdns")]


def test_zone_txt_splits_long_values_into_255_octet_strings():
    line = zone_txt("x.test", "a" * 300)
    assert line == f'x.test. IN TXT "{"a" * 255}" "{"a" * 45}"'


def test_record_text_is_printed_escaped_and_encodes_as_strict_utf8():
    """A TXT record may hold terminal escapes or bytes that are not UTF-8 (decoded to lone surrogates)."""
    finding = Finding("fail", "spf", "example.test: v=spf1 \x1b[2J\x1b]0;owned\x07 \udcff -all",
                      'publish example.test. IN TXT "v=spf1 \x1b[31m"')
    line = format_finding(finding)
    assert "\x1b" not in line and "\x07" not in line and "\udcff" not in line
    assert "\\x1b[2J" in line and "\\udcff" in line
    assert line.endswith('fix: publish example.test. IN TXT "v=spf1 \\x1b[31m"')
    line.encode("utf-8", "strict")  # `check-dns` under PYTHONIOENCODING=utf-8:strict


def test_the_dashboards_checks_do_the_domain_independent_part_once_per_run(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from epost.delivery import signing

    path, _ = signing.keygen(DOMAIN, tmp_path, "s1", "ed25519")
    spec = SimpleNamespace(domain=DOMAIN, selector="s1", key=path)
    config = SimpleNamespace(server=SimpleNamespace(hostname=HOST, public_addresses=()), dkim=SimpleNamespace(keys=(spec,)))
    dns = FakeDns({(HOST, "A"): ["192.0.2.25"]})
    loaded, real = [], signing.load_key
    monkeypatch.setattr(signing, "load_key", lambda *args: loaded.append(args) or real(*args))
    run = DnsRun.of_config(config, lookup=dns)
    shared = lambda findings: [f for f in findings if f.check in ("addresses", "rdns")]
    first, other = run(DOMAIN), run("sub." + DOMAIN)
    assert [f.check for f in shared(first)] == ["addresses", "rdns"] and shared(other) == shared(first)
    assert dns.asked.count((HOST, "A")) == 1 and len(loaded) == 1  # sub. signs with the parent's key: read once
    DnsRun.of_config(config, lookup=dns)(DOMAIN)
    assert dns.asked.count((HOST, "A")) == 2 and len(loaded) == 2  # a new run reads again
