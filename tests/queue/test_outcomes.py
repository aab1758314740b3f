"""apply_attempt, the pure heart of delivery bookkeeping: properties over any outcomes."""

from __future__ import annotations

from hypothesis import given, strategies as st

from epost.config import RetryConfig
from epost.delivery.smtp_client import Outcome
from epost.address import destination_of
from epost.queue.outcomes import apply_attempt, status_code
from epost.store.envelope import Envelope, Recipient, relay_groups
from test_retry import policies  # the same random E-Post policies as the retry rules' own tests

NOW = 1_800_000_000.0

replies = st.one_of(
    st.none(),
    st.tuples(st.sampled_from([250, 251, 421, 450, 451, 452, 550, 551, 552, 553, 554]), st.sampled_from(["", "5.1.1 x", "4.7.1 y", "2.0.0 z"])),
)


def outcome(reply) -> Outcome:
    return Outcome(None, "cannot connect", "connect") if reply is None else Outcome(reply[0], reply[1], "rcpt")


@st.composite
def cases(draw):
    domains = ["a.test", "b.test"]
    recipients = tuple(
        Recipient(f"u{i}@{draw(st.sampled_from(domains))}", {"kind": "relay", "rule": "mx"}, draw(st.sampled_from(["pending", "pending", "delivered"])))
        for i in range(draw(st.integers(1, 6)))
    )
    envelope = Envelope("0" * 17, "s@x.test", recipients, NOW - 10, 1)
    outcomes = {r.address: outcome(draw(replies)) for r in recipients if destination_of(r.address) == "a.test" and r.state == "pending"}
    return envelope, outcomes


@given(cases(), policies)
def test_each_pending_recipient_of_the_destination_gets_one_consistent_result(case, policy):
    envelope, outcomes = case
    applied = apply_attempt(envelope, "a.test", outcomes, "mx[127.0.0.2]:25", NOW, policy)
    assert sorted(r.address for r in applied.results) == sorted(outcomes)
    for result in applied.results:
        after = applied.envelope.recipients[result.index]
        assert {"sent": "delivered", "deferred": "pending", "bounced": "failed"}[result.status] == after.state
        assert after.attempts == envelope.recipients[result.index].attempts + 1
        if result.status == "sent":
            assert result.outcome.code is not None and result.outcome.code < 400
    for before, after in zip(envelope.recipients, applied.envelope.recipients):
        if before.address not in outcomes:
            assert before == after  # other destinations and finished recipients are untouched


@given(cases(), policies)
def test_the_verdict_follows_what_is_left(case, policy):
    envelope, outcomes = case
    applied = apply_attempt(envelope, "a.test", outcomes, None, NOW, policy)
    left = relay_groups(applied.envelope).get("a.test")
    if not left:
        nothing_answered = bool(outcomes) and all(o.code is None for o in outcomes.values())
        assert applied.verdict == ("done_noanswer" if nothing_answered else "done")
        assert "a.test" not in applied.envelope.retries
    else:
        kind, when = applied.verdict
        assert when > NOW and applied.envelope.retries["a.test"]["next_attempt"] == when
        # Dead (probe-only) when nothing in the attempt answered at all.
        silent = all(o.code is None for o in outcomes.values())
        assert kind == ("retry_noanswer" if silent else "retry")


@given(policies)
def test_repeated_5xx_bounces_after_exactly_count_5xx_retries(policy):
    policy = RetryConfig(**{**policy.__dict__, "period_4xx": 10**9, "period_noanswer": 10**9})
    envelope = Envelope("0" * 17, "s@x.test", (Recipient("u@a.test", {"kind": "relay"}),), NOW, 1)
    now, attempts = NOW, 0
    while True:
        applied = apply_attempt(envelope, "a.test", {"u@a.test": Outcome(550, "5.1.1 no", "rcpt")}, None, now, policy)
        attempts += 1
        envelope = applied.envelope
        if applied.verdict == "done":
            break
        now = applied.verdict[1]
    assert attempts == policy.count_5xx + 1
    assert envelope.recipients[0].state == "failed"


def test_status_codes_echo_the_remote_when_its_class_matches():
    assert status_code(Outcome(550, "5.1.1 User unknown", "rcpt")) == "5.1.1"
    assert status_code(Outcome(550, "4.1.1 confused", "rcpt")) == "5.0.0"
    assert status_code(Outcome(451, "greylisted", "rcpt")) == "4.0.0"
    assert status_code(Outcome(None, "cannot connect", "connect")) == "4.4.1"
    assert status_code(Outcome(None, "4.4.3 DNS timed out", "dns")) == "4.4.3"


def test_a_permanent_dns_answer_bounces_at_once():
    envelope = Envelope("0" * 17, "s@x.test", (Recipient("u@a.test", {"kind": "relay"}),), NOW, 1)
    applied = apply_attempt(envelope, "a.test", {"u@a.test": Outcome(550, "5.1.2 a.test: no such domain", "dns")}, None, NOW, RetryConfig())
    assert applied.verdict == "done" and applied.envelope.recipients[0].state == "failed"
