"""DSN bounces (SPEC §6, RFC 3464): parsed back with the `email` package, structure and line rules hold."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, strategies as st

from epost.delivery.bounce import FailedRecipient, build_dsn, should_bounce

HOSTNAME = "mail.example.com"
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
HEADERS = b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: lunch\r\n"
BODY = b"the secret body\r\n"
UNKNOWN = FailedRecipient(
    "bob@example.org", "5.1.1", remote_mta="mx.example.org",
    diagnostic="550 5.1.1 User unknown", last_attempt=NOW - 10,
)
NO_ANSWER = FailedRecipient("carol@example.net", "4.4.1")


def dsn(recipients: list[FailedRecipient], headers: bytes = HEADERS + b"\r\n" + BODY, sender: str = "alice@example.com") -> bytes:
    return build_dsn(
        hostname=HOSTNAME, queue_id="Q1234", sender=sender, arrival=ARRIVAL,
        original_headers=headers, recipients=recipients, now=NOW,
    )


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def assert_smtp_ready(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.isascii()


def test_dsn_is_a_three_part_delivery_status_report():
    msg = parse(dsn([UNKNOWN, NO_ANSWER]))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["MIME-Version"] == "1.0"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers",
    ]
    assert not msg.defects and all(not p.defects for p in msg.walk())


def test_dsn_headers_come_from_the_mailer_daemon_to_the_sender():
    msg = parse(dsn([UNKNOWN]))
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOSTNAME}"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith(f"@{HOSTNAME}>")
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW


def test_message_ids_are_unique():
    assert parse(dsn([UNKNOWN]))["Message-ID"] != parse(dsn([UNKNOWN]))["Message-ID"]


def test_delivery_status_fields_for_a_rejected_and_an_unanswered_recipient():
    status = list(parse(dsn([UNKNOWN, NO_ANSWER])).iter_parts())[1]
    per_message, rejected, unanswered = status.get_payload()
    assert per_message["Reporting-MTA"] == f"dns; {HOSTNAME}"
    assert per_message["X-Epost-Queue-ID"] == "Q1234"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL

    assert rejected["Final-Recipient"] == "rfc822; bob@example.org"
    assert rejected["Action"] == "failed"
    assert rejected["Status"] == "5.1.1"
    assert rejected["Remote-MTA"] == "dns; mx.example.org"
    assert rejected["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert parsedate_to_datetime(rejected["Last-Attempt-Date"]).timestamp() == NOW - 10

    assert unanswered["Final-Recipient"] == "rfc822; carol@example.net"
    assert unanswered["Action"] == "failed"
    assert unanswered["Status"] == "4.4.1"
    for absent in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert absent not in unanswered


def test_explanation_lists_each_recipient_and_its_diagnostic():
    text = list(parse(dsn([UNKNOWN, NO_ANSWER])).iter_parts())[0].get_content()
    assert "<bob@example.org>: host mx.example.org said: 550 5.1.1 User unknown" in text
    assert "<carol@example.net>" in text and "4.4.1" in text


def test_returned_part_holds_the_original_headers_and_never_the_body():
    raw = dsn([UNKNOWN])
    returned = list(parse(raw).iter_parts())[2]
    assert returned.get_content().encode() == HEADERS
    assert b"secret" not in raw


def test_bare_line_ends_in_the_original_headers_become_crlf():
    raw = dsn([UNKNOWN], headers=b"Subject: a\nX-A: b\rX-B: c\n\nbody")
    assert_smtp_ready(raw)
    assert list(parse(raw).iter_parts())[2].get_content() == "Subject: a\r\nX-A: b\r\nX-B: c\r\n"


def test_dsn_is_crlf_only_with_short_lines():
    long_reply = "550 5.7.1 " + "x" * 3000 + " " + "word " * 500
    long_header = b"X-Long: " + b"y" * 2000 + b"\r\n"
    raw = dsn([FailedRecipient("a@b.example", "5.7.1", diagnostic=long_reply)], headers=HEADERS + long_header)
    assert_smtp_ready(raw)
    returned = list(parse(raw).iter_parts())[2].get_content().encode()
    assert returned == HEADERS + long_header


def test_multiline_reply_stays_one_diagnostic_field():
    raw = dsn([FailedRecipient("a@b.example", "5.1.1", diagnostic="550-5.1.1 first\r\n550 5.1.1 second\n")])
    assert_smtp_ready(raw)
    block = list(parse(raw).iter_parts())[1].get_payload()[1]
    assert block["Diagnostic-Code"] == "smtp; 550-5.1.1 first 550 5.1.1 second"


def test_all_delayed_recipients_make_a_delay_warning():
    delayed = FailedRecipient("bob@example.org", "4.4.1", action="delayed")
    msg = parse(dsn([delayed]))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert list(msg.iter_parts())[1].get_payload()[1]["Action"] == "delayed"
    assert parse(dsn([delayed, UNKNOWN]))["Subject"] == "Undelivered Mail Returned to Sender"


def test_no_bounce_for_the_null_sender():
    assert should_bounce("") is False
    assert should_bounce("alice@example.com") is True
    with pytest.raises(ValueError):
        dsn([UNKNOWN], sender="")


@pytest.mark.parametrize("kwargs", [{"status": "550"}, {"status": "5.1"}, {"action": "bounced"}])
def test_recipient_rejects_malformed_status_or_action(kwargs):
    with pytest.raises(ValueError):
        FailedRecipient(**{"address": "a@b.example", "status": "5.1.1", **kwargs})


recipients = st.builds(
    FailedRecipient,
    address=st.emails(),
    status=st.sampled_from(["5.1.1", "4.4.1", "5.4.7", "5.7.1", "4.2.2"]),
    action=st.sampled_from(["failed", "delayed"]),
    remote_mta=st.none() | st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,3}", fullmatch=True),
    diagnostic=st.none() | st.text(st.characters(blacklist_categories=("Cs",)), max_size=1200),
    last_attempt=st.none() | st.floats(0, 4e9),
)


@given(st.lists(recipients, min_size=1, max_size=5), st.emails())
def test_any_diagnostic_or_address_keeps_structure_and_line_rules(rcpts, sender):
    raw = dsn(rcpts, sender=sender)
    assert_smtp_ready(raw)
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers",
    ]
    blocks = list(msg.iter_parts())[1].get_payload()
    assert len(blocks) == len(rcpts) + 1
    for block, r in zip(blocks[1:], rcpts):
        assert block["Final-Recipient"] == f"rfc822; {r.address}"
        assert block["Status"] == r.status and block["Action"] == r.action
        assert ("Diagnostic-Code" in block) == bool(r.diagnostic)
    assert list(msg.iter_parts())[2].get_content().encode() == HEADERS


def test_original_header_lines_up_to_998_octets_are_returned_verbatim():
    mid_header = b"X-Mid: " + b"z" * 900 + b"\r\n"
    raw = dsn([UNKNOWN], headers=HEADERS + mid_header)
    assert mid_header in raw
    assert list(parse(raw).iter_parts())[2]["Content-Transfer-Encoding"] == "7bit"
