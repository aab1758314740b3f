"""DKIM signatures made by epost, checked by OpenDKIM (not by dkimpy, which made them).

opendkim runs in test mode (-t) with its own config. Debian's opendkim does not
follow a ResolverConfiguration to a non-53 port (tried: no query reached
dnsmasq), so the public keys reach it through TestPublicKeys, in the exact
form `txt_record` tells operators to publish.
"""

from __future__ import annotations

import re
import tempfile
import types
from pathlib import Path

import dkim
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


def test_two_keys_canonicalize_the_body_once_and_sign_as_dkimpy_alone_would(keys, monkeypatch):
    # whitespace that relaxed canonicalization folds, and empty lines it drops at the end
    message = MESSAGE.replace(b"Hello,  relaxed   world.\r\n", b"Hello,\t relaxed   world.  \r\n\r\n \r\n\r\n")
    monkeypatch.setattr(dkim, "time", types.SimpleNamespace(time=lambda: 1796585537))  # one t= for both
    calls = []
    canonicalize = signing._relaxed_body
    monkeypatch.setattr(signing, "_relaxed_body", lambda body: calls.append(body) or canonicalize(body))
    ours = signing.commit_signature(message, keys)
    assert len(calls) == 1  # not once per key
    present = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type", b"from"]
    theirs = b"".join(  # dkimpy's own path: a fresh parse and canonicalization for each key
        dkim.sign(message, key.selector.encode(), key.domain.encode(), key.private,
                  signature_algorithm=b"ed25519-sha256" if key.algorithm == "ed25519" else b"rsa-sha256",
                  canonicalize=(b"relaxed", b"relaxed"), include_headers=present, linesep=b"\r\n")
        for key in keys)
    assert len(calls) == 3  # the reference did canonicalize, once per key
    assert ours == theirs  # RSA PKCS#1 v1.5 and Ed25519 are deterministic: byte for byte
    assert b"h=from:to:subject:date:message-id:mime-version:content-type:from;" in re.sub(rb"\s+", b"", ours)


@pytest.mark.skipif(OPENDKIM is None, reason="opendkim not installed (Debian: opendkim)")
def test_the_commit_path_signatures_pass_opendkim(keys, tmp_path):
    """The comparison above is with dkimpy, whose RSA signing and body canonicalization
    this module replaces: OpenDKIM checks the signatures the spool worker makes."""
    message = MESSAGE.replace(b"Hello,  relaxed   world.\r\n", b"Hello,\t relaxed   world.  \r\n\r\n \r\n\r\n")
    out = _opendkim_verify(signing.commit_signature(message, keys) + message, keys, tmp_path)
    assert "dkim=pass" in out and "header.s=r202612" in out and "header.s=e202612" in out, out
    assert "dkim=fail" not in out and "failed" not in out, out


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


def test_a_long_rsa_record_is_split_as_check_dns_splits_its_fixes(keys):
    from epost.admin.dns_check import zone_txt

    rsa_key = next(k for k in keys if k.algorithm == "rsa")
    record = signing.txt_record(rsa_key)
    value = f"v=DKIM1; k=rsa; p={rsa_key.public_b64}"
    assert len(value) > 255 and record == zone_txt(f"{rsa_key.selector}._domainkey.example.test", value)
    assert [len(part) for part in record.split(" IN TXT ")[1].split('" "')][0] == 256  # '"' + 255 octets


def test_unreadable_or_garbage_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(signing.DkimKeyError, match="bad.pem"):
        signing.load_key("example.test", "s", bad)
    with pytest.raises(signing.DkimKeyError, match="missing.pem"):
        signing.load_key("example.test", "s", tmp_path / "missing.pem")
