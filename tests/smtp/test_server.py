"""The ESMTP server protocol over StringTransport and task.Clock."""

from __future__ import annotations

import re

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from epost.reply import Reply
from epost.smtp.interfaces import Rejected
from epost.smtp.server import ServerSettings, SMTPServer


class FakeWriter:
    def __init__(self, store, queue_id, recipients):
        self.store, self.queue_id, self.recipients = store, queue_id, recipients
        self.content = b""
        self.aborted = False

    def write(self, data):
        self.content += data

    def commit(self):
        if self.store.commit_error is not None:
            return defer.fail(self.store.commit_error)
        self.store.committed.append(self)
        return defer.succeed(self.queue_id)

    def abort(self):
        self.aborted = True

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


class FakeReceiver:
    """Accepts *@example.test except unknown@; 'slow@' answers later."""

    def __init__(self):
        self.committed: list[FakeWriter] = []
        self.commit_error = None
        self.pending: list[defer.Deferred] = []
        self.sessions = []
        self.count = 0

    def check_sender(self, session, sender, params):
        self.sessions.append(session)
        if sender is not None and sender.local == "slow":
            d = defer.Deferred()
            self.pending.append(d)
            return d

    def check_recipient(self, session, sender, recipient):
        if recipient.domain != "example.test":
            raise Rejected(Reply(554, "5.7.1", "Relay access denied"))
        if recipient.local == "unknown":
            raise Rejected(Reply(550, "5.1.1", "User unknown"))
        if recipient.local == "slow":
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return "local"

    def open_message(self, session, sender, recipients, params):
        self.count += 1
        return FakeWriter(self, f"Q{self.count}", recipients)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    tls_started_with = None

    def startTLS(self, context):
        self.tls_started_with = context


def connect(transport=None, tls_context=None, **overrides):
    receiver = FakeReceiver()
    clock = task.Clock()
    settings = ServerSettings(hostname="mx.example.test", **overrides)
    server = SMTPServer(receiver, settings, clock, tls_context=tls_context)
    transport = transport or StringTransport(peerAddress=None)
    server.makeConnection(transport)
    return server, transport, receiver, clock


def replies(transport) -> list[str]:
    return [line for line in transport.value().decode().split("\r\n") if line]


def codes(transport) -> list[str]:
    """Final reply codes only (multi-line continuation lines skipped)."""
    return [line[:3] for line in replies(transport) if line[3:4] != "-"]


def send(server, *lines: bytes):
    server.dataReceived(b"".join(lines))


HELLO = b"EHLO client.example\r\n"
ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"


def test_greeting_names_the_configured_host():
    _, transport, _, _ = connect()
    assert replies(transport) == ["220 mx.example.test ESMTP epost"]


def test_ehlo_advertises_the_extensions():
    server, transport, _, _ = connect(max_message_size=1234)
    send(server, HELLO)
    lines = replies(transport)[1:]
    assert lines[0] == "250-mx.example.test"
    assert [l[4:] for l in lines[1:]] == ["PIPELINING", "SIZE 1234", "8BITMIME", "ENHANCEDSTATUSCODES"]
    assert lines[-1].startswith("250 ")


def test_starttls_is_advertised_only_with_a_context_and_a_tls_capable_transport():
    server, transport, _, _ = connect(TLSStringTransport(), tls_context=object())
    send(server, HELLO)
    assert "250 STARTTLS" in replies(transport)
    server, transport, _, _ = connect(StringTransport(), tls_context=object())
    send(server, HELLO)
    assert not any("STARTTLS" in l for l in replies(transport))


def test_a_transaction_is_queued_with_unstuffed_content():
    server, transport, receiver, _ = connect()
    send(server, HELLO, ENVELOPE, b"DATA\r\n", b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\n")
    assert codes(transport)[-4:] == ["250", "250", "354", "250"]
    assert replies(transport)[-1] == "250 2.0.0 Ok: queued as Q1"
    assert receiver.committed[0].content == b"Subject: x\r\n\r\n.dot\r\nend\r\n"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200), max_size=12))
def test_any_split_of_the_input_gives_the_same_replies_and_message(cuts):
    wire = HELLO + ENVELOPE + b"DATA\r\n.x\r\n..y\r\n\r\n.\r\nQUIT\r\n"
    server, transport, receiver, _ = connect()
    position = 0
    for cut in cuts:
        send(server, wire[position : position + cut])
        position += cut
    send(server, wire[position:])
    assert codes(transport) == ["220", "250", "250", "250", "354", "250", "221"]
    assert receiver.committed[0].content == b"x\r\n.y\r\n\r\n"


