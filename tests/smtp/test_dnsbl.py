"""DNSBL entries in postscreen's syntax, query names and the weighted verdict (epost/smtp/dnsbl.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epost.config import ConfigError, load_config
from epost.smtp.dnsbl import DnsblSite, blocking_zone, dnsbl_score, parse_dnsbl_site, query_name

# ---- the parser -------------------------------------------------------------------------------

labels = st.from_regex(r"[a-z0-9]([a-z0-9_-]{0,10}[a-z0-9])?", fullmatch=True)
zones = st.lists(labels, min_size=1, max_size=5).map(".".join)
octets = st.integers(0, 255)
ranges = st.tuples(octets, octets).map(sorted)
octet_patterns = st.one_of(
    octets.map(lambda n: (str(n), {n})),
    st.lists(st.one_of(octets.map(lambda n: (str(n), {n})), ranges.map(lambda r: (f"{r[0]}..{r[1]}", set(range(r[0], r[1] + 1))))), min_size=1, max_size=4).map(
        lambda items: ("[" + ";".join(text for text, _ in items) + "]", set().union(*(allowed for _, allowed in items)))
    ),
)


@given(zones, st.none() | st.tuples(octet_patterns, octet_patterns, octet_patterns, octet_patterns), st.none() | st.integers(-10**6, 10**6))
def test_every_written_entry_parses_back_to_its_parts(zone, pattern, weight):
    text = zone
    if pattern is not None:
        text += "=" + ".".join(written for written, _ in pattern)
    if weight is not None:
        text += f"*{weight}"
    site = parse_dnsbl_site(text)
    assert site.zone == zone
    assert site.weight == (1 if weight is None else weight)
    assert site.octets == (None if pattern is None else tuple(frozenset(allowed) for _, allowed in pattern))
    assert site.text == text


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_value_error_naming_it(text):
    try:
        site = parse_dnsbl_site(text)
    except ValueError as error:
        assert repr(text.strip()) in str(error)
    else:
        assert site.zone and site.zone == site.zone.lower() and not site.zone.endswith(".")


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("zen.spamhaus.org", DnsblSite("zen.spamhaus.org", None, 1, "zen.spamhaus.org")),
        ("  Zen.Spamhaus.ORG.*3 ", DnsblSite("zen.spamhaus.org", None, 3, "Zen.Spamhaus.ORG.*3")),
        ("list.dnswl.org=127.0.[0..255].[2;3]*-4", None),
        ("b.barracudacentral.org=127.0.0.2*+2", DnsblSite("b.barracudacentral.org", tuple(frozenset({n}) for n in (127, 0, 0, 2)), 2, "b.barracudacentral.org=127.0.0.2*+2")),
        ("zen.spamhaus.org*0", DnsblSite("zen.spamhaus.org", None, 0, "zen.spamhaus.org*0")),
    ],
)
def test_postscreen_examples_parse(text, parsed):
    site = parse_dnsbl_site(text)
    if parsed is not None:
        assert site == parsed
    else:
        assert site.weight == -4 and site.octets[2] == frozenset(range(256)) and site.octets[3] == {2, 3}


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "no DNSBL zone"),
        ("*3", "no DNSBL zone"),
        ("=127.0.0.2", "no DNSBL zone"),
        ("zen.spamhaus.org*", "bad weight"),
        ("zen.spamhaus.org*x", "bad weight"),
        ("zen.spamhaus.org*1.5", "bad weight"),
        ("zen.spamhaus.org*3*4", "bad weight"),
        ("zen.spamhaus.org*2=127.0.0.2", "bad weight"),  # postscreen: the weight comes last
        ("zen.spamhaus.org* 3", "bad weight"),
        ("zen.spamhaus.org*99999999999", "bad weight"),
        ("zen.spamhaus.org=", "bad filter"),
        ("zen.spamhaus.org=127.0.0", "bad filter"),
        ("zen.spamhaus.org=127.0.0.2.1", "bad filter"),
        ("zen.spamhaus.org=127.0.0.256", "bad octet"),
        ("zen.spamhaus.org=127.0.0.-1", "bad octet"),
        ("zen.spamhaus.org=127.0.0.[]", "bad octet"),
        ("zen.spamhaus.org=127.0.0.[2..]", "bad octet"),
        ("zen.spamhaus.org=127.0.0.[2;;3]", "bad octet"),
        ("zen.spamhaus.org=127.0.0.[11..2]", "bad range"),
        ("zen.spamhaus.org=127.0.0.[2", "bad octet"),
        ("zen.spamhaus.org=127.0.0.0x2", "bad octet"),
        ("zen..spamhaus.org", "bad DNSBL zone"),
        ("-zen.spamhaus.org", "bad DNSBL zone"),
        ("zen spamhaus.org", "bad DNSBL zone"),
        ("zen.spamhaus.org/24", "bad DNSBL zone"),
        ("zen.spamhaus.org\n", None),  # trailing whitespace is stripped
        ("zén.example", "bad DNSBL zone"),
        ("a" * 64 + ".example", "bad DNSBL zone"),
        (".".join(["abcdefghi"] * 19) + "x", "bad DNSBL zone"),  # 190 characters: no room for an IPv6 query
    ],
)
def test_nasty_entries_are_refused_with_the_entry_named(text, problem):
    if problem is None:
        assert parse_dnsbl_site(text).zone == "zen.spamhaus.org"
        return
    with pytest.raises(ValueError) as info:
        parse_dnsbl_site(text)
    assert problem in str(info.value)
    assert repr(text.strip()) in str(info.value)


def test_config_error_names_file_and_key(tmp_path: Path):
    path = tmp_path / "epost.toml"
    path.write_text('[server]\ndnsbl = ["zen.spamhaus.org*2", "bl.spamcop.net*x"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, default_hostname="mx.example.test")
    assert str(info.value).startswith(f"{path}:server.dnsbl: bad weight 'x' in 'bl.spamcop.net*x'")
    path.write_text('[server]\ndnsbl = "zen.spamhaus.org"\n')
    with pytest.raises(ConfigError, match=r":server\.dnsbl: must be a list"):
        load_config(path, {}, default_hostname="mx.example.test")
    path.write_text("[server]\ndnsbl = [3]\n")
    with pytest.raises(ConfigError, match=r":server\.dnsbl: must be a string"):
        load_config(path, {}, default_hostname="mx.example.test")
    for key, value in (("dnsbl_threshold", "0"), ("greet_wait", '"soon"'), ("greet_wait", "-1")):
        path.write_text(f"[server]\n{key} = {value}\n")
        with pytest.raises(ConfigError, match=rf":server\.{key}: must be"):
            load_config(path, {}, default_hostname="mx.example.test")


def test_screening_is_off_by_default_and_read_from_the_file(tmp_path: Path):
    server = load_config(None, {}, default_hostname="x.test").server
    assert (server.greet_wait, server.dnsbl, server.dnsbl_threshold) == (0, (), 1)
    path = tmp_path / "epost.toml"
    path.write_text('[server]\ngreet_wait = "6s"\ndnsbl = ["zen.spamhaus.org*3", "list.dnswl.org=127.0.[0..255].[1..3]*-2"]\ndnsbl_threshold = 3\n')
    server = load_config(path, {}, default_hostname="x.test").server
    assert server.greet_wait == 6 and server.dnsbl_threshold == 3
    assert [(site.zone, site.weight) for site in server.dnsbl] == [("zen.spamhaus.org", 3), ("list.dnswl.org", -2)]


# ---- query names ------------------------------------------------------------------------------


def test_ipv4_query_name_reverses_the_octets():
    assert query_name("192.0.2.99", "zen.example") == "99.2.0.192.zen.example"
    assert query_name("::ffff:192.0.2.99", "zen.example") == "99.2.0.192.zen.example"  # dual-stack listener


def test_ipv6_query_name_is_the_32_nibbles_reversed():
    # RFC 5782 §2.4's example
    assert query_name("2001:db8:1:2:3:4:567:89ab", "ugly.example.com") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com"
    )


@given(st.ip_addresses(v=6))
def test_ipv6_query_name_has_32_hex_nibbles_that_read_back_to_the_address(address):
    if address.ipv4_mapped is not None:
        return
    name = query_name(str(address), "bl.example")
    nibbles = name.removesuffix(".bl.example").split(".")
    assert len(nibbles) == 32 and all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles)
    assert ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16)) == address


# ---- the verdict --------------------------------------------------------------------------------

ZEN, COP, DNSWL = "zen.example", "cop.example", "dnswl.example"
SITES = [parse_dnsbl_site(s) for s in (f"{ZEN}=127.0.0.[2..11]*3", f"{COP}*2", f"{DNSWL}=127.0.[0..255].[1..3]*-4", f"{ZEN}=127.0.0.[10;11]*1")]


@pytest.mark.parametrize(
    "answers, total, zone",
    [
        ({}, 0, None),
        ({ZEN: ["127.0.0.2"]}, 3, ZEN),
        ({ZEN: ["127.0.0.2", "127.0.0.4"]}, 3, ZEN),  # an entry counts once however many answers match
        ({ZEN: ["127.0.0.10"]}, 4, ZEN),  # two entries of one zone both match
        ({ZEN: ["127.0.0.1"]}, 0, None),  # outside the filter
        ({COP: ["127.0.0.2"], ZEN: ["127.0.0.3"]}, 5, ZEN),  # named: the largest contribution
        ({COP: ["127.0.0.2"]}, 2, COP),
        ({COP: ["192.0.2.1"]}, 0, None),  # no filter: only 127/8 counts (NXDOMAIN-rewriting resolvers)
        ({COP: ["127.255.255.254"]}, 0, None),  # Spamhaus' "public resolver" code is not a listing
        ({COP: []}, 0, None),
        ({ZEN: ["127.0.0.2"], DNSWL: ["127.0.10.2"]}, -1, ZEN),
        ({DNSWL: ["127.0.10.0"]}, 0, None),
        ({COP: ["not an address", "127.0.0.2"]}, 2, COP),
    ],
)
def test_score_sums_the_weights_of_the_matching_entries(answers, total, zone):
    score = dnsbl_score(SITES, answers)
    assert (score.total, score.zone) == (total, zone)


@given(st.dictionaries(st.sampled_from([ZEN, COP, DNSWL]), st.lists(st.sampled_from(["127.0.0.2", "127.0.0.10", "127.0.5.3", "127.0.0.1"]), max_size=3)), st.integers(1, 6))
def test_blocked_exactly_when_the_score_reaches_the_threshold(answers, threshold):
    zone = blocking_zone(SITES, answers, threshold)
    score = dnsbl_score(SITES, answers)
    assert (zone is not None) == (score.total >= threshold)
    if zone is not None:
        assert answers.get(zone)


def test_an_allow_list_entry_can_cancel_a_listing():
    assert blocking_zone(SITES, {ZEN: ["127.0.0.2"]}, 3) == ZEN
    assert blocking_zone(SITES, {ZEN: ["127.0.0.2"], DNSWL: ["127.0.0.2"]}, 3) is None
    assert blocking_zone(SITES, {ZEN: ["127.0.0.2"]}, 4) is None
