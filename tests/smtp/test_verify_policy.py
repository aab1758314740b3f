"""Recipient verification in the relay policy (SPEC §3.5): the real policy and
tables, a verifier whose verdicts the test chooses."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from epost.delivery.verify import Verdict
from epost.routing.aliases import parse_aliases
from epost.routing.gateway import parse_gateway_table
from epost.routing.relay_recipients import RelayRecipients, load_relay_recipients
from epost.routing.resolver import GatewayRouter, LocalRouter, MXRouter, Resolver
from epost.routing.users import load_users
from epost.address import parse_mailbox
from epost.smtp.interfaces import Rejected, Session
from epost.smtp.policy import PROBE, RecipientPolicy, verification_answer
from epost.smtp.receiver import SpoolingReceiver
from epost.smtp.server import ServerSettings, SMTPServer

LOCAL = frozenset({"victim.test"})
TRUSTED = (ipaddress.ip_network("127.0.0.0/8"),)
OUTSIDE, INSIDE = "192.0.2.99", "127.0.0.1"


def lines(text: str):
    return [(n, l.strip()) for n, l in enumerate(text.splitlines(), 1) if l.strip() and not l.startswith("#")]


class FakeVerifier:
    """Answers with the verdict the test set: at once (`cached`) or through a Deferred (a probe)."""

    def __init__(self, verdict: Verdict | None = None, cached: bool = False) -> None:
        self.verdict_to_give = verdict or Verdict("accepted", "250 2.1.5 ok", "gw[10.0.0.1]:25")
        self.cached = cached
        self.asked: list[str] = []

    def verdict(self, address, route, fresh=False):
        self.asked.append(address)
        if self.cached:
            return self.verdict_to_give
        return defer.succeed(self.verdict_to_give)


def make_policy(tmp_path: Path, verifier=None, table: str | None = None) -> RecipientPolicy:
    users_file = tmp_path / "users"
    users_file.write_text("u@victim.test\n")
    users = load_users(users_file)
    aliases = parse_aliases(lines("info: u@victim.test\nsales@op.test: boss@op.test\n"), "aliases")
    gateway = parse_gateway_table(
        lines("op.test,10.0.0.1,25\n*.ops.test,10.0.0.2,25\npartner.test,mx\n*,smarthost.test,25\n"), "gateway.dat"
    )
    resolver = Resolver([LocalRouter(LOCAL, lambda: users), GatewayRouter(lambda: gateway), MXRouter()], lambda: aliases, LOCAL)
    policy = RecipientPolicy(
        resolver,
        local_domains=LOCAL,
        relay_domains=("relayed.test",),
        relay_networks=TRUSTED,
        gateway=lambda: gateway,
        aliases=lambda: aliases,
    )
    if table is not None:
        path = tmp_path / "relay_recipients"
        path.write_text(table)
        recipients = load_relay_recipients(path)
    else:
        recipients = RelayRecipients()
    policy.relay_recipients = lambda: recipients
    policy.users = lambda: users
    policy.verify_recipients = True
    policy.verifier = verifier
    return policy


def ask(policy, address: str, client: str = OUTSIDE, user: str | None = None):
    """The policy's answer: ("accepted", finals) or ("rejected", Reply)."""
    session = Session("relay", client, 40000, "client", True, None, user)
    try:
        result = policy.check_recipient(session, parse_mailbox("x@ext.example"), parse_mailbox(address))
    except Rejected as error:
        return "rejected", error.reply
    if isinstance(result, defer.Deferred):
        out: list = []
        result.addBoth(out.append)
        if hasattr(out[0], "value"):
            assert isinstance(out[0].value, Rejected), out[0]
            return "rejected", out[0].value.reply
        return "accepted", out[0]
    return "accepted", result