@settings(deadline=None)
@given(st.sampled_from([b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r"]))
def test_smuggled_end_of_data_never_yields_a_second_message(ending):
    smuggled = b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nforged\r\n"
    server, transport, receiver, _ = connect()
    send(server, HELLO, ENVELOPE, b"DATA\r\n", b"body" + ending + smuggled + b".\r\n", b"QUIT\r\n")
    assert len(receiver.committed) <= 1
    assert all(b"forged" not in w.content or w.content.startswith(b"body") for w in receiver.committed)
    # the bare newline makes the whole message refused, and nothing is queued
    assert receiver.committed == []
    assert "550 5.6.0 Error: bare <CR> or <LF> in message data" in replies(transport)
    assert codes(transport)[-1] == "221"


def test_long_data_line_does_not_drop_back_to_command_mode():
    server, transport, receiver, _ = connect()
    body = b"x" * 20000 + b"\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nforged\r\n"
    send(server, HELLO, ENVELOPE, b"DATA\r\n", body)
    assert codes(transport)[-1] == "354"  # still reading data, no command ran
    send(server, b".\r\nQUIT\r\n")
    assert receiver.committed == []
    assert replies(transport)[-2] == "500 5.5.2 Error: message line longer than 1000 octets"
    assert codes(transport)[-1] == "221"


def test_bytes_pipelined_after_starttls_are_discarded_and_state_reset():
    server, transport, receiver, _ = connect(TLSStringTransport(), tls_context="ctx")
    send(server, HELLO, b"MAIL FROM:<a@example.org>\r\n", b"STARTTLS\r\nRCPT TO:<b@example.test>\r\n")
    assert transport.tls_started_with == "ctx"
    assert replies(transport)[-1] == "220 2.0.0 Ready to start TLS"
    transport.clear()
    send(server, b"MAIL FROM:<a@example.org>\r\n")  # EHLO must come again
    assert replies(transport) == ["503 5.5.1 Error: send HELO/EHLO first"]
    transport.clear()
    send(server, HELLO)
    assert "250 STARTTLS" not in replies(transport) and "250-STARTTLS" not in replies(transport)
    transport.clear()
    send(server, b"RCPT TO:<b@example.test>\r\n")  # the plaintext MAIL is forgotten too
    assert replies(transport) == ["503 5.5.1 Error: need MAIL command"]


def test_pipelined_replies_stay_in_order_while_a_check_is_pending():
    server, transport, receiver, _ = connect()
    send(server, HELLO)
    transport.clear()
    send(server, b"MAIL FROM:<slow@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    assert transport.value() == b""  # nothing may overtake the pending MAIL
    assert transport.producerState == "paused"
    receiver.pending.pop().callback(None)
    assert codes(transport) == ["250", "250", "354", "250", "221"]
    assert receiver.committed[0].content == b"hi\r\n"


def test_pending_recipient_check_holds_back_data():
    server, transport, receiver, _ = connect()
    send(server, HELLO, b"MAIL FROM:<a@example.org>\r\n")
    transport.clear()
    send(server, b"RCPT TO:<slow@example.test>\r\nDATA\r\nhello\r\n.\r\n")
    assert transport.value() == b""
    receiver.pending.pop().callback("local")
    assert codes(transport) == ["250", "354", "250"]


def test_storage_failure_answers_4xx():
    server, transport, receiver, _ = connect()
    receiver.commit_error = Rejected(Reply(452, "4.3.1", "Insufficient system storage"))
    send(server, HELLO, ENVELOPE, b"DATA\r\nx\r\n.\r\n")
    assert replies(transport)[-1] == "452 4.3.1 Insufficient system storage"
    receiver.commit_error = OSError("boom")
    send(server, ENVELOPE, b"DATA\r\nx\r\n.\r\n")
    assert replies(transport)[-1] == "451 4.3.0 Error: queue file write error"


def test_declared_size_over_the_limit_is_refused_at_mail():
    server, transport, _, _ = connect(max_message_size=100)
    send(server, HELLO, b"MAIL FROM:<a@example.org> SIZE=101\r\n")
    assert replies(transport)[-1] == "552 5.3.4 Message size exceeds fixed limit"
    send(server, b"MAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME\r\n")
    assert replies(transport)[-1] == "250 2.1.0 Ok"


def test_actual_size_over_the_limit_is_refused_at_end_of_data():
    server, transport, receiver, _ = connect(max_message_size=10)
    send(server, HELLO, ENVELOPE, b"DATA\r\n" + b"y" * 50 + b"\r\n.\r\nNOOP\r\n")
    assert replies(transport)[-2:] == ["552 5.3.4 Error: message file too big", "250 2.0.0 Ok"]
    assert receiver.committed == []


def test_unknown_parameters_are_refused_with_555():
    server, transport, _, _ = connect()
    send(server, HELLO, b"MAIL FROM:<a@example.org> RET=FULL\r\n")
    assert replies(transport)[-1] == "555 5.5.4 Unsupported option: RET"
    send(server, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test> NOTIFY=NEVER\r\n")
    assert replies(transport)[-1] == "555 5.5.4 Unsupported option: NOTIFY"


def test_bad_size_and_body_values_get_501():
    server, transport, _, _ = connect()
    send(server, HELLO, b"MAIL FROM:<a@example.org> SIZE=big\r\n")
    assert replies(transport)[-1] == "501 5.5.4 Bad SIZE parameter"
    send(server, b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n")
    assert replies(transport)[-1] == "501 5.5.4 Bad BODY parameter"


def test_recipient_limit_answers_452():
    server, transport, _, _ = connect(max_recipients=2)
    send(server, HELLO, b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.test>\r\n" * 3)
    assert codes(transport)[-3:] == ["250", "250", "452"]
    assert replies(transport)[-1] == "452 4.5.3 Error: too many recipients"


def test_rejected_recipients_get_the_receivers_reply():
    server, transport, _, _ = connect()
    send(server, HELLO, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<unknown@example.test>\r\nRCPT TO:<x@else.org>\r\nDATA\r\n")
    assert replies(transport)[-3:] == [
        "550 5.1.1 User unknown",
        "554 5.7.1 Relay access denied",
        "554 5.5.1 Error: no valid recipients",
    ]


@given(st.sampled_from([
    b"MAIL FROM:<a@example.org>\r\n",
    b"RCPT TO:<b@example.test>\r\n",
    b"DATA\r\n",
]))
def test_commands_before_helo_get_a_reply(command):
    server, transport, _, _ = connect()
    send(server, command)
    assert codes(transport)[-1] == "503"


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_input_never_raises_and_every_reply_is_well_formed(junk):
    server, transport, _, _ = connect()
    send(server, HELLO, junk + b"\r\n", b"NOOP\r\n")
    for line in replies(transport):
        assert re.match(r"\d{3}[ -]", line), line


@given(st.sampled_from([b"AUTH\r\n", b"AUTH PLAIN\r\n", b"AUTH PLAIN !!!\r\n", b"AUTH BOGUS x\r\n", b"STARTTLS now\r\n", b"VRFY\r\n"]))
def test_malformed_auth_and_friends_get_a_reply(line):
    server, transport, _, _ = connect()
    send(server, HELLO)
    transport.clear()
    send(server, line)
    assert len(codes(transport)) == 1 and codes(transport)[0][0] in "45"
    assert not transport.disconnecting


def test_noop_rset_vrfy_help():
    server, transport, _, _ = connect()
    send(server, HELLO, b"NOOP\r\nRSET\r\nVRFY bob\r\nHELP\r\n")
    assert codes(transport)[-4:] == ["250", "250", "252", "214"]


def test_over_long_command_line_is_refused_and_the_session_goes_on():
    server, transport, _, _ = connect()
    send(server, HELLO, b"NOOP " + b"x" * 2000 + b"\r\nNOOP\r\n")
    assert replies(transport)[-2:] == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


def test_bare_newline_in_a_command_is_refused_not_split():
    server, transport, _, _ = connect()
    send(server, HELLO, b"MAIL FROM:<a@example.org>\nRCPT TO:<b@example.test>\r\n")
    assert replies(transport)[-1] == "500 5.5.2 Error: bare <CR> or <LF> in command"


def test_too_many_errors_closes_with_421():
    server, transport, _, _ = connect(max_bad_commands=3)
    send(server, b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert replies(transport)[-1] == "421 4.7.0 mx.example.test Error: too many errors"
    assert transport.disconnecting
    assert codes(transport).count("250") == 0  # NOOP after the cut is not run


def test_idle_timeout_closes_with_421():
    server, transport, _, clock = connect(command_timeout=300, session_deadline=10_000)
    clock.advance(299)
    send(server, HELLO)
    clock.advance(299)
    assert not transport.disconnecting
    clock.advance(2)
    assert replies(transport)[-1] == "421 4.4.2 mx.example.test Error: timeout exceeded"
    assert transport.disconnecting


def test_data_deadline_cuts_a_trickling_client():
    server, transport, receiver, clock = connect(command_timeout=300, data_timeout=600)
    send(server, HELLO, ENVELOPE, b"DATA\r\n")
    for _ in range(7):
        clock.advance(100)
        send(server, b"line\r\n")
    assert transport.disconnecting
    assert replies(transport)[-1].startswith("421 4.4.2")
    assert receiver.committed == []


def test_submission_requires_auth_before_mail():
    server, transport, _, _ = connect(require_auth=True, listener="submission")
    send(server, HELLO, b"MAIL FROM:<a@example.org>\r\n")
    assert replies(transport)[-1] == "530 5.7.0 Authentication required"


def test_session_tells_the_receiver_client_and_helo():
    server, transport, receiver, _ = connect()
    send(server, HELLO, b"MAIL FROM:<a@example.org>\r\n")
    session = receiver.sessions[-1]
    assert (session.client_name, session.esmtp, session.listener, session.tls) == ("client.example", True, "relay", None)


def test_connection_lost_mid_data_aborts_the_message():
    server, transport, receiver, _ = connect()
    send(server, HELLO, ENVELOPE, b"DATA\r\npartial")
    writer = server._writer
    server.connectionLost(None)
    assert writer.aborted and receiver.committed == []
