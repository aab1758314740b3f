"""`epost check-dns DOMAIN` (SPEC §9, issue 15) end to end, against a private dnsmasq on loopback.

A fully good domain exits 0; each missing or wrong record gives its line and
the record to publish; a DNS server that never answers gives one clear line.
"""

from __future__ import annotations

import socket
import time

import pytest

from epost.admin.cli import main
from epost.delivery.signing import keygen, txt_record
from tests.routing.dnsmasq import Dnsmasq

GOOD = {
    "mx": "--mx-host=example.test,mail.example.test,10",
    "host": "--host-record=mail.example.test,192.0.2.25",  # A, and the PTR of 192.0.2.25
    "spf": "--txt-record=example.test,v=spf1 mx -all",
    "dmarc": "--txt-record=_dmarc.example.test,v=DMARC1; p=reject; rua=mailto:dmarc@example.test",
}
REVERSE = "--local=/in-addr.arpa/"  # an unknown PTR is NXDOMAIN, not REFUSED


@pytest.fixture
def keys(tmp_path):
    _, key = keygen("example.test", tmp_path / "dkim", "s1", "ed25519")
    _, other = keygen("example.test", tmp_path / "other", "s1", "ed25519")
    return key, other


def check_dns(tmp_path, records: list[str], server: str | None = None) -> tuple[int, str, float]:
    """Run the command against dnsmasq serving `records` (or against `server`); (status, output, seconds)."""
    dns = None
    if server is None:
        dns = Dnsmasq([*records, REVERSE])
        dns.start()
        server = f"127.0.0.1:{dns.port}"
    config = tmp_path / "epost.toml"
    config.write_text(
        '[server]\nhostname = "mail.example.test"\npublic_addresses = ["192.0.2.25"]\n'
        f'[routing]\ndns_servers = ["{server}"]\n'
        '[[dkim.keys]]\ndomain = "example.test"\nselector = "s1"\nkey = "dkim/example.test.s1.ed25519.pem"\n'
    )
    started = time.monotonic()
    try:
        status = main(["--config", str(config), "check-dns", "example.test"])
    finally:
        if dns is not None:
            dns.cleanup()
    return status, started, time.monotonic() - started


def records(key, **changes: str | None) -> list[str]:
    """The good domain's records with some replaced (a string) or left out (None)."""
    chosen = {**GOOD, "dkim": f"--txt-record=s1._domainkey.example.test,v=DKIM1; k=ed25519; p={key.public_b64}", **changes}
    return [option for option in chosen.values() if option is not None]


def test_a_fully_good_domain_is_all_ok_and_exits_0(tmp_path, keys, capsys):
    status, _, _ = check_dns(tmp_path, records(keys[0]))
    out = capsys.readouterr().out
    assert status == 0, out
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "mx"], ["ok", "spf"], ["ok", "dkim"], ["ok", "dmarc"], ["ok", "rdns"],
    ], out
    assert "ok    mx     example.test: MX 10 mail.example.test (192.0.2.25)" in lines
    assert "ok    spf    example.test: pass for 192.0.2.25 (mx): v=spf1 mx -all" in lines
    assert "ok    rdns   192.0.2.25: PTR mail.example.test resolves back to 192.0.2.25" in lines
    assert "fix:" not in out


@pytest.mark.parametrize("change, status, line, fix", [
    ({"mx": None, "spf": "--txt-record=example.test,v=spf1 a:mail.example.test -all"}, 1, "fail  mx     example.test: no MX record and no address",
     "fix: publish example.test. IN MX 10 mail.example.test."),
    ({"spf": "--txt-record=example.test,v=spf1 ip4:198.51.100.0/24 ~all"}, 1,
     "fail  spf    example.test: softfail for 192.0.2.25",
     'fix: publish example.test. IN TXT "v=spf1 ip4:192.0.2.25 ip4:198.51.100.0/24 ~all"'),
    ({"spf": None}, 1, "fail  spf    example.test: no SPF record",
     'fix: publish example.test. IN TXT "v=spf1 ip4:192.0.2.25 -all"'),
    ({"dmarc": None}, 1, "fail  dmarc  _dmarc.example.test: no record",
     'fix: publish _dmarc.example.test. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@example.test"'),
    ({"dmarc": "--txt-record=_dmarc.example.test,v=DMARC1; p=none; rua=mailto:dmarc@example.test"}, 0,
     "warn  dmarc  _dmarc.example.test: p=none",
     'fix: when ready, publish _dmarc.example.test. IN TXT "v=DMARC1; p=quarantine; rua=mailto:dmarc@example.test"'),
    ({"host": "--address=/mail.example.test/192.0.2.25"}, 1, "fail  rdns   192.0.2.25: no PTR record",
     "fix: publish 25.2.0.192.in-addr.arpa. IN PTR mail.example.test."),
    ({"host": "--address=/mail.example.test/192.0.2.25", "ptr": "--ptr-record=25.2.0.192.in-addr.arpa,gone.example.test"},
     1, "fail  rdns   192.0.2.25: PTR gone.example.test does not resolve back to 192.0.2.25",
     "fix: publish gone.example.test. IN A 192.0.2.25"),
])
def test_each_missing_or_wrong_record_gives_its_line_and_fix(tmp_path, keys, capsys, change, status, line, fix):
    got, _, _ = check_dns(tmp_path, records(keys[0], **change))
    out = capsys.readouterr().out
    assert got == status, out
    lines = out.splitlines()
    at = next((i for i, text in enumerate(lines) if text.startswith(line)), None)
    assert at is not None, out
    assert lines[at + 1].strip().startswith(fix), out
    others = [text for i, text in enumerate(lines) if i != at and not text.startswith(" ")]
    assert all(text.startswith("ok ") for text in others), out  # only the broken record is reported


def test_a_selector_publishing_another_key_fails_with_the_record_to_publish(tmp_path, keys, capsys):
    key, other = keys
    status, _, _ = check_dns(tmp_path, records(other))
    out = capsys.readouterr().out
    assert status == 1
    assert "fail  dkim   s1._domainkey.example.test: publishes another key" in out
    assert f"fix: publish {txt_record(key)}" in out


def test_a_dns_server_that_never_answers_gives_one_clear_line(tmp_path, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never read: queries go unanswered
        silent.bind(("127.0.0.1", 0))
        status, _, seconds = check_dns(tmp_path, [], server=f"127.0.0.1:{silent.getsockname()[1]}")
    captured = capsys.readouterr()
    assert status == 1
    assert captured.out.startswith("fail  dns    no answer from the DNS: example.test MX: no answer within 4 s\n"), captured
    assert "fix: check [routing] dns_servers" in captured.out
    assert "Traceback" not in captured.out + captured.err
    assert seconds < 10  # one query's time, not one per check
