"""Hostile clients against the real daemon (issue 18): a client that never
reads, a burst of connections, a byte trickler, and a fuzzed SMTP session.

Short form by default (seconds each); `STRESS=1` runs the full sizes."""

from __future__ import annotations

import re
import resource
import selectors
import socket
import ssl
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from stress_support import scale
from e2e_support import free_port, wait_for

COMMAND_TIMEOUT = 3


def log_has(daemon, pattern: str) -> bool:
    return re.search(pattern, daemon.log.read_text()) is not None


# --- (a) the client that never reads -----------------------------------------


def never_reading_client(port: int, amount: int, tls: str):
    """Connect with a tiny receive buffer, send HELP lines without ever
    reading, until `amount` bytes are sent, the daemon stops taking them for
    2 s, or it resets the connection. Returns (socket, bytes sent, reset)."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    sock = raw
    if tls == "starttls":
        raw.settimeout(10)
        raw.sendall(b"EHLO never.reads\r\nSTARTTLS\r\n")
        seen = b""
        while not seen.endswith(b"Ready to start TLS\r\n"):  # the greeting, EHLO's reply, then STARTTLS's
            byte = raw.recv(1)
            assert byte, f"closed during STARTTLS: {seen!r}"
            seen += byte
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(raw, suppress_ragged_eofs=False)  # an abort sends no close_notify
    sock.settimeout(2)
    chunk = b"HELP\r\n" * 10_000
    sent = 0
    try:
        while sent < amount:
            sock.sendall(chunk)
            sent += len(chunk)
    except (TimeoutError, socket.timeout):
        pass
    except (ConnectionResetError, BrokenPipeError):
        return sock, sent, True
    return sock, sent, False


@pytest.mark.parametrize("listener", ["relay", "starttls", "smtps"])
def test_a_client_that_never_reads_costs_bounded_memory_and_is_aborted(daemon, listener):
    """Without backpressure every 6-byte HELP read costs an 82-byte reply kept
    in memory: 3 MB of commands would hold over 40 MB."""
    smtps_port = free_port()
    d = daemon(server=f'command_timeout = {COMMAND_TIMEOUT}\nsmtps = ["tcp:{smtps_port}:interface=127.0.0.1"]')
    port = smtps_port if listener == "smtps" else d.relay_port
    time.sleep(0.5)
    before = d.memory_kb("VmHWM")
    amount = scale(3, 30) * 1024 * 1024
    started = time.monotonic()
    sock, sent, reset = never_reading_client(port, amount, tls=listener if listener != "relay" else "")
    # Give the daemon the session's whole life to read and answer what it will.
    deadline = time.monotonic() + COMMAND_TIMEOUT + 5
    while not log_has(d, r"reason=output_stuck") and time.monotonic() < deadline:
        time.sleep(0.1)
    rise_mb = (d.memory_kb("VmHWM") - before) / 1024
    print(f"{listener}: sent {sent / 1e6:.2f} MB of HELP (the kernel's socket buffers hold part of it); peak RSS rise {rise_mb:.1f} MB; reset while sending: {reset}")
    assert rise_mb < 20
    assert log_has(d, r"reason=output_stuck"), "the stuck session was not aborted"
    if not reset:
        sock.settimeout(5)
        with pytest.raises((ConnectionResetError, ssl.SSLError, BrokenPipeError)):
            while sock.recv(65536):  # an abort resets; a polite close would end in b""
                pass
            raise AssertionError("connection closed politely, not aborted")
    print(f"{listener}: aborted {time.monotonic() - started:.1f} s after connecting")
    sock.close()
    assert d.proc.poll() is None


def test_an_admin_client_that_never_reads_costs_bounded_memory(daemon):
    """twisted.web stops reading while its replies are unread; without that, 1 MB
    of pipelined `GET /metrics` would be answered with hundreds of MB."""
    admin = free_port()
    d = daemon(server=f'admin = ["tcp:{admin}:interface=127.0.0.1"]')
    time.sleep(0.5)
    before = d.memory_kb("VmHWM")
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", admin))
    sock.settimeout(2)
    sent, amount = 0, scale(1, 10) * 1024 * 1024
    try:
        while sent < amount:
            sock.sendall(request)
            sent += len(request)
    except (TimeoutError, socket.timeout):
        pass
    time.sleep(1)
    rise_mb = (d.memory_kb("VmHWM") - before) / 1024
    print(f"admin: sent {sent / 1e6:.2f} MB of GET /metrics; peak RSS rise {rise_mb:.1f} MB")
    sock.close()
    assert rise_mb < 20


# --- (b) a burst of connections ----------------------------------------------


def test_a_thousand_simultaneous_connections_are_all_greeted_within_2_seconds(daemon):
    count = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 500), hard))
    d = daemon(server="max_connections = 5000\nmax_connections_per_client = 5000")
    socks = []
    selector = selectors.DefaultSelector()
    start = time.monotonic()
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", d.relay_port))
            socks.append(sock)
            selector.register(sock, selectors.EVENT_READ)
        greeted = 0
        while greeted < count and time.monotonic() - start < 2:
            for key, _ in selector.select(timeout=0.1):
                data = key.fileobj.recv(512)
                assert data.startswith(b"220 "), data
                selector.unregister(key.fileobj)
                greeted += 1
        elapsed = time.monotonic() - start
        print(f"{greeted} of {count} connections greeted in {elapsed:.2f} s")
        assert greeted == count
    finally:
        for sock in socks:
            sock.close()


# --- (c) the byte trickler ----------------------------------------------------


def test_a_byte_trickler_is_cut_by_the_command_deadline(daemon):
    admin = free_port()
    d = daemon(server=f'command_timeout = {COMMAND_TIMEOUT}\nadmin = ["tcp:{admin}:interface=127.0.0.1"]')
    with socket.create_connection(("127.0.0.1", d.relay_port), timeout=10) as sock:
        assert sock.recv(512).startswith(b"220")
        start = time.monotonic()
        closed = b""
        for byte in b"EHLO trickle.example" * 10:
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.5)
            try:
                closed = sock.recv(512)
            except (TimeoutError, socket.timeout):
                continue
            break
        elapsed = time.monotonic() - start
    assert closed.startswith(b"421 4.4.2"), closed
    assert COMMAND_TIMEOUT - 0.5 <= elapsed <= COMMAND_TIMEOUT + 1.5
    wait_for(lambda: log_has(d, r"smtp ended: client=\[127\.0\.0\.1\]:\d+ listener=relay reason=command_timeout"), timeout=5)
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    assert 'epost_smtp_sessions_ended_total{listener="relay",reason="command_timeout"} 1.0' in scraped


def test_a_whole_line_trickler_is_cut_by_the_session_deadline(daemon):
    d = daemon(server="command_timeout = 10\nsession_deadline = 3")
    with socket.create_connection(("127.0.0.1", d.relay_port), timeout=10) as sock:
        assert sock.recv(512).startswith(b"220")
        start = time.monotonic()
        data = b""
        while b"421" not in data and time.monotonic() - start < 8:
            sock.sendall(b"NOOP\r\n")
            sock.settimeout(0.7)
            try:
                data += sock.recv(512)
            except (TimeoutError, socket.timeout):
                pass
        elapsed = time.monotonic() - start
    assert b"421 4.4.2" in data and b"session deadline exceeded" in data, data
    assert 2.5 <= elapsed <= 4.5
    wait_for(lambda: log_has(d, r"reason=deadline"), timeout=5)


# --- (d) fuzzed sessions -------------------------------------------------------

COMMANDS = [
    b"EHLO fuzz.example", b"HELO fuzz.example", b"EHLO", b"NOOP", b"RSET", b"RSET x", b"VRFY alice", b"VRFY",
    b"HELP", b"MAIL FROM:<a@example.org>", b"MAIL FROM:<>", b"MAIL FROM:<a@example.org> SIZE=10",
    b"MAIL FROM:<a@example.org> SIZE=999999999999", b"MAIL FROM:<a@example.org> FOO=BAR", b"MAIL FROM:bad",
    b"MAIL FROM:<a@@b>", b"RCPT TO:<alice@example.test>", b"RCPT TO:<bob@example.test>",
    b"RCPT TO:<nobody@example.test>", b"RCPT TO:<x@elsewhere.example>", b"RCPT TO:<a%b@example.test>",
    b"RCPT TO:<@x:alice@example.test>", b"RCPT TO:<alice@example.test> NOTIFY=NEVER", b"AUTH PLAIN AAAA",
    b"AUTH", b"BDAT 10", b"XYZZY", b"", b"mail from:<a@example.org>", b"\xff\xfe", b"DATA x",
]
LINE = st.one_of(
    st.sampled_from(COMMANDS),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
BODY = st.lists(
    st.one_of(
        st.sampled_from([b"Subject: fuzz\r\n", b"\r\n", b".\r\n.x\r\n", b"..\r\n", b"line\nbare LF\r\n", b"bare CR\r\r\n", b"x" * 1200 + b"\r\n"]),
        st.binary(max_size=200),
    ),
    max_size=8,
).map(b"".join)


class Session:
    """A raw connection that counts final replies (a line `NNN ` ends one)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.pending = b""
        self.closed = False
        self.replies: list[bytes] = []
        assert self.expect(1)[0].startswith(b"220 ")

    def send(self, data: bytes, pieces: list[int] = ()) -> None:
        cuts = sorted({p % (len(data) + 1) for p in pieces}) if data else []
        start = 0
        try:
            for cut in [*cuts, len(data)]:
                if cut > start:
                    self.sock.sendall(data[start:cut])
                    start = cut
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def expect(self, count: int) -> list[bytes]:
        """The next `count` final replies; fewer only if the server hung up after a 421 or 221."""
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(got) < count:
            while b"\r\n" in self.pending and len(got) < count:
                line, self.pending = self.pending.split(b"\r\n", 1)
                if len(line) >= 4 and line[3:4] == b" ":
                    got.append(line)
            if len(got) >= count:
                break
            if self.closed:
                assert got and got[-1][:3] in (b"421", b"221"), f"server hung up without 421/221 after {got!r}"
                return got
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no reply within 5 s (got {got!r} of {count})"
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
            self.pending += chunk
        self.replies += got
        if got and got[-1][:3] in (b"421", b"221"):
            self.closed = True
        return got

    def close(self) -> None:
        self.sock.close()


