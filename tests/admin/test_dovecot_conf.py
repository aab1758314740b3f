"""`epost dovecot-conf` (issue 17): listener parsing and what the config promises; the real
Dovecot runs it in tests/e2e/test_dovecot_e2e.py and tests/delivery/test_lmtp_dovecot.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from epost.admin.dovecot import DovecotConfError, Listener, dovecot_conf, mail_owner, parse_listener, parse_lmtp_endpoint
from epost.config import load_config


@pytest.mark.parametrize("text, expected", [
    ("143", Listener("*", 143)),
    ("127.0.0.1:1143", Listener("127.0.0.1", 1143)),
    ("[::1]:110", Listener("::1", 110)),
])
def test_listener_forms(text, expected):
    assert parse_listener(text, 143) == expected


@pytest.mark.parametrize("text", ["", "0", "70000", "host:", "abc", "127.0.0.1:x"])
def test_bad_listeners_are_refused(text):
    with pytest.raises(ValueError):
        parse_listener(text, 143)


def test_lmtp_endpoints():
    assert parse_lmtp_endpoint("unix:/run/dovecot/lmtp") == ("unix", "/run/dovecot/lmtp")
    assert parse_lmtp_endpoint("tcp:127.0.0.1:24") == ("tcp", "127.0.0.1:24")
    for bad in ("unix:relative", "lmtp:unix:/x", "tcp:", "smtp:25"):
        with pytest.raises(ValueError):
            parse_lmtp_endpoint(bad)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_config_uses_the_maildirs_owner_the_users_file_and_the_certificate(tmp_path: Path):
    spool = tmp_path / "spool"
    (spool / "mailboxes").mkdir(parents=True)
    os.chown(spool / "mailboxes", 65534, 65534)
    (tmp_path / "epost.toml").write_text(f'[server]\nhostname = "mx.example.test"\nspool = "{spool}"\n'
                                         f'[routing]\nusers = "{tmp_path / "users"}"\n')
    config = load_config(tmp_path / "epost.toml", {})
    text = dovecot_conf(config, cert=Path("/c.pem"), key=Path("/k.pem"), imap=Listener("*", 143),
                        pop3=None, lmtp=("unix", "/run/lmtp"))
    lines = {line.strip() for line in text.splitlines()}
    assert {"mail_uid = 65534", "mail_gid = 65534", "protocols = imap lmtp", "ssl_cert = </c.pem",
            "ssl_key = </k.pem", f"mail_location = maildir:{spool}/mailboxes/%Ld/%Ln",
            f"args = scheme=CRYPT username_format=%Lu {tmp_path / 'users'}", "unix_listener /run/lmtp {"} <= lines
    assert "service pop3-login {" not in lines


def test_root_owned_or_missing_maildirs_are_refused(tmp_path: Path):
    with pytest.raises(DovecotConfError, match="install -d"):
        mail_owner(tmp_path / "missing")
    if os.geteuid() == 0:
        with pytest.raises(DovecotConfError, match="owned by root"):
            mail_owner(tmp_path)
