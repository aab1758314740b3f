"""gateway.dat: first matching line wins, `*.d` never matches `d`, bad lines are named by file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epost.routing.gateway import (
    GatewayRule,
    GatewayTable,
    load_gateway_table,
    parse_gateway_rule,
    parse_gateway_table,
)
from epost.routing.tables import TableError

SPEC_EXAMPLE = """\
# pattern,gateway,port
*.abc.jp,smtp01.domain.jp,25
*.def.jp,smtp02.domain.jp,25
partner.jp,mx
*,smtp.domain.jp,25
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.dat"
    path.write_text(text, encoding="utf-8")
    return path


def table(*lines: str) -> GatewayTable:
    return parse_gateway_table(enumerate(lines, start=1), "gateway.dat")


# --- the SPEC's example -------------------------------------------------------


def test_spec_example_routes_each_domain_by_its_first_matching_line(tmp_path: Path) -> None:
    gateways = load_gateway_table(write(tmp_path, SPEC_EXAMPLE))
    assert len(gateways) == 4
    assert gateways.lookup("mail.abc.jp") == GatewayRule(2, "*.abc.jp", "smtp01.domain.jp", 25)
    assert gateways.lookup("a.b.c.abc.jp") == GatewayRule(2, "*.abc.jp", "smtp01.domain.jp", 25)
    assert gateways.lookup("x.def.jp") == GatewayRule(3, "*.def.jp", "smtp02.domain.jp", 25)
    assert gateways.lookup("partner.jp") == GatewayRule(4, "partner.jp", None, 25)
    assert gateways.lookup("abc.jp") == GatewayRule(5, "*", "smtp.domain.jp", 25)
    assert gateways.lookup("sub.partner.jp").line == 5
    assert gateways.lookup("example.com").line == 5


def test_spec_example_operated_domains_exclude_what_only_star_matches(tmp_path: Path) -> None:
    gateways = load_gateway_table(write(tmp_path, SPEC_EXAMPLE))
    assert gateways.operated_domains() == frozenset({"partner.jp"})
    assert gateways.is_operated("partner.jp")
    assert gateways.is_operated("mail.abc.jp")
    assert gateways.is_operated("deep.sub.def.jp")
    assert not gateways.is_operated("abc.jp")
    assert not gateways.is_operated("example.com")
    assert not gateways.is_operated("[192.0.2.1]")


# --- file handling -------------------------------------------------------------


def test_missing_file_is_an_empty_table_that_matches_nothing(tmp_path: Path) -> None:
    gateways = load_gateway_table(tmp_path / "nope")
    assert len(gateways) == 0
    assert gateways.lookup("example.com") is None
    assert not gateways.is_operated("example.com")


def test_comments_blank_lines_and_spaces_around_fields_are_ignored(tmp_path: Path) -> None:
    text = "# head\n\n   \n  *.abc.jp ,  smtp01.domain.jp ,\t2525  \n\t# indented\n partner.jp , mx \n"
    gateways = load_gateway_table(write(tmp_path, text))
    assert gateways.rules == (
        GatewayRule(4, "*.abc.jp", "smtp01.domain.jp", 2525),
        GatewayRule(6, "partner.jp", None, 25),
    )


@pytest.mark.parametrize(
    "line, problem",
    [
        ("example.com", "got 1 field"),
        ("example.com,gw.example,25,extra", "got 4 field"),
        (",gw.example", "empty pattern"),
        ("  ,gw.example,25", "empty pattern"),
        ("a.*.b,gw.example", "bad pattern"),
        ("**,gw.example", "bad pattern"),
        ("*.,gw.example", "bad pattern"),
        ("*.*.jp,gw.example", "bad pattern"),
        ("ex ample.com,gw.example", "bad pattern"),
        ("-bad.com,gw.example", "bad pattern"),
        ("192.0.2.1,gw.example", "bad pattern"),
        ("example.com,", "bad gateway"),
        ("example.com,gw_ example", "bad gateway"),
        ("example.com,[gw.example]", "bad gateway"),
        ("example.com,[192.0.2.300]", "bad gateway"),
        ("example.com,192.0.2.300", "bad gateway"),
        ("example.com,[2001:db8::zz]", "bad gateway"),
        ("example.com,gw.example,", "bad port"),
        ("example.com,gw.example,0", "bad port"),
        ("example.com,gw.example,65536", "bad port"),
        ("example.com,gw.example,-1", "bad port"),
        ("example.com,gw.example,+25", "bad port"),
        ("example.com,gw.example,smtp", "bad port"),
        ("example.com,gw.example,２５", "bad port"),  # full-width digits
        ("example.com,mx,2525", "port 2525 would be ignored"),
    ],
)
def test_bad_line_names_file_line_and_problem(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, f"# rules\nok.example,gw.example\n\n{line}\n*,gw.example\n")
    with pytest.raises(TableError) as caught:
        load_gateway_table(path)
    assert caught.value.line == 4
    assert caught.value.path == path
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}:4: ")


