"""Envelope files round-trip exactly, and a damaged one is reported with its file name."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epost.store.envelope import Envelope, EnvelopeError, Recipient

ENVELOPE = Envelope(
    queue_id="0006123456789AB0001",
    sender="bob@example.org",
    recipients=(
        Recipient("alice@example.jp", {"kind": "local", "mailbox": "example.jp/alice"}),
        Recipient("carol@else.jp", {"kind": "relay", "hosts": ["mx.else.jp:25"]}, "failed", 3, "550 5.1.1 no"),
    ),
    arrival=1796025600.123456,
    size=1234,
    client="mx.example.org [192.0.2.1]",
    auth="bob",
    body="8BITMIME",
)

routes = st.none() | st.dictionaries(st.text(), st.text() | st.integers() | st.lists(st.text()))
recipients = st.builds(
    Recipient,
    address=st.text(),
    route=routes,
    state=st.sampled_from(["pending", "delivered", "failed"]),
    attempts=st.integers(min_value=0),
    last_reply=st.text(),
    failures_5xx=st.integers(0, 20),
    dsn_sent=st.booleans(),
)
retry_state = st.fixed_dictionaries(
    {"first_failure": st.floats(0, 2e9), "failures": st.integers(0, 99), "next_attempt": st.floats(0, 2e9)}
)
envelopes = st.builds(
    Envelope,
    queue_id=st.text(),
    sender=st.text(),
    recipients=st.lists(recipients, max_size=5).map(tuple),
    arrival=st.floats(allow_nan=False, allow_infinity=False),
    size=st.integers(min_value=0),
    client=st.text(),
    listener=st.sampled_from(["relay", "submission", "smtps"]),
    auth=st.none() | st.text(),
    body=st.sampled_from(["7BIT", "8BITMIME"]),
    retries=st.dictionaries(st.text(), retry_state, max_size=3),
    delay_warned=st.booleans(),
)


@given(envelopes)
def test_any_envelope_round_trips(envelope):
    assert Envelope.from_bytes(envelope.to_bytes(), "x.env") == envelope


def test_surrogate_escaped_address_round_trips():
    envelope = Envelope("Q", "b\udcffad@example.org", (Recipient("a@example.jp"),), 0.0, 0)
    assert Envelope.from_bytes(envelope.to_bytes(), "x.env") == envelope


def test_envelope_written_before_retry_state_existed_still_reads():
    old = {**json.loads(ENVELOPE.to_bytes()), "recipients": [{"address": "a@b", "route": None, "state": "pending", "attempts": 0, "last_reply": ""}]}
    del old["retries"]
    envelope = Envelope.from_bytes(json.dumps(old).encode(), "old.env")
    assert envelope.retries == {} and envelope.recipients[0].dsn_sent is False


def test_with_recipient_changes_only_that_recipient():
    changed = ENVELOPE.with_recipient(0, state="delivered", attempts=1)
    assert changed.recipients[0].state == "delivered"
    assert changed.recipients[0].attempts == 1
    assert changed.recipients[1] == ENVELOPE.recipients[1]
    assert ENVELOPE.recipients[0].state == "pending"


def test_pending_lists_indexes_still_to_deliver():
    assert ENVELOPE.pending() == [0]
    assert ENVELOPE.with_recipient(0, state="delivered").pending() == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"version": 1}',
        ENVELOPE.to_bytes()[:-20],
        ENVELOPE.to_bytes().replace(b'"pending"', b'"lost"'),
        ENVELOPE.to_bytes().replace(b'"size": 1234', b'"size": "1234"'),
        ENVELOPE.to_bytes().replace(b'"size": 1234', b'"size": true'),
        ENVELOPE.to_bytes().replace(b'"version": 1', b'"version": 99'),
    ],
)
def test_corrupt_envelope_names_the_file(data):
    with pytest.raises(EnvelopeError, match="incoming/Q.env"):
        Envelope.from_bytes(data, "incoming/Q.env")
