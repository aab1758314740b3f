"""How the checks turn what DKIM verification and DMARC lookups meet into results (no network:
the DNS answers come from a dict). OpenDKIM-signed mail and real DNS: tests/e2e/test_authres_e2e.py."""

from __future__ import annotations

import base64
import subprocess
import time

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from epost.delivery import signing
from epost.routing.records import DnsUnavailable
from epost.smtp.authcheck import budgeted, check_resolver, dkim_results, dmarc_result

MESSAGE = (b"From: Alice <alice@mail.example.org>\r\nTo: bob@example.jp\r\nSubject: hi\r\n"
           b"Date: Sun, 06 Dec 2026 15:00:00 +0000\r\n\r\nHello.\r\n")


class Answers:
    """A `Lookup` of TXT records from a dict; a value of DnsUnavailable raises it."""

    def __init__(self, records: dict):
        self.records, self.asked = records, []

    def __call__(self, name: str, rdtype: str) -> list[str]:
        assert rdtype == "TXT"
        self.asked.append(name)
        value = self.records.get(name, [])
        if value is DnsUnavailable:
            raise DnsUnavailable(f"{name} TXT: no answer within 4 s")
        return list(value)


def org(domain: str) -> str:
    return ".".join(domain.split(".")[-2:])


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dkim")
    return (signing.keygen("example.org", folder, "r1", "rsa")[1], signing.keygen("example.org", folder, "e1", "ed25519")[1])


def published(*keys) -> dict:
    return {f"{k.selector}._domainkey.{k.domain}": [f"v=DKIM1; k={k.algorithm}; p={k.public_b64}"] for k in keys}


def signed_by(keys, message=MESSAGE) -> bytes:
    return signing.sign(message, keys, signing_domain="example.org") + message


def test_each_signature_gets_its_own_result(keys):
    results, passed = dkim_results(Answers(published(*keys)), signed_by(keys))
    assert [(r.result, dict(r.properties)["header.s"]) for r in results] == [("pass", "r1"), ("pass", "e1")]
    assert passed == ["example.org", "example.org"]


def test_an_altered_body_fails_and_a_missing_key_is_permerror(keys):
    altered = signed_by(keys[:1]).replace(b"Hello.", b"Hello!")
    [result], passed = dkim_results(Answers(published(*keys)), altered)
    assert (result.result, result.reason, passed) == ("fail", "body hash did not verify", [])
    [result], _ = dkim_results(Answers({}), signed_by(keys[:1]))
    assert (result.result, result.reason) == ("permerror", "no key for signature")


def test_an_altered_signed_header_fails(keys):
    altered = signed_by(keys[:1]).replace(b"Subject: hi", b"Subject: HI")
    [result], _ = dkim_results(Answers(published(*keys)), altered)
    assert (result.result, result.reason) == ("fail", "signature did not verify")


def test_dns_trouble_is_temperror_and_a_broken_signature_neutral(keys):
    message = signed_by(keys[:1])
    [result], _ = dkim_results(Answers({"r1._domainkey.example.org": DnsUnavailable}), message)
    assert result.result == "temperror" and ("header.d", "example.org") in result.properties
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org\r\n" + MESSAGE  # no s=, b=, bh=, h=
    [result], _ = dkim_results(Answers({}), broken)
    assert result.result == "neutral"


def test_no_signature_is_none():
    assert [r.result for r in dkim_results(Answers({}), MESSAGE)[0]] == ["none"]


def test_a_key_under_1024_bits_is_permerror():
    """RFC 8301: verifiers must not accept keys under 1024 bits."""
    made = subprocess.run(["openssl", "genrsa", "768"], capture_output=True)  # cryptography refuses to make one
    if made.returncode != 0:
        pytest.skip("openssl cannot make a 768-bit key here")
    pem = made.stdout
    private = serialization.load_pem_private_key(pem, None)
    public = base64.b64encode(private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    sig = dkim.sign(MESSAGE, b"small", b"example.org", pem, include_headers=[b"from", b"subject"], linesep=b"\r\n")
    [result], passed = dkim_results(Answers({"small._domainkey.example.org": [f"v=DKIM1; k=rsa; p={public}"]}), sig + MESSAGE)
    assert result.result == "permerror" and passed == []


def test_dmarc_falls_back_to_the_organizational_domain_record():
    answers = Answers({"_dmarc.example.org": ["v=DMARC1; p=quarantine; sp=reject"]})
    result = dmarc_result(answers, MESSAGE, None, ["example.org"], org)
    assert answers.asked == ["_dmarc.mail.example.org", "_dmarc.example.org"]
    assert (result.result, result.comment, result.properties) == ("pass", "p=quarantine sp=reject", (("header.from", "mail.example.org"),))


def test_dmarc_without_a_record_is_none_and_with_two_records_too():
    assert dmarc_result(Answers({}), MESSAGE, None, [], org).result == "none"
    two = Answers({"_dmarc.mail.example.org": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]})
    assert dmarc_result(two, MESSAGE, None, [], org).result == "none"


