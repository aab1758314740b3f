"""`epost dkim keygen` (issue 15): key under <config dir>/dkim/, mode 0600, TXT record printed."""

from __future__ import annotations

import datetime

import pytest

from epost.admin.cli import main
from epost.delivery.signing import load_key


def test_keygen_writes_key_next_to_config_and_prints_record(tmp_path, capsys):
    config = tmp_path / "epost.toml"
    config.write_text("")
    now = datetime.datetime(2026, 12, 6, tzinfo=datetime.timezone.utc).timestamp()
    assert main(["--config", str(config), "dkim", "keygen", "example.test"], now=now) == 0
    out = capsys.readouterr().out
    path = tmp_path / "dkim" / "example.test.e202612.rsa.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    key = load_key("example.test", "e202612", path)
    assert f'e202612._domainkey.example.test. IN TXT "v=DKIM1; k=rsa; p={key.public_b64[:200]}' in out


def test_keygen_ed25519_with_selector(tmp_path, capsys):
    config = tmp_path / "epost.toml"
    config.write_text("")
    assert main(["--config", str(config), "dkim", "keygen", "example.test", "--selector", "s1", "--type", "ed25519"]) == 0
    assert 's1._domainkey.example.test. IN TXT "v=DKIM1; k=ed25519; p=' in capsys.readouterr().out
    assert (tmp_path / "dkim" / "example.test.s1.ed25519.pem").exists()


def test_check_config_names_a_bad_dkim_key(tmp_path, capsys):
    config = tmp_path / "epost.toml"
    assert main(["--config", str(config), "dkim", "keygen", "example.test", "--selector", "s1"]) == 0
    (tmp_path / "dkim" / "broken.pem").write_text("garbage")
    config.write_text(
        '[[dkim.keys]]\ndomain = "example.test"\nselector = "s1"\nkey = "dkim/example.test.s1.rsa.pem"\n'
        '[[dkim.keys]]\ndomain = "example.test"\nselector = "s2"\nkey = "dkim/broken.pem"\n'
    )
    capsys.readouterr()
    assert main(["--config", str(config), "check-config"]) == 1
    out = capsys.readouterr().out
    assert "dkim key example.test/s2:" in out and "broken.pem" in out
    assert "s1" not in out


@pytest.mark.parametrize("key, selector, problem", [
    ("dkim/nope.pem", "s1", "cannot read "),  # missing
    ("dkim/example.test.s0.ed25519.pem", "s1", "was made for example.test.s0 "),  # mismatched: another selector's key
])
def test_a_missing_or_mismatched_dkim_key_stops_start_up_with_one_line(tmp_path, capsys, key, selector, problem):
    from epost.delivery.signing import keygen
    from epost.tap import Options, makeService

    keygen("example.test", tmp_path / "dkim", "s0", "ed25519")
    config = tmp_path / "epost.toml"
    config.write_text(
        f'[server]\nspool = "{tmp_path}/spool"\n'
        f'[[dkim.keys]]\ndomain = "example.test"\nselector = "{selector}"\nkey = "{key}"\n'
    )
    options = Options()
    options.parseOptions(["--config", str(config)])
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"epost: dkim key example.test/{selector}: ") and problem in err and key.split("/")[1] in err, err
    assert err.count("\n") == 1
    assert main(["--config", str(config), "check-config"]) == 1  # check-config makes the same check
    out = capsys.readouterr().out
    assert f"dkim key example.test/{selector}: " in out and problem in out
