"""The open-relay guard: no address form lets an untrusted client relay.

The protocol, the real parser, the real policy and the real tables, driven
over StringTransport by a client from 192.0.2.99 (not in relay_networks).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from epost.routing.aliases import parse_aliases
from epost.routing.gateway import parse_gateway_table
from epost.routing.resolver import GatewayRouter, LocalRouter, MXRouter, Resolver
from epost.routing.users import load_users
from epost.address import parse_path
from epost.smtp.interfaces import Session
from epost.smtp.policy import RecipientPolicy
from epost.smtp.server import ServerSettings, SMTPServer

LOCAL = frozenset({"victim.test", "xn--bcher-kva.test"})
TRUSTED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def lines(text: str):
    return [(n, l.strip()) for n, l in enumerate(text.splitlines(), 1) if l.strip() and not l.startswith("#")]


@pytest.fixture
def policy(tmp_path: Path) -> RecipientPolicy:
    users_file = tmp_path / "users"
    users_file.write_text("u@victim.test\npostmaster@victim.test\nu@xn--bcher-kva.test\n")
    users = load_users(users_file)
    aliases = parse_aliases(lines("info: u@victim.test\nforward@victim.test: someone@far.example\n"), "aliases")
    gateway = parse_gateway_table(lines("partner.test,mx\n*.operated.test,smtp.operated.test,25\n"), "gateway.dat")
    routers = [LocalRouter(LOCAL, lambda: users), GatewayRouter(lambda: gateway), MXRouter()]
    resolver = Resolver(routers, lambda: aliases, LOCAL)
    return RecipientPolicy(
        resolver,
        local_domains=LOCAL,
        relay_domains=("relayed.test",),
        relay_networks=TRUSTED,
        gateway=lambda: gateway,
        aliases=lambda: aliases,
    )


class Receiver:
    """The real policy in front of a store that keeps nothing."""

    def __init__(self, policy):
        self.policy = policy
        self.accepted = []

    def check_sender(self, session, sender, params):
        return None

    def check_recipient(self, session, sender, recipient):
        finals = self.policy.route_for(session, recipient)
        self.accepted.append((recipient, finals))
        return finals

    def open_message(self, *args):
        raise AssertionError("no test here sends DATA")


def rcpt(policy, address: str, client: str = "192.0.2.99", sender: str = "<x@ext.example>") -> tuple[str, Receiver]:
    receiver = Receiver(policy)
    server = SMTPServer(receiver, ServerSettings(hostname="mx.victim.test"), task.Clock())
    transport = StringTransport(peerAddress=IPv4Address("TCP", client, 40000))
    server.makeConnection(transport)
    server.dataReceived(b"EHLO client\r\nMAIL FROM:" + sender.encode() + b"\r\n")
    transport.clear()
    server.dataReceived(b"RCPT TO:" + address.encode("utf-8") + b"\r\n")
    return transport.value().decode().strip(), receiver


FOREIGN_FORMS = [
    "<u@ext.example>",
    '<"u@ext.example">',
    "<u%ext.example@victim.test>",
    "<u%ext.example@[192.0.2.1]>",
    '<"u%ext.example"@victim.test>',
    '<"u@ext.example"@victim.test>',
    "<u@ext.example@victim.test>",
    "<u@ext.example@[192.0.2.1]>",
    "<@victim.test:u@ext.example>",
    "<@[192.0.2.1]:u@ext.example>",
    "<@a.test,@b.test:u@ext.example>",
    "<ext.example!u>",
    "<ext.example!u@victim.test>",
    "<ext.example!u@[192.0.2.1]>",
    '<"ext.example!u"@victim.test>',
    "<u@[192.0.2.2]>",
    "<u@[IPv6:2001:db8::1]>",
    "<u@ext.example.>",
    "<u@EXT.Example>",
    "<postmaster@ext.example>",
    "<u@victim.test.ext.example>",
    "<u@ext.example%victim.test>",
    "<u@victim.test@ext.example>",
    "<u@operated.test>",  # `*.operated.test` covers subdomains only
    "<u@bücher.test>",  # 8-bit without SMTPUTF8
]


@pytest.mark.parametrize("address", FOREIGN_FORMS)
def test_no_address_form_lets_an_untrusted_client_relay(policy, address):
    reply, receiver = rcpt(policy, address)
    assert reply[0] in "45", reply
    for _, finals in receiver.accepted:  # nothing accepted may leave for a foreign host
        assert all(f["route"]["kind"] != "relay" for f in finals)


@pytest.mark.parametrize("sender", ["<u@ext.example>", "<u@victim.test>", "<u@localhost>", "<>", "<u@[192.0.2.1]>", "<postmaster@victim.test>"])
def test_no_sender_form_opens_the_relay(policy, sender):
    reply, _ = rcpt(policy, "<u@ext.example>", sender=sender)
    assert reply.startswith("554 5.7.1"), reply


@pytest.mark.parametrize(
    "address, rule",
    [
        ("<u@victim.test>", "local"),
        ("<U@VICTIM.TEST.>", "local"),
        ("<u@xn--bcher-kva.test>", "local"),
        ("<info@victim.test>", "local"),  # alias to a local user
        ("<forward@victim.test>", "mx"),  # alias to a remote address: forwarding is allowed
        ("<x@partner.test>", "gateway.dat:1"),  # operated domain
        ("<x@a.b.operated.test>", "gateway.dat:2"),
        ("<x@relayed.test>", "mx"),  # relay_domains
    ],
)
def test_open_destinations_are_accepted_from_anyone(policy, address, rule):
    reply, receiver = rcpt(policy, address)
    assert reply == "250 2.1.5 Ok"
    [(_, finals)] = receiver.accepted
    assert [f["route"]["rule"] for f in finals] == [rule]


def test_unknown_local_user_is_550_even_when_untrusted(policy):
    assert rcpt(policy, "<nobody@victim.test>")[0].startswith("550 5.1.1")


def test_trusted_network_relays_anywhere(policy):
    reply, receiver = rcpt(policy, "<u@ext.example>", client="127.0.0.1")
    assert reply == "250 2.1.5 Ok"
    assert receiver.accepted[0][1] == [{"address": "u@ext.example", "route": {"kind": "relay", "rule": "mx", "mx_domain": "ext.example"}}]


def test_ipv4_mapped_loopback_is_trusted(policy):
    recipient = parse_path("<u@ext.example>", allow_null=False)
    assert not policy.open_destination(recipient)
    assert policy.trusted(Session("relay", "::ffff:127.0.0.1", 40000, "client", True, None, None))


fragments = st.sampled_from(["u", "ext.example", "victim.test", "@", "%", "!", '"', ".", ":", ",", "[192.0.2.1]", "EXT.EXAMPLE", "operated.test", "a.", "xn--bcher-kva.test", "partner.test", " "])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # policy is immutable
@given(st.lists(fragments, min_size=1, max_size=8).map("".join))
def test_whatever_the_form_an_accepted_recipient_is_an_open_destination(policy, body):
    address = f"<{body}>"
    reply, receiver = rcpt(policy, address)
    if reply.startswith("250"):
        assert policy.open_destination(parse_path(address, allow_null=False)), (address, reply)
    else:
        assert reply[:3] in {"501", "550", "554"}, (address, reply)


def authenticated(user: str):
    from epost.smtp.interfaces import Session

    return Session("submission", "192.0.2.99", 1, "client", True, "TLSv1.3", user)


@pytest.mark.parametrize(
    "sender, owned",
    [
        ("<u@victim.test>", True),
        ("<U@Victim.Test>", True),
        ("<info@victim.test>", True),  # an alias that delivers to u
        ("<postmaster@victim.test>", False),
        ("<u@ext.example>", False),
        ("<>", True),  # bounces are always allowed
    ],
)
def test_an_authenticated_user_may_only_send_as_themselves_or_their_aliases(policy, sender, owned):
    from epost.smtp.interfaces import Rejected

    address = parse_path(sender, allow_null=True)
    if owned:
        policy.check_sender(authenticated("u@victim.test"), address)
    else:
        with pytest.raises(Rejected) as refused:
            policy.check_sender(authenticated("u@victim.test"), address)
        assert (refused.value.reply.code, refused.value.reply.enhanced) == (553, "5.7.1")


def test_sender_ownership_check_can_be_switched_off(policy):
    policy.check_sender_ownership = False
    policy.check_sender(authenticated("u@victim.test"), parse_path("<boss@ext.example>", allow_null=False))
