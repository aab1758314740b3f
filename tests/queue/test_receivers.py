"""Receiver-aware delivery's pure decisions (issue 14): classifying replies, the
state a destination takes, when a session or a retry may start; Domain.mri keys."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from epost.config import RetryConfig
from epost.delivery.smtp_client import Outcome
from epost.queue import receivers as rx
from epost.queue.domain_state import DomainState, format_mri, parse_mri
from epost.store.envelope import Envelope, Recipient
from epost.queue.outcomes import apply_attempt, apply_throttle

RULES = rx.DEFAULT_THROTTLE_RULES
NOW = 1_800_000_000.0


def kind(code, text, stage="rcpt", rules=RULES):
    return rx.classify(code, text, stage, rules)[0]


# -- classifying replies -------------------------------------------------------


@pytest.mark.parametrize(
    "code, text, action",
    [
        (421, "4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail", "slow"),
        (451, "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation", "slow"),
        (421, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume", "pause"),
        (421, "4.7.0 Too many connections from your IP", "slow"),
        (450, "4.7.1 Too many messages, slow down", "slow"),
        (450, "4.7.1 Client host rate limited", "slow"),
        (421, "4.7.0 Try again later", "slow"),
    ],
)
def test_shipped_rules_recognise_the_big_receivers_throttles(code, text, action):
    verdict, rule = rx.classify(code, text, "rcpt", RULES)
    assert verdict == rx.THROTTLE and rule.action == action


@pytest.mark.parametrize(
    "text",
    [
        "4.2.0 <u@grey.test>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/grey.test.html",
        "4.7.1 <u@grey.test>: Recipient address rejected: Please try again later",
        "4.7.1 Greylisting in action, please come back later",
    ],
)
def test_greylisting_replies_at_rcpt_are_greylisting(text):
    assert kind(450, text) == rx.GREYLIST
    assert kind(450, text, stage="mail") == rx.OTHER  # only at RCPT or DATA


def test_a_config_rule_comes_before_the_shipped_ones_and_ignore_makes_an_ordinary_4xx():
    ignore = rx.ThrottleRule("ignore", code=421, enhanced="4.7.28")
    assert kind(421, "4.7.28 unusual rate", rules=(ignore, *RULES)) == rx.OTHER
    mine = rx.ThrottleRule("pause", 60, text="my own words")
    verdict, rule = rx.classify(451, "4.3.0 my own words", "data", (mine, *RULES))
    assert (verdict, rule) == (rx.THROTTLE, mine)


@given(st.integers(500, 599), st.text(max_size=80), st.sampled_from(["rcpt", "data", "mail", "greeting"]))
def test_a_5xx_never_throttles_nor_greylists(code, text, stage):
    assert kind(code, text, stage) == rx.OTHER


# Replies that do throttle or greylist as a 4xx (with that code): random text above never says any of this.
_THROTTLE_REPLIES = st.sampled_from([
    (421, "4.7.28 unusual rate"), (451, "4.7.650 IP reputation"), (421, "TSS04 too much mail"),
    (421, "4.7.1 too many connections"), (450, "4.7.0 rate limit"), (450, "4.2.0 greylisted"),
    (451, "4.7.1 try again later"), (450, "temporarily deferred"), (421, "4.7.0 go away"),
])


@given(st.integers(500, 599), _THROTTLE_REPLIES, st.text(max_size=20),
       st.sampled_from(["rcpt", "data", "mail", "greeting"]))
def test_a_5xx_saying_throttle_or_greylist_words_is_still_other(code, reply, more, stage):
    temporary, words = reply
    assert kind(code, f"{words} {more}", stage) == rx.OTHER
    # the same words do mark the 4xx (at RCPT, where greylisting is looked for)
    assert kind(temporary, f"{words} {more}", "rcpt") in (rx.THROTTLE, rx.GREYLIST)


@given(st.one_of(st.none(), st.integers(200, 399)), st.text(max_size=40))
def test_success_and_no_answer_are_never_throttles(code, text):
    assert kind(code, text) in (rx.SENT, rx.OTHER)


# -- destinations and their limits ----------------------------------------------

LABEL = st.text("abcdefghij0123456789-", min_size=1, max_size=8).filter(lambda s: not s.startswith("-"))


@given(st.lists(LABEL, min_size=1, max_size=4))
def test_star_pattern_never_matches_its_parent(labels):
    name = ".".join(labels)
    assert not rx.pattern_matches("*." + name, name)
    assert rx.pattern_matches("*." + name, "mx." + name)
    assert rx.pattern_matches(name, name.upper() + ".")


def test_most_specific_pattern_wins_domain_before_mx_host():
    table = (
        ("*.google.com", rx.Limits(max_connections=5)),
        ("*.l.google.com", rx.Limits(max_connections=3)),
        ("example.com", rx.Limits(max_connections=1)),
        ("*.com", rx.Limits(max_connections=9)),
    )
    assert rx.limits_for(table, "example.com", ["aspmx.l.google.com"]).max_connections == 1
    assert rx.limits_for(table, "gmail.com", ["aspmx.l.google.com"]).max_connections == 3
    assert rx.limits_for(table, "other.org", ["mx.google.com"]).max_connections == 5
    assert rx.limits_for(table, "other.org", ["mx.other.org"]) == rx.Limits()


# -- throttling: pause, slow, ramp ------------------------------------------------

PAUSE = rx.ThrottleRule("pause", 600, code=421)
SLOW = rx.ThrottleRule("slow", 300, code=421, messages_per_minute=30)


@given(
    seconds=st.floats(1, 7200),
    accepted=st.integers(0, 500),
    running=st.integers(0, 20),
    later=st.floats(0, 1),
    window=st.lists(st.floats(0, 120), max_size=50),
    retry=st.booleans(),
)
def test_a_paused_destination_never_gets_a_session_before_its_resume_time(seconds, accepted, running, later, window, retry):
    rule = dataclasses.replace(PAUSE, seconds=seconds)
    r = rx.on_throttle(rx.Receiver(), rule, NOW, accepted, running)
    when = NOW + later * seconds * 0.999
    starts = sorted(NOW - 120 + w for w in window)
    hold = rx.admit(r, rx.Limits(), 10, when, 0, starts, retry)
    assert hold is not None and hold >= r.resume_at > when


@given(
    rule=st.sampled_from([PAUSE, SLOW, *RULES]),
    accepted=st.integers(0, 500),
    running=st.integers(0, 20),
    offset=st.floats(0, 20000),
    window=st.lists(st.floats(0, 60), max_size=200),
)
def test_admit_says_go_or_names_a_later_time(rule, accepted, running, offset, window):
    r = rx.on_throttle(rx.Receiver(), rule, NOW, accepted, running)
    now = NOW + offset
    starts = sorted(now - w for w in window)
    hold = rx.admit(r, rx.Limits(), 10, now, running, starts, False)
    assert hold is None or hold > now


def test_a_slow_down_lowers_the_rate_then_ramps_back_to_normal():
    r = rx.on_throttle(rx.Receiver(), SLOW, NOW, 100, 4)
    assert rx.current_rate(r, rx.Limits(), NOW) == 30
    assert rx.current_connections(r, rx.Limits(), 10, NOW) == 4
    rates = [rx.current_rate(r, rx.Limits(), NOW + 300 + 60 * k) for k in range(8)]
    assert rates[0] == 30 and all(a is None or (b is None or a <= b) for a, b in zip(rates, rates[1:]))
    assert rates[-1] is None
    assert rx.settle(r, NOW + 300 + 60 * 8).state == rx.NORMAL


def test_a_slow_down_without_a_rate_learns_from_what_was_accepted_in_the_last_minute():
    rule = dataclasses.replace(SLOW, messages_per_minute=None)
    assert rx.on_throttle(rx.Receiver(), rule, NOW, 120, 10).rate == 116
    assert rx.on_throttle(rx.Receiver(), rule, NOW, 0, 10).rate == rx.RAMP_START


def test_a_second_throttle_never_raises_the_limits():
    r = rx.on_throttle(rx.Receiver(), SLOW, NOW, 100, 4)
    again = rx.on_throttle(r, dataclasses.replace(SLOW, messages_per_minute=100, max_connections=8), NOW + 1, 100, 4)
    assert again.rate == 30 and again.connections == 4


def test_the_configured_rate_spaces_sessions_and_caps_a_minute():
    limits = rx.Limits(messages_per_minute=60)
    assert rx.admit(rx.Receiver(), limits, 10, NOW, 0, [NOW - 0.5], False) == NOW - 0.5 + rx.SPACING_SLACK
    full = [NOW - 59 + i * 0.5 for i in range(60)]
    assert rx.admit(rx.Receiver(), rx.Limits(messages_per_minute=60), 10, NOW, 0, full, False) == full[0] + 60
    assert rx.admit(rx.Receiver(), limits, 10, NOW, 0, [NOW - 1.5], False) is None


def test_slow_start_until_the_destination_answers():
    assert rx.admit(rx.Receiver(), rx.Limits(), 10, NOW, rx.SLOW_START, [], False, answered=False) is not None
    assert rx.admit(rx.Receiver(), rx.Limits(), 10, NOW, rx.SLOW_START, [], False, answered=True) is None


# -- a throttle is not a failure ------------------------------------------------------


def envelope(addresses, retries=None, attempts=0):
    recipients = tuple(
        Recipient(a, {"kind": "relay", "rule": "mx", "mx_domain": "far.test"}, attempts=attempts) for a in addresses
    )
    return Envelope("Q1", "s@example.org", recipients, NOW - 100, 10, retries=retries or {})


@given(
    failures=st.integers(0, 50),
    age=st.floats(0, 100000),
    count_5xx=st.integers(0, 3),
    text=st.sampled_from(["4.7.28 unusual rate", "4.7.650 rate limited", "4.7.0 [TSS04] deferred"]),
)
def test_a_throttle_never_bounces_and_leaves_the_episode_alone(failures, age, count_5xx, text):
    retries = {"far.test": {"first_failure": NOW - age, "failures": failures, "last_failure": NOW - 1,
                            "next_attempt": NOW, "last_host": "h"}}
    before = envelope(["a@far.test", "b@far.test"], retries, attempts=failures)
    policy = RetryConfig(period_4xx=60, period_noanswer=60, count_5xx=count_5xx)
    throttled = {a: Outcome(421, text, "rcpt") for a in ("a@far.test", "b@far.test")}
    applied = apply_attempt(before, "far.test", {}, "h", NOW, policy)
    applied = apply_throttle(applied, "far.test", throttled, NOW, before.retries.get("far.test"))
    assert [r.status for r in applied.results] == ["deferred", "deferred"]
    assert applied.envelope.retries == before.retries
    assert all(r.state == "pending" for r in applied.envelope.recipients)
    assert applied.verdict == ("park", NOW)


@given(st.integers(500, 599), st.text("abc .", max_size=30), st.integers(0, 9))
def test_e_post_counts_are_unchanged_for_5xx(code, text, failures_5xx):
    before = envelope(["a@far.test"])
    outcome = Outcome(code, "5.7.1 " + text, "rcpt")
    assert rx.classify(outcome.code, outcome.text, outcome.stage, RULES)[0] == rx.OTHER
    applied = apply_attempt(before, "far.test", {"a@far.test": outcome}, "h", NOW, RetryConfig())
    assert applied.envelope.recipients[0].failures_5xx == 1
    assert applied.envelope.retries["far.test"]["failures"] == 1


# -- greylisting ---------------------------------------------------------------------


def test_greylisting_holds_new_mail_until_a_greylisted_message_passes():
    r = rx.on_greylisted(rx.Receiver(), NOW, first_contact=True)
    assert r.state == rx.GREYLISTING
    assert rx.admit(r, rx.Limits(), 10, NOW + 1, 0, [], retry=False) == r.hold_until
    assert rx.admit(r, rx.Limits(), 10, NOW + 1, 0, [], retry=True) is None  # the greylisted ones go
    passed = rx.on_greylist_passed(r, 40)
    assert passed.greylist_delay == 40 and rx.admit(passed, rx.Limits(), 10, NOW + 41, 0, [], False) is None
    assert rx.on_first_contact_sent(passed).auto_whitelist is True
    assert rx.on_first_contact_sent(passed).state == rx.NORMAL


def test_a_receiver_without_auto_whitelist_is_learned_and_not_held_again():
    r = rx.on_greylist_passed(rx.on_greylisted(rx.Receiver(), NOW, True), 40)
    r = rx.on_greylisted(r, NOW + 41, first_contact=True)  # released mail greylisted again
    assert r.auto_whitelist is False and r.hold_until == 0
    assert rx.admit(r, rx.Limits(), 10, NOW + 42, 0, [], False) is None


def test_a_greylisted_retry_alone_does_not_mark_a_destination():
    assert rx.on_greylisted(rx.Receiver(), NOW, first_contact=False) == rx.Receiver()


def test_greylist_retry_times():
    first = NOW
    # the probe walks the ladder (interval 120: 40, 80, 120 ...), the others wait at its top
    assert rx.greylist_retry_at(first, NOW, None, NOW + 120, 120, probe=True) == NOW + 40
    assert rx.greylist_retry_at(first, NOW + 40, None, NOW + 400, 120, probe=True) == NOW + 80
    assert rx.greylist_retry_at(first, NOW, None, NOW + 120, 120, probe=False) == NOW + 360
    # learned: first attempt + delay + margin
    assert rx.greylist_retry_at(first, NOW, 30, NOW + 120, 120, probe=False) == NOW + 30 + rx.greylist_margin(30)
    # nothing else waits: nothing to learn for, E-Post's time
    assert rx.greylist_retry_at(first, NOW, None, NOW + 120, 120, probe=True, others_waiting=False) == NOW + 120
    # E-Post bounces: so do we; past the ladder: E-Post's time
    assert rx.greylist_retry_at(first, NOW, 30, None, 120, probe=True) is None
    assert rx.greylist_retry_at(first, NOW + 400, None, NOW + 999, 120, probe=True) == NOW + 999


@given(st.floats(0, 10000), st.one_of(st.none(), st.floats(1, 3600)), st.floats(1, 3600), st.booleans())
def test_a_greylisted_retry_is_never_due_in_the_past(waited, delay, interval, probe):
    now = NOW + waited
    when = rx.greylist_retry_at(NOW, now, delay, now + interval, interval, probe)
    assert when is not None and when > now - 1e-6


# -- Domain.mri ------------------------------------------------------------------------


@given(
    r=st.builds(
        rx.Receiver,
        state=st.sampled_from([rx.THROTTLED, rx.GREYLISTING]),
        resume_at=st.integers(0, 2 * 10**9).map(float),
        slow_until=st.integers(0, 2 * 10**9).map(float),
        rate=st.one_of(st.none(), st.integers(1, 1000).map(float)),
        connections=st.one_of(st.none(), st.integers(1, 50)),
        hold_until=st.integers(0, 2 * 10**9).map(float),
        greylist_delay=st.one_of(st.none(), st.integers(1, 3600).map(float)),
        auto_whitelist=st.one_of(st.none(), st.booleans()),
    )
)
def test_receiver_state_survives_domain_mri(r):
    now = NOW
    fields = rx.to_fields(r, now, "mx:mx1.far.test:25")
    state = DomainState("far.test", try_number=2, err_code=451, messages=3, extra=tuple(fields.items()))
    text = format_mri(state)
    assert text.splitlines()[0] == "Domain-name: far.test"  # E-Post's keys first, ours after
    assert text.index("Messages:") < text.index("Destination:") if fields else True
    back = parse_mri(text, "Domain.mri")
    assert back == state
    restored = rx.from_fields(dict(back.extra))
    settled = rx.settle(r, now)
    if settled.state == rx.GREYLISTING:  # the hold is not restored; an episode still learning starts afresh
        settled = dataclasses.replace(settled, hold_until=0.0)
        if settled.auto_whitelist is not False:
            settled = dataclasses.replace(settled, state=rx.NORMAL)
    assert rx.to_fields(restored, now, "mx:mx1.far.test:25") == rx.to_fields(settled, now, "mx:mx1.far.test:25")


def test_unreadable_extra_keys_are_relearned_not_fatal():
    r = rx.from_fields({"State": "sleepy", "Greylist-delay": "soon", "Resume-at": "-5", "Auto-whitelist": "maybe"})
    assert r == rx.Receiver()
