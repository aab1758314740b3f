"""Authentication-Results: the header, removing forged ones, DMARC alignment (pure functions)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from epost.headers import header_from_domains
from epost.smtp.authresults import (
    DmarcPolicy,
    MethodResult,
    ResultsFilter,
    aligned,
    authentication_results,
    authserv_id,
    dkim_properties,
    dmarc_verdict,
    parse_dmarc_record,
    property_value,
)

ID = "mx.example.jp"


def remove_our_results(message: bytes, our_id: str) -> bytes:
    """The whole message through one ResultsFilter (the receiver feeds it in chunks)."""
    stream = ResultsFilter(our_id)
    return stream.feed(message) + stream.flush()


def org(domain: str) -> str:
    """A tiny organizational-domain rule for tests: the last two labels (co.uk-style suffixes aside)."""
    labels = domain.split(".")
    return ".".join(labels[-3:] if labels[-2:-1] == ["co"] else labels[-2:])


# --- the header --------------------------------------------------------------


def test_header_has_one_resinfo_per_folded_line_and_our_authserv_id():
    header = authentication_results(ID, [
        MethodResult("spf", "pass", (("smtp.mailfrom", "a@example.com"),)),
        MethodResult("dkim", "fail", dkim_properties("example.com", "s1", "abcdefghijkl"), reason="body hash did not verify"),
        MethodResult("dmarc", "fail", (("header.from", "example.com"),), comment="p=reject"),
    ])
    assert header == (
        b"Authentication-Results: mx.example.jp;\r\n"
        b"\tspf=pass smtp.mailfrom=a@example.com;\r\n"
        b'\tdkim=fail reason="body hash did not verify" header.d=example.com header.s=s1 header.b=abcdefgh;\r\n'
        b"\tdmarc=fail (p=reject) header.from=example.com\r\n"
    )


def test_no_results_is_none():
    assert authentication_results(ID, []) == b"Authentication-Results: mx.example.jp; none\r\n"


def test_values_that_are_neither_token_nor_address_are_quoted():
    assert property_value("a@example.com") == "a@example.com"
    assert property_value("@example.com") == "@example.com"
    assert property_value("ab/cd+e=") == '"ab/cd+e="'
    assert property_value('x"y z') == '"x\\"y z"'


@given(st.text(max_size=40))
def test_a_client_supplied_value_never_breaks_the_header(value):
    """MAIL FROM and HELO come from the client: no CR/LF, no early `;`, one field."""
    header = authentication_results(ID, [MethodResult("spf", "none", (("smtp.helo", value),), reason=value)])
    text = header.decode()
    assert text.endswith("\r\n")
    lines = text[:-2].split("\r\n")
    assert all(line.startswith("\t") for line in lines[1:])
    assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", text[:-2].replace("\r\n\t", ""))
    # the property stays one pvalue: bare (no specials) or one quoted-string
    pvalue = text.split("smtp.helo=", 1)[1][:-2]
    assert re.fullmatch(r'[^\s";]+|"(?:[^"\\]|\\.)*"', pvalue), pvalue


_LONG = st.one_of(st.text(max_size=30), st.text(min_size=200, max_size=3000), st.from_regex(r"[a-z0-9.-]{240,2000}", fullmatch=True))


@given(st.lists(st.tuples(st.sampled_from(["spf", "dkim", "dmarc"]), _LONG, _LONG,
                          st.lists(st.tuples(st.sampled_from(["header.d", "header.i", "header.s", "header.from", "smtp.mailfrom", "smtp.helo"]), _LONG), max_size=5)),
                max_size=4))
def test_every_line_of_the_header_is_at_most_998_printable_ascii_octets(specs):
    results = [MethodResult(method, "pass", tuple(props), reason=reason or None, comment=comment or None)
               for method, reason, comment, props in specs]
    header = authentication_results(ID, results)
    assert header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    assert all(len(line) <= 998 for line in lines), max(map(len, lines))
    assert all(re.fullmatch(rb"[\x20-\x7e]+", line.lstrip(b"\t")) for line in lines)
    assert all(line.startswith(b"\t") for line in lines[1:])


def test_a_huge_signature_gives_short_lines_and_leaves_out_what_is_no_domain():
    """The 2,625-byte line the review produced: header.d, i, s and a reason from the client's message."""
    d = "a" * 600 + ".example"
    result = MethodResult("dkim", "fail", (("header.d", d), ("header.i", "@" + "b" * 900), ("header.s", "s" * 900),
                                           ("header.b", "abcdefgh")), reason="r" * 1000)
    header = authentication_results(ID, [result, MethodResult("dmarc", "none", (("header.from", "x" * 254),))])
    assert max(len(line) for line in header.split(b"\r\n")) <= 998
    text = header.decode()
    assert "header.d=" not in text and "header.i=" not in text and "header.s=" not in text and "header.from" not in text
    assert 'reason="' + "r" * 197 + '..."' in text and "header.b=abcdefgh" in text
    many = MethodResult("dkim", "fail", tuple(("header.s", "s" * 250) for _ in range(10)))
    assert max(len(line) for line in authentication_results(ID, [many]).split(b"\r\n")) <= 998  # folded inside the resinfo


