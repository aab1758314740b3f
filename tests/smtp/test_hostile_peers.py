"""Hostile peers over StringTransport and task.Clock (issue 18): unread replies,
trickled lines, deadlines, and the log line + metric for every refusal and timeout."""

from __future__ import annotations

import base64

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import Logger

from test_auth_protocol import FakePortal
from test_server import ENVELOPE, HELLO, FakeReceiver, codes, replies

from epost import metrics
from epost.listening import default_backlog, with_backlog
from epost.smtp import events as reasons
from epost.smtp.events import SessionEvents
from epost.smtp.factory import ConnectionLimits, SMTPFactory
from epost.smtp.server import CLOSE_GRACE, ServerSettings, SMTPServer
from epost.smtp.throttle import AuthThrottle

BOUND = 4096  # the fake transport's write buffer, like FileDescriptor.bufferSize (64 KiB)


class BufferedTransport(StringTransport):
    """A StringTransport that behaves like a TCP transport towards its
    streaming producer: pauses it when more than BOUND bytes wait unsent,
    resumes it when `drain()` empties the buffer."""

    def __init__(self, **kwargs):
        super().__init__(peerAddress=kwargs.pop("peerAddress", IPv4Address("TCP", "192.0.2.9", 4321)), **kwargs)
        self.unsent = 0
        self.producer_paused = False
        self.aborted = False

    def write(self, data):
        super().write(data)
        self.unsent += len(data)
        if self.producer is not None and self.streaming and self.unsent > BOUND and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def drain(self):
        self.unsent = 0
        was_paused, self.producer_paused = self.producer_paused, False
        if self.producer is not None and was_paused:
            self.producer.resumeProducing()

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class RecordingEvents:
    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def refused(self, listener, client, port, reason, reply):
        self.seen.append(("refused", reason))

    def ended(self, listener, client, port, reason, reply, after=""):
        self.seen.append(("ended", reason))


def connect(receiver=None, portal=None, throttle=None, **overrides):
    clock = task.Clock()
    receiver = receiver or FakeReceiver()
    events = RecordingEvents()
    settings = ServerSettings(hostname="mx.example.test", **overrides)
    server = SMTPServer(receiver, settings, clock, portal=portal, throttle=throttle, events=events)
    transport = BufferedTransport()
    server.makeConnection(transport)
    return server, transport, receiver, clock, events


# --- bounded output ----------------------------------------------------------


def test_the_session_is_its_transports_streaming_producer():
    server, transport, *_ = connect()
    assert transport.producer is server and transport.streaming


def test_unread_replies_stop_reading_and_running_commands():
    server, transport, *_ = connect()
    server.dataReceived(b"HELP\r\n" * 10_000)
    assert transport.producerState == "paused"
    assert len(transport.value()) < BOUND + 200  # one reply past the bound, not 10,000 replies
    answered = len(codes(transport))
    while transport.producer_paused:
        transport.drain()
    assert transport.producerState == "producing"
    assert len(codes(transport)) == 10_001  # greeting + every HELP, once the client read
    assert answered < 100


def test_a_producer_pause_alone_does_not_stop_reading():
    """Twisted's TLS layer pauses its producer while it holds the greeting
    until the handshake is done: reading must go on, or the handshake never ends."""
    server, transport, *_ = connect()
    server.pauseProducing()
    assert transport.producerState == "producing"
    server.dataReceived(b"NOOP\r\n")
    assert codes(transport) == ["220"]  # but nothing is run while replies are unread
    transport.producer_paused = True
    transport.drain()
    assert codes(transport) == ["220", "250"]


def test_a_check_finishing_does_not_resume_reading_while_replies_are_unread():
    server, transport, receiver, *_ = connect()
    server.dataReceived(HELLO + b"MAIL FROM:<slow@example.org>\r\n")
    assert transport.producerState == "paused"  # the check is pending
    server.pauseProducing()  # and the client stops reading
    transport.producer_paused = True
    server.dataReceived(b"NOOP\r\n" * 5000)  # already read when the check began
    receiver.pending.pop().callback(None)
    assert transport.producerState == "paused"
    assert codes(transport)[-1] == "250" and codes(transport).count("250") == 2  # EHLO, MAIL: no NOOP yet
    while transport.producer_paused:
        transport.drain()
    assert transport.producerState == "producing"
    assert codes(transport).count("250") == 5002


