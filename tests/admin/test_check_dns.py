"""`epost check-dns DOMAIN`, DKIM lines (issue 15), against a private dnsmasq on loopback."""

from __future__ import annotations

from epost.admin.cli import main
from epost.delivery.signing import keygen
from tests.routing.dnsmasq import Dnsmasq


def test_dkim_selector_publishing_our_key_is_ok_and_a_stale_one_fails(tmp_path, capsys):
    _, good = keygen("example.test", tmp_path / "dkim", "s1", "ed25519")
    _, stale = keygen("example.test", tmp_path / "dkim", "s2", "ed25519")
    _, other = keygen("example.test", tmp_path / "other", "s2", "ed25519")
    dns = Dnsmasq([
        f"--txt-record=s1._domainkey.example.test,v=DKIM1; k=ed25519; p={good.public_b64}",
        "--txt-record=example.test,v=spf1 -all",
        f"--txt-record=s2._domainkey.example.test,v=DKIM1; k=ed25519; p={other.public_b64}",
    ])
    dns.start()
    try:
        config = tmp_path / "epost.toml"
        config.write_text(
            f'[routing]\ndns_servers = ["127.0.0.1:{dns.port}"]\n'
            '[[dkim.keys]]\ndomain = "example.test"\nselector = "s1"\nkey = "dkim/example.test.s1.ed25519.pem"\n'
            '[[dkim.keys]]\ndomain = "example.test"\nselector = "s2"\nkey = "dkim/example.test.s2.ed25519.pem"\n'
        )
        status = main(["--config", str(config), "check-dns", "example.test"])
    finally:
        dns.stop()
    out = capsys.readouterr().out
    assert status == 1, out
    assert "ok   dkim s1._domainkey.example.test" in out
    assert "fail dkim s2._domainkey.example.test" in out and stale.public_b64 in out
    assert "ok   spf example.test: v=spf1 -all" in out
    assert 'fail dmarc _dmarc.example.test: no record; fix: publish _dmarc.example.test. IN TXT "v=DMARC1; p=none;' in out
