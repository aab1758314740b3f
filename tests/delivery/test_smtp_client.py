"""The outbound client over StringTransport and task.Clock: we play the server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from twisted.logger import LogLevel, capturedLogs

from epost.delivery.smtp_client import (
    DEFAULT_TIMEOUTS,
    MAX_REPLY_BYTES,
    MAX_REPLY_LINES,
    MAX_REPLY_TEXT,
    Outcome,
    SMTPClient,
    TransactionResult,
)
from epost.delivery.stuffing import failure_kind

CONTENT = b"Subject: hi\r\n\r\nbody\r\n"
EHLO_PLAIN = b"250-mx.remote\r\n250 SIZE 1000\r\n"
EHLO_PIPE = b"250-mx.remote\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"


@implementer(ITLSTransport)
class TLSTransport(StringTransport):
    """Records startTLS instead of doing a handshake."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_contexts: list[object] = []

    def startTLS(self, ctx: object) -> None:
        self.tls_contexts.append(ctx)


class Session:
    def __init__(
        self,
        recipients: tuple[str, ...] = ("a@x", "b@x"),
        chunks: tuple[bytes, ...] = (CONTENT,),
        size: int = 100,
        body_8bit: bool = False,
        tls_context: object | None = None,
        transport: StringTransport | None = None,
    ) -> None:
        self.clock = task.Clock()
        self.client = SMTPClient(
            "mx.local", "s@here", list(recipients), lambda: iter(chunks), size, body_8bit, self.clock, tls_context
        )
        self.transport = transport or StringTransport()
        self.client.makeConnection(self.transport)
        self.results: list[TransactionResult] = []
        self.client.done.addCallback(self.results.append)

    def server(self, data: bytes) -> bytes:
        """Feed server bytes; return what the client wrote in response."""
        self.transport.clear()
        self.client.dataReceived(data)
        return self.transport.value()

    @property
    def result(self) -> TransactionResult:
        assert len(self.results) == 1
        return self.results[0]