def test_only_our_field_name_is_looked_at_line_by_line(monkeypatch):
    """The review's 25 MiB all-header message: runs of other fields pass by
    bytes.find, not a Python step per line (that stalled the reactor 2.6 s)."""
    seen = []
    line = ResultsFilter._line
    monkeypatch.setattr(ResultsFilter, "_line", lambda self, text: seen.append(text) or line(self, text))
    header = b"X-Filler: authentication-results in a value\r\n\tand a fold\r\n" * 20000
    message = header + b"Authentication-Results: mx.example.jp; dkim=pass\r\n" + header + b"\r\nbody\r\n"
    assert remove_our_results(message, ID) == header + header + b"\r\nbody\r\n"
    assert seen == [b"Authentication-Results: mx.example.jp; dkim=pass\r\n", b"\r\n"]
    seen.clear()
    stream = ResultsFilter(ID)
    out = b"".join(stream.feed(message[i:i + 4096]) for i in range(0, len(message), 4096)) + stream.flush()
    assert out == header + header + b"\r\nbody\r\n" and len(seen) == 2


def test_the_rest_of_an_over_long_field_is_skipped_and_the_next_field_kept():
    stream = ResultsFilter(ID)
    big = b"Authentication-Results: x;\r\n" + b"\t" + b"y" * 900 + b"\r\n"
    out = stream.feed(big * 1 + b"\t" + b"y" * 900 + b"\r\n" * 0)
    out += stream.feed(b"".join(b"\t" + b"z" * 900 + b"\r\n" for _ in range(100)))
    out += stream.feed(b"Subject: kept\r\n\tfolded\r\n\r\nbody")
    assert out == b"Subject: kept\r\n\tfolded\r\n\r\nbody"


# --- removing forged headers (RFC 8601 §5) -------------------------------------


def test_our_old_header_is_removed_and_a_foreign_one_stays():
    message = (
        b"Authentication-Results: mx.example.jp;\r\n\tdkim=pass header.d=bank.example\r\n"
        b"Authentication-Results: other.example; spf=pass smtp.mailfrom=a@b.example\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.example.jp; in the body stays\r\n"
    )
    assert remove_our_results(message, "MX.example.jp") == (
        b"Authentication-Results: other.example; spf=pass smtp.mailfrom=a@b.example\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.example.jp; in the body stays\r\n"
    )


def test_authserv_id_with_comments_version_and_case():
    assert authserv_id(b" (forged) MX.Example.JP 1; spf=pass") == "mx.example.jp"
    assert authserv_id(b'"mx.example.jp"; none') == "mx.example.jp"
    assert authserv_id(b"mx.example.jp.evil; none") == "mx.example.jp.evil"
    assert authserv_id(b"  ") is None


def test_a_lookalike_id_is_not_ours():
    message = b"Authentication-Results: mx.example.jp.evil; none\r\nauthentication-results : x.mx.example.jp; none\r\n\r\nbody\r\n"
    assert remove_our_results(message, ID) == message


def test_a_message_without_a_body_separator_is_all_header():
    assert remove_our_results(b"Authentication-Results: mx.example.jp; none\r\nSubject: x\r\n", ID) == b"Subject: x\r\n"


_name = st.sampled_from(["Subject", "From", "X-A", "Authentication-Results", "authentication-results", "Received"])
_id = st.sampled_from([ID, "MX.EXAMPLE.JP", "other.example", "mx.example.jp.evil", "(c) mx.example.jp"])
_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


@st.composite
def _messages(draw):
    fields = []
    for name, authserv, value, folded in draw(st.lists(st.tuples(_name, _id, _value, st.booleans()), max_size=8)):
        text = f"{name}: {authserv}; {value}" + ("\r\n\tmore" if folded else "")
        fields.append((name, authserv, (text + "\r\n").encode()))
    body = draw(st.binary(max_size=40)).replace(b"\r", b"").replace(b"\n", b"\r\n")
    return fields, body


