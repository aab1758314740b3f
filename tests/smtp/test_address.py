"""Envelope address and command parsing: canonical forms, nasty cases, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from epost.address import AddressError, normalize_domain, parse_mailbox, parse_path
from epost.smtp.commands import CommandSyntaxError, parse_mail, parse_rcpt, split_command

atext = st.text("abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)
dot_string = st.lists(atext, min_size=1, max_size=3).map(".".join)
quoted = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=12)
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=4).map(".".join).filter(lambda d: not d.split(".")[-1].isdigit())


@given(st.one_of(dot_string, quoted), domain)
def test_formatting_then_parsing_gives_the_same_address(local, dom):
    address = parse_mailbox(_quote(local) + "@" + dom)
    assert parse_mailbox(str(address)) == address


def _quote(local: str) -> str:
    """The quoted-string form of any local part."""
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.parametrize(
    "text, domain",
    [("<u@EXAMPLE.Org.>", "example.org"), ("<u@bücher.example>", None), ("<@a.test,@b.test:u@c.test>", "c.test"),
     ("<u@[192.0.2.1]>", "[192.0.2.1]"), ("<u@[IPv6:2001:DB8:0:0::1]>", "[IPv6:2001:db8::1]")],
)
def test_domains_come_out_canonical(text, domain):
    if domain is None:  # 8-bit without SMTPUTF8
        with pytest.raises(AddressError):
            parse_path(text, allow_null=False)
    else:
        assert parse_path(text, allow_null=False).domain == domain


@pytest.mark.parametrize("text", ["<u@ext@victim.test>", "<ext!u>", "<u>", "<u@1.2.3.4>", "<u@[999.1.1.1]>", "<u@-bad.test>", "u@x.test", "<>"])
def test_malformed_paths_are_refused(text):
    with pytest.raises(AddressError):
        parse_path(text, allow_null=False)


def test_routing_characters_stay_in_the_local_part():
    assert parse_path("<u%ext.example@victim.test>", allow_null=False).local == "u%ext.example"
    assert parse_path('<"u@ext.example"@victim.test>', allow_null=False).local == "u@ext.example"


def test_literal_ip_drops_the_ipv6_tag():
    assert parse_mailbox("u@[IPv6:::1]").literal_ip == "::1"
    assert parse_mailbox("u@[192.0.2.1]").literal_ip == "192.0.2.1"
    assert parse_mailbox("u@example.test").literal_ip is None


def test_idna_domains_become_a_labels():
    assert normalize_domain("Bücher.Example.") == "xn--bcher-kva.example"


def test_mail_and_rcpt_parameters():
    assert parse_mail("FROM:<a@b.test> SIZE=100 body=8BITMIME").params == {"SIZE": "100", "BODY": "8BITMIME"}
    assert parse_mail("from: <>").address is None
    assert parse_rcpt("TO:<a@b.test>").params == {}
    assert split_command("mail FROM:<a@b>") == ("MAIL", "FROM:<a@b>")
    with pytest.raises(CommandSyntaxError) as error:
        parse_rcpt("TO:<>")
    assert error.value.enhanced == "5.1.3"
    with pytest.raises(CommandSyntaxError):
        parse_mail("FROM:<a@b.test>SIZE=1")  # parameters need a space
