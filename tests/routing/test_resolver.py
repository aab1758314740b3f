"""The routing chain: aliases first, then local, gateway.dat, SMTP gateway, MX."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hypothesis import given, strategies as st

from epost.config import Config, HostPort, RoutingConfig, ServerConfig
from epost.routing.aliases import parse_aliases
from epost.routing.gateway import parse_gateway_table
from epost.routing.resolver import GatewayRouter, LocalRouter, MXRouter, Resolver, Route, SmartHostRouter
from epost.routing.users import load_users
from epost.routing_chain import build_routing
from epost.address import parse_mailbox

LOCAL = frozenset({"example.jp"})


def lines(text):
    return [(n, l.strip()) for n, l in enumerate(text.splitlines(), 1) if l.strip() and not l.startswith("#")]


def make_resolver(tmp_path: Path, *, forward_all=False, smarthost=None, gateway_text="", alias_text=""):
    (tmp_path / "users").write_text("alice@example.jp\n")
    users = load_users(tmp_path / "users")
    aliases = parse_aliases(lines(alias_text), "aliases")
    gateway = parse_gateway_table(lines(gateway_text), "gateway.dat")
    routers = [] if forward_all else [LocalRouter(LOCAL, lambda: users)]
    routers.append(GatewayRouter(lambda: gateway))
    if smarthost:
        routers.append(SmartHostRouter(smarthost))
    routers.append(MXRouter())
    return Resolver(routers, lambda: aliases, LOCAL)


def rules(resolution):
    return [route.rule for _, route in resolution.finals]


def test_each_step_names_its_rule(tmp_path):
    resolver = make_resolver(
        tmp_path,
        smarthost=HostPort("smtp.isp.example", 587),
        gateway_text="# comment\n*.abc.jp,smtp01.domain.jp,25\npartner.jp,mx\n",
        alias_text="info: alice@example.jp\n",
    )
    info = resolver.resolve(parse_mailbox("info@example.jp"))
    assert [s.rule for s in info.steps] == ["aliases:1"] and rules(info) == ["local"]
    assert info.finals[0][1].mailbox == "example.jp/alice"
    bob = resolver.resolve(parse_mailbox("bob@x.abc.jp"))
    assert rules(bob) == ["gateway.dat:2"] and bob.finals[0][1].hosts == (HostPort("smtp01.domain.jp", 25),)
    carol = resolver.resolve(parse_mailbox("carol@partner.jp"))
    assert rules(carol) == ["gateway.dat:3"] and carol.finals[0][1].mx_domain == "partner.jp"
    dave = resolver.resolve(parse_mailbox("dave@else.jp"))
    assert rules(dave) == ["smtp_gateway"] and dave.finals[0][1].hosts == (HostPort("smtp.isp.example", 587),)
    eve = resolver.resolve(parse_mailbox("eve@example.jp"))
    assert eve.rejected and eve.finals[0][1].reply.enhanced == "5.1.1"


def test_without_smarthost_other_domains_go_by_mx(tmp_path):
    resolution = make_resolver(tmp_path).resolve(parse_mailbox("x@else.jp"))
    assert rules(resolution) == ["mx"] and resolution.finals[0][1].mx_domain == "else.jp"


def test_star_rule_makes_the_smtp_gateway_unreachable(tmp_path):
    resolver = make_resolver(tmp_path, smarthost=HostPort("smart.example", 25), gateway_text="*,catchall.example,2525\n")
    assert rules(resolver.resolve(parse_mailbox("x@else.jp"))) == ["gateway.dat:1"]


def test_forward_all_skips_local_but_never_aliases(tmp_path):
    resolver = make_resolver(tmp_path, forward_all=True, gateway_text="*,gw.example,25\n", alias_text="info: alice@example.jp\n")
    resolution = resolver.resolve(parse_mailbox("info@example.jp"))
    assert [s.rule for s in resolution.steps] == ["aliases:1"]
    assert rules(resolution) == ["gateway.dat:1"]  # alice@example.jp is forwarded, not delivered locally


def test_address_literal_is_relayed_to_that_ip(tmp_path):
    resolution = make_resolver(tmp_path).resolve(parse_mailbox("x@[192.0.2.7]"))
    assert resolution.finals[0][1].hosts == (HostPort("192.0.2.7", 25),)


class NoUsers:
    def mailbox(self, address):
        return None


@given(st.booleans(), st.sampled_from(["alice", "info", "x"]), st.sampled_from(["example.jp", "else.jp"]))
def test_aliases_are_consulted_before_every_router(forward_all, local, domain):
    resolver = Resolver(
        ([] if forward_all else [LocalRouter(LOCAL, NoUsers)]) + [MXRouter()],
        lambda: parse_aliases(lines("info@example.jp: z@remote.example\nx@else.jp: z@remote.example\n"), "a"),
        LOCAL,
    )
    resolution = resolver.resolve(parse_mailbox(f"{local}@{domain}"))
    if (local, domain) in {("info", "example.jp"), ("x", "else.jp")}:
        # an alias wins even over the local step, and even when forward_all drops it
        assert [s.rule for s in resolution.steps] == ["aliases:1" if local == "info" else "aliases:2"]
        assert [str(a) for a, _ in resolution.finals] == ["z@remote.example"] and rules(resolution) == ["mx"]
    else:
        assert resolution.steps == ()
        expected = "local" if domain == "example.jp" and not forward_all else "mx"
        assert rules(resolution) == [expected]


@given(st.sampled_from(["alice@example.jp", "eve@example.jp", "x@y.abc.jp", "p@partner.jp", "d@else.jp", "l@[192.0.2.7]", "l@[IPv6:2001:db8::1]"]))
def test_routes_survive_the_envelope_round_trip(tmp_path_factory, address):
    resolver = make_resolver(
        tmp_path_factory.mktemp("r"),
        smarthost=None,
        gateway_text="*.abc.jp,smtp01.domain.jp,2525\npartner.jp,mx\n",
    )
    for _, route in resolver.resolve(parse_mailbox(address)).finals:
        assert Route.from_dict(route.to_dict()) == route


def test_build_routing_follows_the_config(tmp_path):
    (tmp_path / "gateway.dat").write_text("*,gw.example,25\n")
    config = Config(
        ServerConfig(hostname="mx.test", relay_networks=(ipaddress.ip_network("127.0.0.0/8"),)),
        RoutingConfig(
            local_domains=("example.jp",),
            users=tmp_path / "users",
            aliases=tmp_path / "aliases",
            gateway_table=tmp_path / "gateway.dat",
            forward_all_to_gateway=True,
        ),
    )
    routing = build_routing(config)
    resolver = routing.resolver
    assert [t.path.name for t in routing.tables] == ["users", "aliases", "gateway.dat", "relay_recipients"]
    assert [r.name for r in resolver.routers] == ["gateway.dat", "mx"]
    assert rules(resolver.resolve(parse_mailbox("alice@example.jp"))) == ["gateway.dat:1"]