def make_machine(port: int):
    class SMTPFuzz(RuleBasedStateMachine):
        """Every line sent gets its reply; the daemon answers whatever comes."""

        def __init__(self):
            super().__init__()
            self.session = None
            self.in_data = False

        @initialize()
        def connect(self):
            self.session = Session(port)

        def _reconnect_if_closed(self):
            if self.session.closed:
                self.session.close()
                self.session = Session(port)
                self.in_data = False

        @precondition(lambda self: not self.in_data)
        @rule(lines=st.lists(LINE, min_size=1, max_size=6), pieces=st.lists(st.integers(0, 10_000), max_size=4))
        def pipelined_commands(self, lines, pieces):
            self.session.send(b"".join(line + b"\r\n" for line in lines), pieces)
            self.session.expect(len(lines))
            self._reconnect_if_closed()

        @precondition(lambda self: not self.in_data)
        @rule(before=st.sampled_from([b"NOOP", b"RSET", b"MAIL FROM:<a@example.org>"]), separator=st.sampled_from([b"\n", b"\r", b"\n.\n", b"\r.\r"]))
        def bare_newline_in_a_command(self, before, separator):
            self.session.send(before + separator + b"RCPT TO:<alice@example.test>\r\n")
            reply = self.session.expect(1)
            assert reply[0][:3] in (b"500", b"421"), reply
            self._reconnect_if_closed()

        @precondition(lambda self: not self.in_data)
        @rule(length=st.integers(999, 5000))
        def long_line(self, length):
            self.session.send(b"NOOP " + b"x" * length + b"\r\n")
            reply = self.session.expect(1)
            assert reply[0][:3] in (b"500", b"421"), reply
            self._reconnect_if_closed()

        @precondition(lambda self: not self.in_data)
        @rule(recipients=st.lists(st.sampled_from([b"alice@example.test", b"bob@example.test", b"nobody@example.test"]), min_size=1, max_size=3))
        def start_a_message(self, recipients):
            lines = [b"EHLO fuzz.example", b"RSET", b"MAIL FROM:<f@example.org>", *(b"RCPT TO:<" + r + b">" for r in recipients), b"DATA"]
            self.session.send(b"".join(line + b"\r\n" for line in lines))
            got = self.session.expect(len(lines))
            if not self.session.closed and got[-1].startswith(b"354 "):
                self.in_data = True
            self._reconnect_if_closed()

        @precondition(lambda self: self.in_data)
        @rule(body=BODY, pieces=st.lists(st.integers(0, 10_000), max_size=4))
        def message_body(self, body, pieces):
            """Whole lines, dot-stuffed (RFC 5321 §4.5.2): never CRLF.CRLF by accident."""
            if not body.endswith(b"\r\n"):
                body += b"\r\n"
            body = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in body.split(b"\r\n"))
            self.session.send(body, pieces)

        @precondition(lambda self: self.in_data)
        @rule(pieces=st.lists(st.integers(0, 5), max_size=3))
        def end_of_message(self, pieces):
            self.session.send(b".\r\n", pieces)
            reply = self.session.expect(1)
            assert reply[0][:1] in (b"2", b"4", b"5"), reply
            self.in_data = False
            self._reconnect_if_closed()

        @invariant()
        def no_reply_is_malformed(self):
            if self.session is not None:
                for line in self.session.replies:
                    assert re.fullmatch(rb"[2-5][0-9][0-9] .*", line), line

        def teardown(self):
            if self.session is not None:
                if self.in_data and not self.session.closed:
                    self.session.send(b"\r\n.\r\n")
                    self.session.expect(1)
                self.session.close()

    return SMTPFuzz


def test_fuzzed_sessions_get_a_reply_for_every_line_and_never_break_the_daemon(daemon):
    d = daemon(server="max_bad_commands = 1000")
    machine = make_machine(d.relay_port)
    start = time.monotonic()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=scale(200, 2200),
            stateful_step_count=scale(30, 50),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=False,
        ),
    )
    print(f"fuzz: {time.monotonic() - start:.1f} s")
    assert d.proc.poll() is None, "the daemon died"
    assert "Traceback" not in d.log.read_text()