def test_pipelined_transaction_sends_mail_rcpts_and_data_in_one_write() -> None:
    s = Session()
    assert s.server(b"220 mx.remote ESMTP\r\n") == b"EHLO mx.local\r\n"
    assert s.server(EHLO_PIPE) == b"MAIL FROM:<s@here> SIZE=100\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"
    assert s.server(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go\r\n") == CONTENT + b".\r\n"
    assert s.results == []
    assert s.server(b"250 2.0.0 queued as X\r\n") == b"QUIT\r\n"
    ok = Outcome(250, "2.0.0 queued as X", "data")
    assert s.result == TransactionResult({"a@x": ok, "b@x": ok}, tls=False, try_next_host=False)
    assert not s.transport.disconnecting
    s.server(b"221 bye\r\n")
    assert s.transport.disconnecting


def test_without_pipelining_commands_go_one_at_a_time() -> None:
    s = Session()
    s.server(b"220 mx.remote\r\n")
    assert s.server(EHLO_PLAIN) == b"MAIL FROM:<s@here> SIZE=100\r\n"
    assert s.server(b"250 ok\r\n") == b"RCPT TO:<a@x>\r\n"
    assert s.server(b"250 ok\r\n") == b"RCPT TO:<b@x>\r\n"
    assert s.server(b"250 ok\r\n") == b"DATA\r\n"
    assert s.server(b"354 go\r\n") == CONTENT + b".\r\n"
    assert s.server(b"250 2.0.0 ok\r\n") == b"QUIT\r\n"
    assert {o.code for o in s.result.recipients.values()} == {250}


def test_each_recipient_keeps_its_own_rcpt_or_data_outcome() -> None:
    s = Session(recipients=("a@x", "b@x", "c@x"))
    s.server(b"220 mx\r\n")
    s.server(EHLO_PIPE)
    wrote = s.server(b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n451 4.7.1 greylisted\r\n354 go\r\n")
    assert wrote == CONTENT + b".\r\n"
    s.server(b"250 2.0.0 ok\r\n")
    assert s.result.recipients == {
        "a@x": Outcome(250, "2.0.0 ok", "data"),
        "b@x": Outcome(550, "5.1.1 no such user", "rcpt"),
        "c@x": Outcome(451, "4.7.1 greylisted", "rcpt"),
    }
    assert [failure_kind(s.result.recipients[r].code) for r in ("b@x", "c@x")] == ["5xx", "4xx"]
    assert not s.result.try_next_host


def test_all_recipients_refused_sends_no_data() -> None:
    s = Session()
    s.server(b"220 mx\r\n")
    s.server(EHLO_PLAIN)
    s.server(b"250 ok\r\n")
    s.server(b"550 5.1.1 no\r\n")
    assert s.server(b"550 5.1.1 no\r\n") == b"QUIT\r\n"
    assert {o.stage for o in s.result.recipients.values()} == {"rcpt"}
    assert not s.result.try_next_host


def test_pipelined_all_refused_sends_no_content() -> None:
    s = Session()
    s.server(b"220 mx\r\n")
    s.server(EHLO_PIPE)
    assert s.server(b"250 ok\r\n550 no\r\n550 no\r\n554 5.5.1 no valid recipients\r\n") == b"QUIT\r\n"
    assert s.result.recipients["a@x"] == Outcome(550, "no", "rcpt")


def test_multiline_reply_split_across_reads_byte_by_byte() -> None:
    s = Session()
    s.server(b"220-mx.remote\r\n220 welcome\r\n")
    wrote = b""
    for i in range(len(EHLO_PIPE) - 1):
        wrote += s.server(EHLO_PIPE[i : i + 1])
    assert wrote == b""
    assert s.server(EHLO_PIPE[-1:]).startswith(b"MAIL FROM:<s@here> SIZE=100\r\n")


def test_ehlo_refused_falls_back_to_helo_without_extensions() -> None:
    s = Session(body_8bit=True)
    s.server(b"220 mx\r\n")
    assert s.server(b"502 5.5.1 what\r\n") == b"HELO mx.local\r\n"
    assert s.server(b"250 mx.remote\r\n") == b"MAIL FROM:<s@here>\r\n"


def test_starttls_offered_and_accepted_restarts_with_ehlo_and_drops_injected_replies() -> None:
    ctx = object()
    s = Session(tls_context=ctx, transport=TLSTransport())
    s.server(b"220 mx\r\n")
    assert s.server(b"250-mx.remote\r\n250 STARTTLS\r\n") == b"STARTTLS\r\n"
    assert s.server(b"220 go ahead\r\n250 injected\r\n") == b"EHLO mx.local\r\n"
    assert s.transport.tls_contexts == [ctx]
    assert s.server(EHLO_PIPE).startswith(b"MAIL FROM:")
    s.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    s.server(b"250 ok\r\n")
    assert s.result.tls


def test_starttls_refused_continues_in_plaintext_on_the_same_connection() -> None:
    s = Session(tls_context=object(), transport=TLSTransport())
    s.server(b"220 mx\r\n")
    s.server(b"250-mx.remote\r\n250 STARTTLS\r\n")
    assert s.server(b"454 4.7.0 TLS not available\r\n") == b"MAIL FROM:<s@here>\r\n"
    assert s.transport.tls_contexts == []
    for reply in (b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 ok\r\n"):
        s.server(reply)
    assert not s.result.tls
    assert {o.code for o in s.result.recipients.values()} == {250}


def test_connection_lost_during_tls_handshake_flags_tls_failed() -> None:
    s = Session(tls_context=object(), transport=TLSTransport())
    s.server(b"220 mx\r\n")
    s.server(b"250-mx.remote\r\n250 STARTTLS\r\n")
    s.server(b"220 go ahead\r\n")
    s.client.connectionLost()
    assert s.result.tls_failed and s.result.try_next_host and not s.result.tls
    assert {o.code for o in s.result.recipients.values()} == {None}


def test_starttls_not_attempted_without_a_context() -> None:
    s = Session(transport=TLSTransport())
    s.server(b"220 mx\r\n")
    assert s.server(b"250-mx.remote\r\n250 STARTTLS\r\n") == b"MAIL FROM:<s@here>\r\n"


def test_message_over_server_size_limit_is_not_sent_and_fails_permanently() -> None:
    s = Session(size=5000)
    s.server(b"220 mx\r\n")
    assert s.server(EHLO_PLAIN) == b"QUIT\r\n"
    outcome = s.result.recipients["a@x"]
    assert (outcome.code, outcome.stage, outcome.text[:5]) == (552, "mail", "5.3.4")
    assert failure_kind(outcome.code) == "5xx"
    assert not s.result.try_next_host


@pytest.mark.parametrize(
    "ehlo, expected",
    [
        (EHLO_PIPE, b"MAIL FROM:<s@here> SIZE=100 BODY=8BITMIME\r\n"),
        (EHLO_PLAIN, b"MAIL FROM:<s@here> SIZE=100\r\n"),  # not offered: not claimed
    ],
)
def test_body_8bitmime_only_when_offered(ehlo: bytes, expected: bytes) -> None:
    s = Session(body_8bit=True)
    s.server(b"220 mx\r\n")
    assert s.server(ehlo).split(b"\r\n")[0] + b"\r\n" == expected


def test_dot_stuffing_covers_first_line_and_chunk_boundaries() -> None:
    chunks = (b".first\r\nline\r\n", b".second\r\n.", b"\r\nlast")
    s = Session(chunks=chunks)
    s.server(b"220 mx\r\n")
    s.server(EHLO_PIPE)
    wrote = s.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert wrote == b"..first\r\nline\r\n..second\r\n..\r\nlast\r\n.\r\n"


@pytest.mark.parametrize("code, next_host", [(421, True), (554, False)])
def test_refused_greeting_fails_every_recipient(code: int, next_host: bool) -> None:
    s = Session()
    assert s.server(b"%d go away\r\n" % code) == b"QUIT\r\n"
    assert s.result.recipients["b@x"] == Outcome(code, "go away", "greeting")
    assert s.result.try_next_host is next_host


def test_mail_4xx_sends_us_to_the_next_host_even_when_pipelined() -> None:
    s = Session()
    s.server(b"220 mx\r\n")
    s.server(EHLO_PIPE)
    assert s.server(b"451 4.3.0 try later\r\n503 no\r\n503 no\r\n503 no\r\n") == b"QUIT\r\n"
    assert s.result.recipients["a@x"] == Outcome(451, "4.3.0 try later", "mail")
    assert s.result.try_next_host


# Replies that bring a non-pipelining session to the wait for each stage.
_TO_STAGE = [
    ("greeting", [], "greeting", True),
    ("ehlo", [b"220 mx\r\n"], "ehlo", True),
    ("mail", [b"220 mx\r\n", EHLO_PLAIN], "mail", True),
    ("rcpt", [b"220 mx\r\n", EHLO_PLAIN, b"250 ok\r\n"], "rcpt", True),
    ("data_start", [b"220 mx\r\n", EHLO_PLAIN, b"250 ok\r\n", b"250 ok\r\n"], "data", False),
    ("data_end", [b"220 mx\r\n", EHLO_PLAIN, b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"], "data", False),
]


@pytest.mark.parametrize("key, replies, stage, next_host", _TO_STAGE)
def test_timeout_at_each_stage_aborts_with_no_answer(key: str, replies: list[bytes], stage: str, next_host: bool) -> None:
    s = Session(recipients=("a@x",))
    for reply in replies:
        s.server(reply)
    s.clock.advance(DEFAULT_TIMEOUTS[key] - 1)
    assert s.results == []
    s.clock.advance(1)
    outcome = s.result.recipients["a@x"]
    assert (outcome.code, outcome.stage) == (None, stage)
    assert failure_kind(outcome.code) == "noanswer"
    assert s.result.try_next_host is next_host
    assert s.transport.disconnected  # aborted
    assert s.clock.getDelayedCalls() == []


def test_timers_are_rearmed_per_reply() -> None:
    s = Session(recipients=("a@x",))
    s.clock.advance(299)
    s.server(b"220 mx\r\n")
    s.clock.advance(299)
    assert s.results == []


def test_connection_lost_after_data_before_final_reply_is_no_answer() -> None:
    s = Session(recipients=("a@x",))
    for reply in (b"220 mx\r\n", EHLO_PLAIN, b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        s.server(reply)
    s.client.connectionLost()
    assert s.result.recipients["a@x"] == Outcome(None, "connection lost", "data")
    assert not s.result.try_next_host  # the message may have arrived: retry later, not elsewhere now
    assert s.clock.getDelayedCalls() == []


def test_quit_timeout_just_closes() -> None:
    s = Session(recipients=("a@x",))
    s.server(b"421 busy\r\n")
    s.clock.advance(DEFAULT_TIMEOUTS["quit"])
    assert s.transport.disconnecting
    s.client.connectionLost()
    assert s.result.recipients["a@x"].code == 421


def test_malformed_reply_is_no_answer() -> None:
    s = Session(recipients=("a@x",))
    s.server(b"hello there\r\n")
    assert s.result.recipients["a@x"] == Outcome(None, "peer sent a malformed reply: hello there", "greeting")
    assert s.transport.disconnected


def test_pipelined_data_accepted_with_no_recipients_gets_an_empty_message() -> None:
    s = Session(recipients=("a@x",))
    s.server(b"220 mx\r\n")
    s.server(EHLO_PIPE)
    assert s.server(b"250 ok\r\n550 no\r\n354 go\r\n") == b".\r\n"
    assert s.server(b"554 no valid recipients\r\n") == b"QUIT\r\n"
    assert s.result.recipients["a@x"] == Outcome(550, "no", "rcpt")


def test_big_content_streams_one_chunk_per_drain_and_a_stalled_peer_times_out() -> None:
    chunks = tuple(b"line %d\r\n" % i * 4000 for i in range(5))  # ~36 KiB each
    size = sum(map(len, chunks))
    s = Session(recipients=("a@x",), chunks=chunks, size=300 * 1024)
    big_ehlo = b"250-mx.remote\r\n250 PIPELINING\r\n"
    s.server(b"220 mx\r\n")
    s.server(big_ehlo)
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == b""  # nothing written before the transport asks
    producer = s.transport.producer
    assert producer is not None and not s.transport.streaming
    sent = []
    for _ in range(5):
        s.transport.clear()
        producer.resumeProducing()
        sent.append(s.transport.value())
    assert [len(x) for x in sent] == [len(c) for c in chunks]
    s.transport.clear()
    producer.resumeProducing()
    assert s.transport.value() == b".\r\n" and s.transport.producer is None
    assert sum(map(len, sent)) == size

    stalled = Session(recipients=("a@x",), chunks=chunks, size=300 * 1024)
    stalled.server(b"220 mx\r\n")
    stalled.server(big_ehlo)
    stalled.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
    stalled.transport.producer.resumeProducing()
    stalled.clock.advance(599)
    assert stalled.results == []
    stalled.clock.advance(1)
    assert stalled.result.recipients["a@x"].code is None


def test_a_kept_connection_idles_is_reused_without_ehlo_and_quits_when_idle_too_long() -> None:
    clock = task.Clock()
    client = SMTPClient("mx.local", "s@here", ["a@x"], lambda: iter([CONTENT]), 100, False, clock, keep_open=True)
    transport = StringTransport()
    client.makeConnection(transport)
    results = []
    client.done.addCallback(results.append)
    client.dataReceived(b"220 mx\r\n" + EHLO_PIPE)
    client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    transport.clear()
    client.dataReceived(b"250 2.0.0 queued\r\n")
    assert transport.value() == b"" and client.reusable and results[0].recipients["a@x"].code == 250

    again = client.reuse("t@here", ["b@x"], lambda: iter([CONTENT]), 100, False)
    assert transport.value() == b"MAIL FROM:<t@here> SIZE=100\r\nRCPT TO:<b@x>\r\nDATA\r\n"
    client.dataReceived(b"250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n")
    assert again.result.recipients["b@x"] == Outcome(550, "5.1.1 no", "rcpt")

    transport.clear()
    client.reuse("u@here", ["c@x"], lambda: iter([CONTENT]), 100, False)
    assert transport.value() == b"RSET\r\n"  # after a refused transaction
    transport.clear()
    client.dataReceived(b"250 2.0.0 reset\r\n")
    assert transport.value().startswith(b"MAIL FROM:<u@here>")
    client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    client.dataReceived(b"250 2.0.0 queued\r\n")
    transport.clear()
    clock.advance(2)
    assert transport.value() == b"QUIT\r\n" and not client.reusable


def test_a_reply_before_the_end_of_streamed_data_ends_the_connection_not_reused() -> None:
    chunks = tuple(b"x" * 60000 + b"\r\n" for _ in range(6))
    client = SMTPClient("mx.local", "s@here", ["a@x"], lambda: iter(chunks), 400 * 1024, False, task.Clock(), keep_open=True)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n")
    client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    transport.producer.resumeProducing()  # one chunk out, more to come
    client.dataReceived(b"552 5.3.4 too much\r\n")  # the server does not wait for our dot
    assert client.done.result.recipients["a@x"].code == 552
    assert not client.reusable and transport.producer is None


# --- hostile peers: what a peer can make us hold is bounded (issue 18) --------


def held(client: SMTPClient) -> int:
    """Bytes and characters of peer input the client holds right now."""
    return len(client._buffer) + sum(len(line) for line in client._lines)


def test_endless_continuation_lines_end_the_attempt_after_max_reply_lines() -> None:
    s = Session(recipients=("a@x",))
    line = b"220-" + b"x" * 100 + b"\r\n"
    for _ in range(MAX_REPLY_LINES):
        s.server(line)
    assert s.results == [] and not s.transport.disconnected
    s.server(line)
    text = f"peer sent an over-long reply (more than {MAX_REPLY_LINES} lines)"
    assert s.result == TransactionResult({"a@x": Outcome(None, text, "greeting")}, tls=False, try_next_host=True)
    assert s.transport.disconnected  # abortConnection: no QUIT, no waiting for the peer to read
    assert held(s.client) == 0
    assert s.clock.getDelayedCalls() == []


def test_megabytes_of_ehlo_lines_end_the_attempt_at_the_byte_limit() -> None:
    s = Session(recipients=("a@x",))
    s.server(b"220 mx\r\n")
    s.server(b"250-" + b"y" * 2000 + b"\r\n")  # lines of 2 KB: the bytes give out before the lines
    assert s.results == []
    s.server((b"250-" + b"y" * 2000 + b"\r\n") * 500)  # 1 MB in one read
    text = f"peer sent an over-long reply (more than {MAX_REPLY_BYTES} bytes)"
    assert s.result.recipients["a@x"] == Outcome(None, text, "ehlo")
    assert s.transport.disconnected
    assert held(s.client) == 0


def test_a_line_without_end_is_cut_off_at_the_byte_limit_counting_the_reply_so_far() -> None:
    s = Session(recipients=("a@x",))
    s.server(b"220-" + b"z" * 30000 + b"\r\n")
    s.server(b"220-" + b"z" * 30000)  # no line end yet: within the limit together
    assert s.results == []
    s.server(b"z" * 6000)
    assert s.result.recipients["a@x"].text == f"peer sent an over-long reply (more than {MAX_REPLY_BYTES} bytes)"
    assert s.transport.disconnected


def test_a_long_legitimate_reply_keeps_max_reply_text_characters() -> None:
    s = Session(recipients=("a@x",))
    s.server(b"220 mx\r\n")
    s.server(EHLO_PLAIN)
    s.server(b"250 ok\r\n")
    reply = b"".join(b"550-5.7.1 " + b"%02d" % i + b" " + b"w" * 500 + b"\r\n" for i in range(60))
    s.server(reply + b"550 5.7.1 last\r\n")
    outcome = s.result.recipients["a@x"]
    assert outcome.code == 550 and outcome.text.startswith("5.7.1 00 www")
    assert len(outcome.text) <= MAX_REPLY_TEXT
    assert held(s.client) == 0


def test_the_caps_count_per_reply_so_a_pipelined_burst_of_short_replies_passes() -> None:
    s = Session(recipients=tuple(f"r{i}@x" for i in range(150)))
    s.server(b"220 mx\r\n")
    s.server(EHLO_PIPE)
    written = s.server(b"250 ok\r\n" + b"250 ok\r\n" * 150 + b"354 go\r\n")
    assert written == CONTENT + b".\r\n"


@pytest.mark.parametrize("garbage", [b"\x1b[31mred\r\n", b"\xb2\xb2\xb2 hi\r\n", "²²² hi\r\n".encode(), b"\x00\xff\r\n"])
def test_garbage_is_a_malformed_reply_shown_printable(garbage: bytes) -> None:
    s = Session(recipients=("a@x",))
    s.server(garbage)
    text = s.result.recipients["a@x"].text
    assert text.startswith("peer sent a malformed reply: ")
    assert text.isprintable()
    assert s.transport.disconnected


def test_a_peer_fault_is_one_warning_line_and_a_timeout_is_none() -> None:
    with capturedLogs() as events:
        s = Session(recipients=("a@x",))
        s.server(b"220-\x1b[2J" + b"x" * 10 + b"\r\n")
        s.server(b"220-x\r\n" * MAX_REPLY_LINES)
    warnings = [e for e in events if e["log_level"] >= LogLevel.warn]
    assert len(warnings) == 1 and "log_failure" not in warnings[0]
    assert warnings[0]["text"] == f"peer sent an over-long reply (more than {MAX_REPLY_LINES} lines)"
    with capturedLogs() as events:
        s = Session(recipients=("a@x",))
        s.clock.advance(DEFAULT_TIMEOUTS["greeting"])
        assert s.result.recipients["a@x"].text == "timed out waiting for the greeting reply"
    assert [e for e in events if e["log_level"] >= LogLevel.warn] == []


def test_an_unsized_or_absurd_size_extension_is_ignored() -> None:
    for value in ("\u00b2", "9" * 5000, "-1", "１２"):
        s = Session(recipients=("a@x",))
        s.server(b"220 mx\r\n")
        written = s.server(f"250-mx\r\n250 SIZE {value}\r\n".encode())
        assert written == b"MAIL FROM:<s@here> SIZE=100\r\n", value


@pytest.mark.parametrize("step, chunk", [(1.0, b"2"), (10.0, b"220-slow\r\n")])
def test_the_reply_timeout_is_a_deadline_that_trickled_bytes_do_not_push_back(step: float, chunk: bytes) -> None:
    """A peer that sends a byte a second, or a continuation line every 10 s,
    within every cap, still loses the attempt at the greeting timeout."""
    s = Session(recipients=("a@x",))
    elapsed = 0.0
    while not s.results:
        s.server(chunk)
        s.clock.advance(step)
        elapsed += step
        assert elapsed <= DEFAULT_TIMEOUTS["greeting"]
    assert elapsed == DEFAULT_TIMEOUTS["greeting"]
    assert s.result.recipients["a@x"].text == "timed out waiting for the greeting reply"


replies = st.lists(
    st.one_of(
        st.binary(max_size=3000),
        st.sampled_from([b"220 mx\r\n", b"250-PIPELINING\r\n", b"250 ok\r\n", b"354 go\r\n", b"\r\n", b"550-x\n"]),
        st.integers(1, 300).map(lambda n: (b"250-" + b"e" * 996 + b"\r\n") * n),
        st.integers(1, 150).map(lambda n: b"220-a\r\n" * n),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(chunks=replies)
def test_any_bytes_from_a_peer_hold_bounded_memory_and_fire_done_once(chunks: list[bytes]) -> None:
    s = Session(recipients=("a@x", "b@x"))
    for chunk in chunks:
        s.client.dataReceived(chunk)
        assert len(s.client._buffer) + s.client._reply_bytes <= MAX_REPLY_BYTES
        assert s.client._reply_lines <= MAX_REPLY_LINES
        assert sum(len(line) + 1 for line in s.client._lines) <= MAX_REPLY_TEXT + 1
    s.client.connectionLost()
    assert len(s.results) == 1
    assert set(s.result.recipients) == {"a@x", "b@x"}
    for outcome in s.result.recipients.values():
        assert len(outcome.text) <= max(MAX_REPLY_TEXT, 200)