def test_mx_keyword_means_resolve_normally_in_any_case() -> None:
    gateways = table("partner.jp,MX", "other.jp,mx,25")
    assert gateways.lookup("partner.jp") == GatewayRule(1, "partner.jp", None, 25)
    assert gateways.lookup("other.jp") == GatewayRule(2, "other.jp", None, 25)


def test_port_defaults_to_25() -> None:
    assert parse_gateway_rule("*,smtp.domain.jp").port == 25
    assert parse_gateway_rule("*,smtp.domain.jp,587").port == 587


@pytest.mark.parametrize(
    "field, stored",
    [
        ("192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:DB8:0:0:0:0:0:1]", "2001:db8::1"),
        ("SMTP.Domain.JP.", "smtp.domain.jp"),
        ("メール.example", "xn--4dkua4c.example"),
    ],
)
def test_gateway_host_is_stored_canonically_without_brackets(field: str, stored: str) -> None:
    rule = parse_gateway_rule(f"*,{field},2525", 7)
    assert rule == GatewayRule(7, "*", stored, 2525)


def test_ipv6_gateway_is_written_back_in_brackets() -> None:
    rule = parse_gateway_rule("*,2001:db8::1,2525")
    assert str(rule) == "*,[2001:db8::1],2525"
    assert parse_gateway_rule(str(rule)) == rule


# --- matching --------------------------------------------------------------------


def test_matching_ignores_case_and_one_trailing_dot() -> None:
    gateways = table("*.ABC.jp,gw1.example", "Partner.JP.,gw2.example")
    assert gateways.lookup("Mail.Abc.JP").line == 1
    assert gateways.lookup("mail.abc.jp.").line == 1
    assert gateways.lookup("PARTNER.jp").line == 2
    assert gateways.rules[1].pattern == "partner.jp"


def test_unicode_rule_matches_a_label_domain_and_the_other_way_round() -> None:
    gateways = table("*.日本.jp,gw1.example", "xn--bcher-kva.example,gw2.example")
    assert gateways.rules[0].pattern == "*.xn--wgv71a.jp"
    assert gateways.lookup("mail.xn--wgv71a.jp").line == 1
    assert gateways.lookup("メール.日本.jp").line == 1
    assert gateways.lookup("Bücher.example").line == 2
    assert gateways.lookup("日本.jp") is None  # `*.d` never matches d


def test_star_subdomain_rule_never_matches_parent() -> None:
    gateways = table("*.abc.jp,gw.example")
    assert gateways.lookup("abc.jp") is None
    assert gateways.lookup("x.abc.jp") is not None
    assert gateways.lookup("xabc.jp") is None  # a suffix of the text is not a parent domain


def test_earlier_catch_all_shadows_later_exact_rule() -> None:
    gateways = table("*,gw1.example", "partner.jp,mx")
    assert gateways.lookup("partner.jp").line == 1
    assert gateways.is_operated("partner.jp")  # still matched by a non-`*` pattern (SPEC §3.3)


def test_first_of_several_matching_rules_wins_whatever_their_kind() -> None:
    gateways = table("*.jp,gw1.example", "a.b.jp,gw2.example", "*.b.jp,gw3.example", "a.b.jp,gw4.example")
    assert gateways.lookup("a.b.jp").line == 1
    assert gateways.lookup("x.b.jp").line == 1
    gateways = table("*.b.jp,gw1.example", "a.b.jp,gw2.example", "*.jp,gw3.example")
    assert gateways.lookup("a.b.jp").line == 1
    assert gateways.lookup("b.jp").line == 3
    gateways = table("a.b.jp,gw1.example", "*.a.b.jp,gw2.example", "*.b.jp,gw3.example", "*.jp,gw4.example")
    assert gateways.lookup("a.b.jp").line == 1
    assert gateways.lookup("x.a.b.jp").line == 2
    assert gateways.lookup("x.b.jp").line == 3


