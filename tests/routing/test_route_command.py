"""`epost route ADDRESS` (SPEC §8), with MX answers from a real dnsmasq."""

from __future__ import annotations

import pytest
from dnsmasq import DNSMASQ, Dnsmasq

from epost.admin.cli import main


@pytest.fixture
def config(tmp_path):
    (tmp_path / "users").write_text("alice@example.jp\n")
    (tmp_path / "aliases").write_text("# aliases\n\ninfo: alice@example.jp\n")
    (tmp_path / "gateway.dat").write_text("# pattern,gateway,port\n*.abc.jp,smtp01.domain.jp,25\npartner.test,mx\n")
    path = tmp_path / "epost.toml"
    path.write_text(
        '[server]\nhostname = "mx.example.jp"\n'
        '[routing]\nlocal_domains = ["example.jp"]\nusers = "users"\naliases = "aliases"\n'
        'gateway_table = "gateway.dat"\nsmtp_gateway = "smtp.isp.example"\n'
    )
    return path


def route(capsys, *args) -> tuple[int, list[str]]:
    status = main(["route", *args])
    return status, capsys.readouterr().out.splitlines()


def test_each_rule_kind_is_printed_as_the_spec_shows(config, capsys):
    assert route(capsys, "info@example.jp", "--config", str(config)) == (0, [
        "info@example.jp: alias via aliases:3 -> alice@example.jp",
        "alice@example.jp: local via local -> mailbox example.jp/alice",
    ])
    assert route(capsys, "--config", str(config), "bob@x.abc.jp")[1] == ["bob@x.abc.jp: relay via gateway.dat:2 -> smtp01.domain.jp:25"]
    assert route(capsys, "dave@else.jp", "--config", str(config))[1] == ["dave@else.jp: relay via smtp_gateway -> smtp.isp.example:25"]


def test_rejected_address_exits_1(config, capsys):
    status, lines = route(capsys, "eve@example.jp", "--config", str(config))
    assert status == 1
    assert lines[0].startswith("eve@example.jp: reject via local -> 550 5.1.1")


def test_mx_rule_and_plain_dns_list_hosts_in_preference_order(config, capsys):
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed (Debian: dnsmasq-base)")
    server = Dnsmasq(["--mx-host=partner.test,mx2.partner.test,20", "--mx-host=partner.test,mx1.partner.test,10"])
    server.start()
    try:
        config.write_text(config.read_text().replace('smtp_gateway = "smtp.isp.example"\n', f'dns_servers = ["127.0.0.1:{server.port}"]\n'))
        status, lines = route(capsys, "carol@partner.test", "--config", str(config))
        assert (status, lines) == (0, ["carol@partner.test: relay via gateway.dat:3 -> mx1.partner.test:25, mx2.partner.test:25"])
        status, lines = route(capsys, "x@nowhere.test", "--config", str(config))
        assert (status, lines) == (1, ["x@nowhere.test: reject via mx -> 550 5.1.2 nowhere.test: domain not found"])
    finally:
        server.cleanup()