def test_a_v_dmarc10_record_is_not_a_dmarc_record():
    """RFC 7489 §6.3: v=DMARC1 matched precisely; the look-alike is not counted, so the real record stands alone."""
    alone = Answers({"_dmarc.mail.example.org": ["v=DMARC10; p=reject"]})
    assert dmarc_result(alone, MESSAGE, None, [], org).result == "none"
    assert alone.asked == ["_dmarc.mail.example.org", "_dmarc.example.org"]
    beside = Answers({"_dmarc.mail.example.org": ["v=DMARC10; p=none", "v=DMARC1; p=reject"]})
    result = dmarc_result(beside, MESSAGE, None, [], org)
    assert (result.result, result.comment) == ("fail", "p=reject")


def test_dmarc_temperror_and_no_single_from():
    slow = Answers({"_dmarc.mail.example.org": DnsUnavailable})
    assert dmarc_result(slow, MESSAGE, "example.org", [], org).result == "temperror"
    two_from = b"From: a@x.example.org, b@y.example.org\r\n\r\n"
    assert dmarc_result(Answers({}), two_from, None, [], org).result == "permerror"


def test_the_budget_caps_every_query_and_a_spent_one_asks_nothing():
    from types import SimpleNamespace

    resolver = check_resolver([SimpleNamespace(host="127.0.0.1", port=9)])  # loopback, nothing answers
    started = time.monotonic()
    with pytest.raises(DnsUnavailable):
        budgeted(resolver, started + 0.3)("example.org", "TXT")
    assert time.monotonic() - started < 1.0  # not the resolver's own 1.5 s per try
    with pytest.raises(DnsUnavailable, match="time budget spent"):
        budgeted(resolver, started - 1)("example.org", "TXT")


def test_one_job_asks_each_name_once():
    """SPF for MAIL FROM and for HELO often ask the same name; TTL 0 answers would be asked twice."""
    import dns.resolver

    class Counting:
        calls = 0

        def resolve(self, name, rdtype, lifetime, search):
            Counting.calls += 1
            assert 0 < lifetime <= 5
            raise dns.resolver.NXDOMAIN

    lookup = budgeted(Counting(), time.monotonic() + 5)
    assert lookup("client.example", "TXT") == [] and lookup("Client.Example.", "TXT") == []
    assert Counting.calls == 1


def test_a_remembered_name_past_the_deadline_is_not_answered_from_memory(monkeypatch):
    """The memo used to answer before the deadline was looked at: a key name
    repeated in 40 signatures was never stopped by the budget."""
    import dns.resolver

    from epost.smtp import authcheck

    class Empty:
        def resolve(self, name, rdtype, lifetime, search):
            raise dns.resolver.NXDOMAIN

    now = [100.0]
    monkeypatch.setattr(authcheck.time, "monotonic", lambda: now[0])
    lookup = budgeted(Empty(), 105.0)
    assert lookup("s._domainkey.example.org", "TXT") == []
    now[0] = 106.0
    with pytest.raises(DnsUnavailable, match="time budget spent"):
        lookup("s._domainkey.example.org", "TXT")


def _many_signatures(keys, count: int, body: bytes = b"Hello.\r\n") -> bytes:
    message = MESSAGE.replace(b"Hello.\r\n", body)
    signature = signing.sign(message, keys[:1], signing_domain="example.org")
    return signature * count + message


def test_at_most_eight_signatures_are_verified_and_the_rest_are_one_policy_result(keys):
    answers = Answers(published(*keys))
    results, passed = dkim_results(answers, _many_signatures(keys, 12))
    assert [r.result for r in results] == ["pass"] * 8 + ["policy"]
    assert results[-1].reason == "too many signatures: 4 of 12 not verified" and passed == ["example.org"] * 8
    assert len(answers.asked) == 8


def test_no_signature_is_verified_after_the_deadline(keys, monkeypatch):
    """Each verification hashes the whole body again: the deadline is looked at before each one."""
    from epost.smtp import authcheck

    now = [0.0]
    monkeypatch.setattr(authcheck.time, "monotonic", lambda: now[0])
    answers = Answers(published(*keys))

    def slow(name, rdtype):  # the first verification uses up the budget
        now[0] = 10.0
        return answers(name, rdtype)

    results, passed = dkim_results(slow, _many_signatures(keys, 5), deadline=5.0)
    assert [r.result for r in results] == ["pass", "temperror"]
    assert results[1].reason == "time budget spent: 4 of 5 signatures not verified" and len(answers.asked) == 1