def test_drained_output_does_not_resume_reading_while_a_check_is_pending():
    server, transport, receiver, *_ = connect()
    server.pauseProducing()
    transport.producer_paused = True
    server.dataReceived(HELLO + b"MAIL FROM:<slow@example.org>\r\n" + b"NOOP\r\n" * 5000)
    assert codes(transport) == ["220"]  # nothing run while the output is stuck
    assert transport.producerState == "paused"  # and past INPUT_BOUND nothing more is read
    transport.drain()
    assert transport.producerState == "paused"  # MAIL's check is pending now
    receiver.pending.pop().callback(None)
    assert codes(transport)[:3] == ["220", "250", "250"]


def test_reading_resumes_when_the_message_ends_even_if_the_spool_writer_never_said_so():
    server, transport, *_ = connect()
    server.dataReceived(HELLO + ENVELOPE + b"DATA\r\n")
    server._writer.producer.pauseProducing()  # the spool is behind
    assert transport.producerState == "paused"
    server.dataReceived(b"hi\r\n.\r\n")  # bytes already read still arrive
    assert codes(transport)[-1] == "250"
    assert transport.producerState == "producing"


def test_a_slow_spool_does_not_time_the_client_out():
    """While the spool writer holds reading, it is the server that waits."""
    server, transport, _, clock, events = connect(command_timeout=30, data_timeout=600)
    server.dataReceived(HELLO + ENVELOPE + b"DATA\r\n")
    writer_side = server._writer.producer
    writer_side.pauseProducing()
    clock.advance(100)
    assert not transport.disconnecting and events.seen == []
    writer_side.resumeProducing()
    clock.advance(30)
    assert transport.disconnecting and events.seen == [("ended", reasons.COMMAND_TIMEOUT)]


def test_a_session_stuck_on_unread_replies_is_aborted_at_command_timeout():
    server, transport, _, clock, events = connect(command_timeout=30)
    server.dataReceived(b"HELP\r\n" * 10_000)
    clock.advance(29)
    assert not transport.aborted
    clock.advance(1)
    assert transport.aborted
    assert ("ended", reasons.OUTPUT_STUCK) in events.seen


def test_a_closing_session_whose_last_replies_stay_unread_is_aborted():
    server, transport, _, clock, events = connect()
    server.dataReceived(b"QUIT\r\n")
    assert transport.disconnecting and transport.producer is None  # a producer would hold the close
    clock.advance(CLOSE_GRACE - 1)
    assert not transport.aborted
    clock.advance(1)
    assert transport.aborted and events.seen == [("ended", reasons.OUTPUT_STUCK)]


# --- deadlines ---------------------------------------------------------------