def rcpt_reply(policy, address: str, client: str = OUTSIDE) -> str:
    receiver = SpoolingReceiver(None, policy, "mx.victim.test", now=lambda: 0.0)
    server = SMTPServer(receiver, ServerSettings(hostname="mx.victim.test"), task.Clock())
    transport = StringTransport(peerAddress=IPv4Address("TCP", client, 40000))
    server.makeConnection(transport)
    server.dataReceived(b"EHLO client\r\nMAIL FROM:<x@ext.example>\r\n")
    transport.clear()
    server.dataReceived(b"RCPT TO:<" + address.encode() + b">\r\n")
    return transport.value().decode().strip()


# --- through the protocol ------------------------------------------------------


def test_refused_verdict_is_550_511_with_the_next_hops_text(tmp_path: Path) -> None:
    verifier = FakeVerifier(Verdict("refused", "550 5.1.1 <nobody@op.test>: User unknown", "gw[10.0.0.1]:25"))
    reply = rcpt_reply(make_policy(tmp_path, verifier), "nobody@op.test")
    assert reply == "550 5.1.1 Recipient address rejected: gw[10.0.0.1]:25 said: 550 5.1.1 <nobody@op.test>: User unknown"


def test_temporary_verdict_is_450_411(tmp_path: Path) -> None:
    verifier = FakeVerifier(Verdict("temporary", "timed out waiting for the rcpt reply", None))
    reply = rcpt_reply(make_policy(tmp_path, verifier), "someone@x.ops.test")
    assert reply.startswith("450 4.1.1 ")


def test_accepted_verdict_is_250(tmp_path: Path) -> None:
    assert rcpt_reply(make_policy(tmp_path, FakeVerifier()), "someone@op.test").startswith("250 ")


def test_unlisted_address_with_a_relay_recipients_file_is_550_without_a_probe(tmp_path: Path) -> None:
    verifier = FakeVerifier()
    policy = make_policy(tmp_path, verifier, table="alice@op.test\n@relayed.test\n")
    assert rcpt_reply(policy, "bob@op.test").startswith("550 5.1.1 ")
    assert rcpt_reply(policy, "alice@op.test").startswith("250 ")
    assert rcpt_reply(policy, "anyone@relayed.test").startswith("250 ")
    assert rcpt_reply(policy, "carol@x.ops.test").startswith("550 5.1.1 ")
    assert verifier.asked == []


def test_each_refusal_gives_one_senderlog_style_line(tmp_path: Path) -> None:
    verifier = FakeVerifier(Verdict("refused", "550 5.1.1 User unknown", "gw[10.0.0.1]:25"))
    with capturedLogs() as events:
        rcpt_reply(make_policy(tmp_path, verifier), "nobody@op.test")
    lines_ = [e["line"] for e in events if "line" in e and str(e["line"]).startswith("verify:")]
    assert len(lines_) == 1
    assert "from=<x@ext.example> to=<nobody@op.test> client=client[192.0.2.99] status=refused source=probe dsn=5.1.1" in lines_[0]


def test_foreign_domain_from_outside_is_still_relay_denied_and_never_probed(tmp_path: Path) -> None:
    verifier = FakeVerifier()
    assert rcpt_reply(make_policy(tmp_path, verifier), "x@far.example").startswith("554 5.7.1")
    assert verifier.asked == []


def test_verification_off_accepts_without_probe(tmp_path: Path) -> None:
    verifier = FakeVerifier(Verdict("refused", "550 no", "gw"))
    policy = make_policy(tmp_path, verifier)
    policy.verify_recipients = False
    assert rcpt_reply(policy, "nobody@op.test").startswith("250 ")
    assert verifier.asked == []


# --- properties --------------------------------------------------------------