@given(_messages())
def test_exactly_our_headers_go_and_the_rest_is_kept_in_order(sample):
    fields, body = sample
    message = b"".join(raw for _, _, raw in fields) + b"\r\n" + body
    expected = b"".join(
        raw for name, authserv, raw in fields
        if not (name.lower() == "authentication-results" and authserv.split()[-1].lower() == ID)
    ) + b"\r\n" + body
    assert remove_our_results(message, ID) == expected


@given(_messages(), st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_the_stream_filter_cuts_the_same_in_any_chunks(sample, cuts):
    """Chunks come as the client's packets fall: a CRLF, a field name or a
    folded line split across them must not change what is removed."""
    fields, body = sample
    message = b"".join(raw for _, _, raw in fields) + b"\r\n" + body
    stream, out, last = ResultsFilter(ID), [], 0
    for cut in sorted(c % (len(message) + 1) for c in cuts):
        out.append(stream.feed(message[last:cut]))
        last = cut
    out.append(stream.feed(message[last:]))
    out.append(stream.flush())
    assert b"".join(out) == remove_our_results(message, ID)


def test_the_stream_filter_holds_little_and_passes_the_body_at_once():
    stream = ResultsFilter(ID)
    assert stream.feed(b"Subject: x\r\nAuthentication-Results: mx.exa") == b"Subject: x\r\n"
    assert stream.feed(b"mple.jp; none\r\n\tmore\r\nTo: a@b\r") == b""
    assert stream.feed(b"\n\r\nbody") == b"To: a@b\r\n\r\nbody"
    assert stream.feed(b"Authentication-Results: mx.example.jp; in the body\r\n") == b"Authentication-Results: mx.example.jp; in the body\r\n"


def test_an_endless_results_field_is_dropped_not_held():
    stream = ResultsFilter(ID)
    stream.feed(b"Authentication-Results: (\r\n")
    for _ in range(100):
        assert stream.feed(b"\t" + b"x" * 997 + b"\r\n") == b""
    assert stream._field == [] and stream.feed(b"Subject: x\r\n\r\n") == b"Subject: x\r\n\r\n"


# --- DMARC -------------------------------------------------------------------


def test_dmarc_record_tags():
    assert parse_dmarc_record("v=DMARC1; p=reject; adkim=s; aspf=s; sp=quarantine") == DmarcPolicy("reject", "quarantine", "s", "s")
    assert parse_dmarc_record("v=DMARC1;p=none") == DmarcPolicy("none")
    assert parse_dmarc_record("v=spf1 -all") is None
    assert parse_dmarc_record("v=DMARC1; p=bogus") is None  # no rua: ignored (RFC 7489 §6.6.3)
    assert parse_dmarc_record("v=DMARC1; p=bogus; rua=mailto:d@example.com") == DmarcPolicy("none")


def test_relaxed_alignment_takes_subdomains_of_the_organizational_domain_strict_does_not():
    assert aligned("mail.example.com", "example.com", "r", org)
    assert not aligned("mail.example.com", "example.com", "s", org)
    assert aligned("Example.COM.", "example.com", "s", org)
    assert not aligned("example.net", "example.com", "r", org)
    assert not aligned("a.example.co.uk", "b.other.co.uk", "r", org)


_domains = st.lists(st.sampled_from(["a", "b", "mail", "co", "x"]), min_size=1, max_size=3).map(lambda labels: ".".join(labels) + ".example")


@given(_domains, _domains)
def test_strict_alignment_implies_relaxed_and_both_are_symmetric(a, b):
    if aligned(a, b, "s", org):
        assert aligned(a, b, "r", org)
    assert aligned(a, b, "r", org) == aligned(b, a, "r", org)
    assert aligned(a, b, "s", org) == aligned(b, a, "s", org)


def test_dmarc_passes_on_either_aligned_spf_or_aligned_dkim():
    relaxed, strict = DmarcPolicy("reject"), DmarcPolicy("reject", adkim="s", aspf="s")
    assert dmarc_verdict(relaxed, "example.com", "bounce.example.com", [], org) == "pass"
    assert dmarc_verdict(strict, "example.com", "bounce.example.com", [], org) == "fail"
    assert dmarc_verdict(strict, "example.com", None, ["example.com"], org) == "pass"
    assert dmarc_verdict(relaxed, "example.com", "example.net", ["mailer.example.net"], org) == "fail"
    assert dmarc_verdict(relaxed, "example.com", None, [], org) == "fail"


def test_from_domains_are_read_from_the_header():
    assert header_from_domains(b"From: A <a@Example.COM>\r\nTo: b@c.example\r\n") == ["example.com"]
    assert header_from_domains(b"From: a@x.example, b@y.example\r\n") == ["x.example", "y.example"]
    assert header_from_domains(b"Subject: none\r\n") == []
    assert header_from_domains(b"From: undisclosed\r\n") == [""]
