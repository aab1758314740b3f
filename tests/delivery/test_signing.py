"""DKIM signatures made by epost, checked by OpenDKIM (not by dkimpy, which made them).

opendkim runs in test mode (-t) with its own config. Debian's opendkim does not
follow a ResolverConfiguration to a non-53 port (tried: no query reached
dnsmasq), so the public keys reach it through TestPublicKeys, in the exact
form `txt_record` tells operators to publish.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from epost.delivery import signing
from opendkim_check import OPENDKIM, opendkim_verify as _opendkim_verify


MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@elsewhere.test\r\n"
    b"Subject: signed by epost\r\n"
    b"Date: Sun, 06 Dec 2026 15:00:00 +0000\r\n"
    b"Message-ID: <dkim-1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Hello,  relaxed   world.\r\n"
)


@pytest.fixture
def keys(tmp_path):
    _, rsa_key = signing.keygen("example.test", tmp_path / "dkim", "r202612", "rsa")
    _, ed_key = signing.keygen("example.test", tmp_path / "dkim", "e202612", "ed25519")
    return rsa_key, ed_key


@pytest.mark.skipif(OPENDKIM is None, reason="opendkim not installed (Debian: opendkim)")
def test_rsa_and_ed25519_signatures_pass_opendkim(keys, tmp_path):
    signed = signing.sign(MESSAGE, keys) + MESSAGE
    out = _opendkim_verify(signed, keys, tmp_path)
    assert "dkim=pass" in out and "header.s=r202612" in out and "header.s=e202612" in out, out
    assert "dkim=fail" not in out and "failed" not in out, out


@pytest.mark.skipif(OPENDKIM is None, reason="opendkim not installed (Debian: opendkim)")
def test_body_changed_after_signing_fails_opendkim(keys, tmp_path):
    signed = signing.sign(MESSAGE, keys) + MESSAGE.replace(b"world", b"World")
    out = _opendkim_verify(signed, keys, tmp_path)
    assert "dkim=pass" not in out, out


def test_from_is_oversigned_and_absent_headers_are_not_listed(keys):
    sig = signing.sign(MESSAGE, keys[:1]).decode().replace("\r\n ", "").replace(" ", "")
    h = sig.split("h=")[1].split(";")[0].split(":")
    assert h.count("from") == 2
    assert "cc" not in h and "list-unsubscribe" not in h


def test_keys_of_closest_matching_domain_sign(keys, tmp_path):
    _, other = signing.keygen("sub.example.test", tmp_path / "dkim", "s1", "ed25519")
    all_keys = (*keys, other)
    assert signing.keys_for("a.b.example.test", all_keys) == keys
    assert signing.keys_for("x.sub.example.test", all_keys) == (other,)
    assert signing.keys_for("example.org", all_keys) == ()


def test_keygen_writes_0600_key_and_prints_record(tmp_path):
    path, key = signing.keygen("example.test", tmp_path / "dkim", key_type="ed25519")
    assert path.stat().st_mode & 0o777 == 0o600
    assert signing.txt_record(key).startswith(f"{key.selector}._domainkey.example.test. IN TXT \"v=DKIM1; k=ed25519; p=")
    assert key.selector.startswith("e2") and len(key.selector) == 7


def test_unreadable_or_garbage_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(signing.DkimKeyError, match="bad.pem"):
        signing.load_key("example.test", "s", bad)
    with pytest.raises(signing.DkimKeyError, match="missing.pem"):
        signing.load_key("example.test", "s", tmp_path / "missing.pem")