def test_a_trickled_command_line_times_out_from_the_previous_reply():
    server, transport, _, clock, events = connect(command_timeout=300)
    server.dataReceived(HELLO)
    for byte in b"NOOP":
        clock.advance(70)
        server.dataReceived(bytes([byte]))
    clock.advance(300 - 4 * 70 - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert replies(transport)[-1] == "421 4.4.2 mx.example.test Error: timeout exceeded"
    assert events.seen == [("ended", reasons.COMMAND_TIMEOUT)]


def test_the_command_clock_does_not_run_while_the_server_is_checking():
    server, transport, receiver, clock, _ = connect(command_timeout=300)
    server.dataReceived(HELLO + b"MAIL FROM:<slow@example.org>\r\n")
    clock.advance(400)
    assert not transport.disconnecting
    receiver.pending.pop().callback(None)
    clock.advance(299)
    assert not transport.disconnecting
    clock.advance(1)
    assert codes(transport)[-1] == "421"


def test_mail_must_come_within_the_session_deadline_whatever_else_is_sent():
    server, transport, _, clock, events = connect(command_timeout=300, session_deadline=600)
    for _ in range(5):
        clock.advance(110)
        server.dataReceived(b"NOOP\r\n")
    clock.advance(49)
    assert not transport.disconnecting
    clock.advance(1)
    assert replies(transport)[-1] == "421 4.4.2 mx.example.test Error: session deadline exceeded"
    assert events.seen == [("ended", reasons.DEADLINE)]


def test_an_open_transaction_stops_the_deadline_but_rset_does_not_restart_it():
    server, transport, _, clock, _ = connect(command_timeout=1000, session_deadline=300)
    server.dataReceived(HELLO + b"MAIL FROM:<a@example.org>\r\n")
    clock.advance(400)
    assert not transport.disconnecting  # inside a transaction
    server.dataReceived(b"RSET\r\n")
    clock.advance(0)
    assert transport.disconnecting  # the 300 s ran out long ago
    assert replies(transport)[-1].startswith("421 4.4.2")


def test_each_finished_message_earns_a_new_deadline():
    server, transport, receiver, clock, _ = connect(command_timeout=1000, session_deadline=300)
    server.dataReceived(HELLO)
    clock.advance(250)
    server.dataReceived(ENVELOPE + b"DATA\r\nhi\r\n.\r\n")
    assert len(receiver.committed) == 1
    clock.advance(299)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_data_timeout_is_reported():
    server, transport, _, clock, events = connect(command_timeout=300, data_timeout=600)
    server.dataReceived(HELLO + ENVELOPE + b"DATA\r\n")
    for _ in range(6):
        clock.advance(100)
        server.dataReceived(b"x\r\n")
    assert events.seen == [("ended", reasons.DATA_TIMEOUT)]


def test_too_many_errors_is_reported_once():
    server, transport, _, _, events = connect(max_bad_commands=2)
    server.dataReceived(b"FOO\r\nBAR\r\nBAZ\r\n")
    assert events.seen == [("ended", reasons.TOO_MANY_ERRORS)]


def test_auth_cutoff_is_reported():
    clock = task.Clock()
    throttle = AuthThrottle(clock, cutoff=1, window=300)
    throttle.failed("192.0.2.9")
    server, transport, _, _, events = connect(portal=FakePortal(), throttle=throttle, allow_plaintext_auth=True)
    server.dataReceived(HELLO + b"AUTH PLAIN " + base64.b64encode(b"\0a@example.test\0x") + b"\r\n")
    assert replies(transport)[-1].startswith("421 4.7.0")
    assert events.seen == [("ended", reasons.AUTH_CUTOFF)]


@pytest.mark.parametrize(
    "total, per_client, reason",
    [(1, 5, reasons.REFUSED_TOO_MANY), (5, 1, reasons.REFUSED_PER_CLIENT)],
)
def test_connection_limit_refusals_are_reported(total, per_client, reason):
    clock = task.Clock()
    events = RecordingEvents()
    factory = SMTPFactory(FakeReceiver(), ServerSettings(hostname="mx.example.test"), clock, ConnectionLimits(total, per_client), events=events)
    address = IPv4Address("TCP", "192.0.2.9", 1)
    factory.buildProtocol(address)
    refuse = factory.buildProtocol(address)
    transport = StringTransport()
    refuse.makeConnection(transport)
    assert transport.value().startswith(b"421 ")
    assert events.seen == [("refused", reason)]


# --- the rate-limited log ----------------------------------------------------


class Captured:
    def __init__(self):
        self.lines: list[str] = []
        from twisted.logger import formatEvent

        self.logger = Logger(observer=lambda event: self.lines.append(formatEvent(event)))


def test_event_lines_name_the_client_and_reason_and_count_in_metrics():
    clock, captured = task.Clock(), Captured()
    events = SessionEvents(clock, logger=captured.logger)
    before = metrics.sessions_ended.labels(listener="relay", reason="deadline")._value.get()
    events.ended("relay", "192.0.2.9", 4321, reasons.DEADLINE, "421 4.4.2 x", "NOOP")
    assert captured.lines == ['smtp ended: client=[192.0.2.9]:4321 listener=relay reason=deadline after=NOOP reply="421 4.4.2 x"']
    assert metrics.sessions_ended.labels(listener="relay", reason="deadline")._value.get() == before + 1
    refused_before = metrics.connections_refused.labels(listener="relay", reason="per_client_limit")._value.get()
    events.refused("relay", "192.0.2.9", 4321, reasons.REFUSED_PER_CLIENT, "421 4.7.0 y")
    assert metrics.connections_refused.labels(listener="relay", reason="per_client_limit")._value.get() == refused_before + 1


def test_a_flood_of_events_logs_a_burst_then_one_summary_per_interval():
    clock, captured = task.Clock(), Captured()
    events = SessionEvents(clock, burst=3, interval=60, logger=captured.logger)
    for _ in range(10):
        events.ended("relay", "192.0.2.9", 1, reasons.COMMAND_TIMEOUT, "421")
        events.refused("relay", "192.0.2.9", 1, reasons.REFUSED_PER_CLIENT, "421")
    assert len(captured.lines) == 6  # three of each reason
    clock.advance(59)
    assert len(captured.lines) == 6
    clock.advance(1)
    summaries = captured.lines[6:]
    assert sorted(summaries) == [
        "smtp: suppressed 7 similar lines (reason=command_timeout) in the last 60 s",
        "smtp: suppressed 7 similar lines (reason=per_client_limit) in the last 60 s",
    ]
    events.ended("relay", "192.0.2.9", 1, reasons.COMMAND_TIMEOUT, "421")
    assert len(captured.lines) == 9  # a new interval logs again
    assert not clock.getDelayedCalls()  # nothing suppressed: no summary pending


def test_flush_says_what_is_still_suppressed_and_leaves_no_timer():
    clock, captured = task.Clock(), Captured()
    events = SessionEvents(clock, burst=1, interval=60, logger=captured.logger)
    for _ in range(3):
        events.ended("relay", "192.0.2.9", 1, reasons.DEADLINE, "421")
    events.flush()
    assert captured.lines[-1] == "smtp: suppressed 2 similar lines (reason=deadline) in the last 60 s"
    assert not clock.getDelayedCalls()


# --- listen backlog ------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("tcp:25", "tcp:25:backlog=777"),
        ("tcp:25:interface=127.0.0.1", "tcp:25:interface=127.0.0.1:backlog=777"),
        ("tcp6:25:interface=\\:\\:1", "tcp6:25:interface=\\:\\:1:backlog=777"),
        ("ssl:465:privateKey=k.pem", "ssl:465:privateKey=k.pem:backlog=777"),
        ("unix:/run/e.sock", "unix:/run/e.sock:backlog=777"),
        ("haproxy:tcp:25", "haproxy:tcp:25:backlog=777"),
        ("tcp:25:backlog=5", "tcp:25:backlog=5"),
        ("haproxy:tcp:25:backlog=5", "haproxy:tcp:25:backlog=5"),
        ("tcp:25:127.0.0.1:5", "tcp:25:127.0.0.1:5"),  # positional backlog
        ("tcp6:25:5", "tcp6:25:5"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_listeners_get_a_backlog_unless_the_endpoint_sets_one(given, expected):
    assert with_backlog(given, 777) == expected


@pytest.mark.parametrize("description", ["tcp:2525", "tcp6:2525", "tcp:2525:interface=127.0.0.1"])
def test_the_backlog_reaches_listen(description):
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory

    reactor = MemoryReactor()
    serverFromString(reactor, with_backlog(description, 4321)).listen(Factory())
    assert reactor.tcpServers[0][2] == 4321


def test_default_backlog_is_the_kernels_somaxconn_or_1024(tmp_path):
    (tmp_path / "somaxconn").write_text("4096\n")
    assert default_backlog(tmp_path / "somaxconn") == 4096
    assert default_backlog(tmp_path / "missing") == 1024