_local_part = st.from_regex(r"[a-z0-9._-]{1,10}", fullmatch=True).filter(lambda s: not s.startswith(".") and ".." not in s and not s.endswith("."))
_domain = st.sampled_from(["victim.test", "op.test", "a.ops.test", "b.c.ops.test", "relayed.test", "partner.test", "far.example"])
_verdict = st.builds(
    Verdict,
    status=st.sampled_from(["accepted", "refused", "temporary"]),
    text=st.text(max_size=30).map(lambda t: t.replace("\r", " ").replace("\n", " ")),
    host=st.none() | st.just("gw[10.0.0.1]:25"),
)
_client = st.sampled_from(["outside", "inside", "authenticated"])
OPERATED = {"op.test", "a.ops.test", "b.c.ops.test", "relayed.test", "partner.test"}


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(local=_local_part, domain=_domain, verdict=_verdict, client=_client, cached=st.booleans())
def test_policy_with_verdicts(tmp_path: Path, local: str, domain: str, verdict: Verdict, client: str, cached: bool) -> None:
    verifier = FakeVerifier(verdict, cached=cached)
    policy = make_policy(tmp_path, verifier)
    address = f"{local}@{domain}"
    ip = INSIDE if client == "inside" else OUTSIDE
    user = "u@victim.test" if client == "authenticated" else None
    outcome, value = ask(policy, address, ip, user)
    if client != "outside" or domain == "victim.test":
        assert verifier.asked == []  # never a probe for local domains, relay networks, authenticated clients
    if client == "outside" and domain in OPERATED and address != "sales@op.test":
        assert verifier.asked == [address]
        if verdict.status == "refused":
            assert outcome == "rejected" and (value.code, value.enhanced) == (550, "5.1.1")
        elif verdict.status == "temporary":
            assert outcome == "rejected" and (value.code, value.enhanced) == (450, "4.1.1")
        else:
            assert outcome == "accepted"
    if outcome == "rejected":
        assert "\n" not in value.text and "\r" not in value.text


@given(
    trusted=st.booleans(), local=st.booleans(), operated=st.booleans(),
    listed=st.none() | st.booleans(), verify=st.booleans(), verdict=st.none() | _verdict,
)
def test_verification_answer_never_accepts_a_refused_verdict_nor_probes_the_exempt(trusted, local, operated, listed, verify, verdict) -> None:
    answer = verification_answer(trusted=trusted, local=local, operated=operated, listed=listed, verify=verify, verdict=verdict)
    exempt = trusted or local or not operated
    if exempt:
        assert answer is None
    if answer == PROBE:
        assert not exempt and listed is None and verify and verdict is None
    if not exempt and listed is False:
        assert answer.code == 550 and answer.enhanced == "5.1.1"
    if not exempt and listed is None and verify and verdict is not None and verdict.status == "refused":
        assert answer is not None and answer.code == 550
    if not exempt and listed is None and verify and verdict is not None and verdict.status == "temporary":
        assert answer is not None and answer.code == 450


def test_an_alias_of_an_operated_domain_is_not_probed(tmp_path: Path) -> None:
    verifier = FakeVerifier(Verdict("refused", "550", "gw"))
    assert ask(make_policy(tmp_path, verifier), "sales@op.test")[0] == "accepted"
    assert verifier.asked == []


def _count(verdict: str, source: str) -> float:
    from epost import metrics

    return metrics.verify_verdicts.labels(verdict, source)._value.get()


def test_verdicts_are_counted_by_verdict_and_source(tmp_path: Path) -> None:
    before = {k: _count(*k) for k in (("refused", "probe"), ("refused", "cache"), ("refused", "table"), ("accepted", "table"))}
    rcpt_reply(make_policy(tmp_path, FakeVerifier(Verdict("refused", "550", "gw"))), "a@op.test")
    rcpt_reply(make_policy(tmp_path, FakeVerifier(Verdict("refused", "550", "gw"), cached=True)), "a@op.test")
    table = make_policy(tmp_path, FakeVerifier(), table="ok@op.test\n")
    rcpt_reply(table, "no@op.test")
    rcpt_reply(table, "ok@op.test")
    after = {k: _count(*k) for k in before}
    assert {k: after[k] - before[k] for k in before} == {k: 1 for k in before}