@pytest.mark.parametrize("domain", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "", "bad domain", "192.0.2.1"])
def test_address_literal_or_unparsable_domain_matches_only_star(domain: str) -> None:
    assert table("*.jp,gw1.example", "192.0.2.1.jp,gw2.example", "*,gw3.example").lookup(domain).line == 3
    assert table("*.jp,gw1.example").lookup(domain) is None


# --- properties ----------------------------------------------------------------------

LABELS = st.sampled_from(["a", "b", "xn--wgv71a"])  # few labels, so rules often overlap
DOMAINS = st.lists(LABELS, min_size=1, max_size=3).map(".".join)
# `*` is rare: an early catch-all would hide the order of everything after it.
PATTERNS = st.tuples(st.integers(0, 9), DOMAINS).map(lambda kd: "*" if kd[0] == 0 else f"*.{kd[1]}" if kd[0] % 2 else kd[1])
GATEWAYS = st.one_of(
    st.none(),
    DOMAINS.map(lambda d: f"{d}.example"),
    st.ip_addresses().map(lambda ip: ip.compressed),
)


@st.composite
def rules(draw: st.DrawFn) -> GatewayRule:
    gateway = draw(GATEWAYS)
    port = 25 if gateway is None else draw(st.integers(1, 65535))
    return GatewayRule(draw(st.integers(1, 10**6)), draw(PATTERNS), gateway, port)


@st.composite
def tables(draw: st.DrawFn) -> GatewayTable:
    """Only the patterns matter to matching; the line number tells the rules apart."""
    patterns = draw(st.lists(PATTERNS, max_size=12))
    return GatewayTable([GatewayRule(n, pattern, "gw.example", 25) for n, pattern in enumerate(patterns, start=1)])


@st.composite
def near_domains(draw: st.DrawFn, gateways: GatewayTable) -> str:
    """A random domain, or one at or under a pattern of the table, so that several rules often match."""
    bases = [rule.pattern.removeprefix("*.") for rule in gateways.rules if rule.pattern != "*"]
    if not bases or draw(st.booleans()):
        return draw(DOMAINS)
    prefix = draw(st.lists(LABELS, max_size=2))
    return ".".join([*prefix, draw(st.sampled_from(bases))])


def looked_up(domain: str) -> st.SearchStrategy[str]:
    """The same domain as a client might write it: any case, maybe a trailing dot, maybe U-labels."""
    unicode = domain.replace("xn--wgv71a", "日本")
    return st.sampled_from([domain, domain.upper(), domain + ".", unicode])


def matches(pattern: str, domain: str) -> bool:
    """The SPEC's words, literally."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def reference_lookup(gateways: GatewayTable, domain: str) -> GatewayRule | None:
    return next((rule for rule in gateways.rules if matches(rule.pattern, domain)), None)


@settings(max_examples=300)
@given(tables(), st.data())
def test_lookup_agrees_with_linear_first_match(gateways: GatewayTable, data: st.DataObject) -> None:
    domain = data.draw(near_domains(gateways))
    assert gateways.lookup(data.draw(looked_up(domain))) == reference_lookup(gateways, domain)


@settings(max_examples=300)
@given(tables(), st.data())
def test_is_operated_agrees_with_linear_scan_of_non_star_rules(gateways: GatewayTable, data: st.DataObject) -> None:
    domain = data.draw(near_domains(gateways))
    expected = any(rule.pattern != "*" and matches(rule.pattern, domain) for rule in gateways.rules)
    assert gateways.is_operated(data.draw(looked_up(domain))) == expected


@given(DOMAINS, DOMAINS)
def test_star_dot_domain_never_matches_the_domain_itself(parent: str, other: str) -> None:
    gateways = table(f"*.{parent},gw.example")
    assert gateways.lookup(parent) is None
    assert gateways.lookup(f"{other}.{parent}") is not None


@given(DOMAINS)
def test_star_matches_every_domain(domain: str) -> None:
    assert table("*,gw.example").lookup(domain) == GatewayRule(1, "*", "gw.example", 25)


@given(rules())
def test_formatted_rule_parses_back_to_itself(rule: GatewayRule) -> None:
    assert parse_gateway_rule(str(rule), rule.line) == rule


@given(st.text(st.sampled_from("*.ab,mxMX[]:19 日"), max_size=20))
def test_any_line_either_parses_to_a_stable_rule_or_raises_value_error(text: str) -> None:
    try:
        rule = parse_gateway_rule(text, 1)
    except ValueError:
        return
    assert parse_gateway_rule(str(rule), 1) == rule
