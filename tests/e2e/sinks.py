"""SMTP sink servers on loopback for the delivery end-to-end tests.

A `Sink` runs a small threaded SMTP server and records what it is sent:

    with Sink() as sink:                        # 250 to everything
    with Sink(greylist=2) as sink:              # 451 4.7.1 to a recipient's first 2 RCPTs, then 250
    with Sink(greylist=1, only={"b@x.test"}):   # ... for those recipients only
    with Sink(reject=True) as sink:             # 550 5.1.1 at RCPT
    with Sink(greeting=None) as sink:           # accepts the connection, never greets
    with Sink(greeting="421 4.3.2 busy"):       # refuses at the greeting
    closed_port()                               # a port where nothing listens (connection refused)
    with HostileSink("greeting") as peer:       # endless `220-` continuation lines, never a last line
    with HostileSink("ehlo", megabytes=10):     # a normal 220, then 10 MB of `250-` lines to EHLO

Each received message is a `Received(sender, recipients, data)`, `data` being
the DATA bytes un-dot-stuffed, CRLF line ends kept, without the final `.` line.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: tuple[str, ...]
    data: bytes


def closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now: connecting to it is refused."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _address(argument: bytes) -> str:
    """`FROM:<a@b> SIZE=1` -> `a@b`."""
    text = argument.decode("ascii", "replace")
    start, end = text.find("<"), text.find(">")
    return text[start + 1 : end] if 0 <= start < end else text.partition(":")[2].strip()


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        sink = self.server.sink
        sink._connected(self.request)
        try:
            if sink.greeting is None:  # hold the connection open, silent, until the client or the sink ends it
                while not sink._stopping.is_set() and self.request.recv(4096):
                    pass
                return
            self.reply(sink.greeting)
            if not sink.greeting.startswith("220"):
                return
            self.session(sink)
        except OSError:
            pass
        finally:
            sink._disconnected(self.request)

    def session(self, sink: Sink) -> None:
        sender, recipients = None, []
        while line := self.rfile.readline():
            verb, _, argument = line.rstrip(b"\r\n").partition(b" ")
            verb = verb.upper()
            if verb in (b"EHLO", b"HELO"):
                self.reply("250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME" if verb == b"EHLO" else "250 sink.test")
            elif verb == b"MAIL":
                sender, recipients = _address(argument), []
                self.reply("250 2.1.0 Ok")
            elif verb == b"RCPT":
                recipient = _address(argument)
                code = sink._rcpt(recipient)
                if code == 250:
                    recipients.append(recipient)
                self.reply({250: "250 2.1.5 Ok", 451: "451 4.7.1 greylisted, try again later",
                            550: "550 5.1.1 User unknown"}[code])
            elif verb == b"DATA":
                if sender is None or not recipients:
                    self.reply("554 5.5.1 No valid recipients")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self.read_data()
                if data is None:
                    return
                sink._received(Received(sender, tuple(recipients), data))
                self.reply("250 2.0.0 Ok: queued")
                sender, recipients = None, []
            elif verb == b"RSET":
                sender, recipients = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == b"NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Command not recognised")

    def read_data(self) -> bytes | None:
        lines = []
        while line := self.rfile.readline():
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)
        return None  # the connection ended inside DATA


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], sink: Sink) -> None:
        self.sink = sink
        super().__init__(address, _Handler)


class Sink:
    """A threaded SMTP sink on `host:port` (port 0: a free one); a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, greeting: str | None = "220 sink.test ESMTP",
                 greylist: int = 0, only: set[str] | None = None, reject: bool = False) -> None:
        self.greeting, self.greylist, self.only, self.reject = greeting, greylist, only, reject
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._messages: list[Received] = []
        self._rcpts: dict[str, int] = {}
        self._connections = 0
        self._open: set[socket.socket] = set()
        self._server = _Server((host, port), self)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> Sink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- called by the handler threads -----------------------------------

    def _connected(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections += 1
            self._open.add(sock)

    def _disconnected(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def _rcpt(self, recipient: str) -> int:
        with self._lock:
            count = self._rcpts[recipient] = self._rcpts.get(recipient, 0) + 1
        if self.reject:
            return 550
        if count <= self.greylist and (self.only is None or recipient in self.only):
            return 451
        return 250

    def _received(self, message: Received) -> None:
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()

    # -- for the tests -----------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def rcpt_count(self, recipient: str | None = None) -> int:
        """RCPT commands seen for `recipient` (for every recipient when None)."""
        with self._lock:
            return sum(self._rcpts.values()) if recipient is None else self._rcpts.get(recipient, 0)

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The messages once at least `count` have arrived; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sink got {len(self._messages)} of {count} messages within {timeout}s")
                self._lock.wait(left)
            return list(self._messages)


class _HostileHandler(socketserver.BaseRequestHandler):
    server: _HostileServer

    def handle(self) -> None:
        peer = self.server.peer
        peer._connected(self.request)
        try:
            peer._stopping.wait(peer.hold)
            if peer.mode == "ehlo":
                self.request.sendall(b"220 hostile.test ESMTP\r\n")
                if not self.request.recv(4096):
                    return
            code = b"220-" if peer.mode == "greeting" else b"250-"
            chunk = (code + b"x" * (peer.line_length - 6) + b"\r\n") * 64
            budget = peer.megabytes * 1024 * 1024 if peer.megabytes else None
            while not peer._stopping.is_set() and (budget is None or budget > 0):
                self.request.sendall(chunk)  # blocks while the client does not read
                if budget is not None:
                    budget -= len(chunk)
            if budget is not None:
                self.request.sendall(b"250 PIPELINING\r\n")
                while self.request.recv(4096):
                    pass
        except OSError:
            pass
        finally:
            peer._disconnected(self.request)


class _HostileServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], peer: HostileSink) -> None:
        self.peer = peer
        super().__init__(address, _HostileHandler)


class HostileSink(Sink):
    """A peer that never ends its reply: `greeting` streams `220-` lines of
    `line_length` bytes until the client goes; `ehlo` greets normally, then
    answers EHLO with `megabytes` of `250-` lines (endless when 0) and a
    last `250` line. It counts connections like a Sink; it receives nothing.
    `hold` seconds of silence after accepting make attempts overlap however
    fast the client gives up on the stream."""

    def __init__(self, mode: str = "greeting", host: str = "127.0.0.1", port: int = 0,
                 line_length: int = 1000, megabytes: int = 0, hold: float = 0.0) -> None:
        if mode not in ("greeting", "ehlo"):
            raise ValueError(mode)
        self.mode, self.line_length, self.megabytes, self.hold = mode, line_length, megabytes, hold
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._messages = []
        self._rcpts = {}
        self._connections = 0
        self._open = set()
        self.most_at_once = 0  # the most connections open together
        self._server = _HostileServer((host, port), self)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _connected(self, sock: socket.socket) -> None:
        super()._connected(sock)
        with self._lock:
            self.most_at_once = max(self.most_at_once, len(self._open))


class _UserHandler(_Handler):
    """An internal mail server that knows its users; `sink.rcpt_mode` says how it answers RCPT."""

    server: _Server

    def handle(self) -> None:
        sink = self.server.sink
        sink._connected(self.request)
        try:
            self.reply(sink.greeting)
            self.session(sink)
        except OSError:
            pass
        finally:
            sink._disconnected(self.request)

    def session(self, sink: UserSink) -> None:
        sender, recipients = None, []
        while line := self.rfile.readline():
            verb, _, argument = line.rstrip(b"\r\n").partition(b" ")
            verb = verb.upper()
            if verb in (b"EHLO", b"HELO"):
                self.reply("250-inside.test\r\n250-PIPELINING\r\n250 8BITMIME" if verb == b"EHLO" else "250 inside.test")
            elif verb == b"MAIL":
                sender, recipients = _address(argument), []
                if sender == "":
                    sink._probe_session(self.request)
                self.reply("250 2.1.0 Ok")
            elif verb == b"RCPT":
                recipient = _address(argument)
                sink._count_rcpt(recipient, probe=sender == "")
                mode = sink.rcpt_mode
                if mode == "mute":  # greets, then never answers RCPT
                    while not sink._stopping.is_set() and self.request.recv(4096):
                        pass
                    return
                if mode == "garbage":
                    self.wfile.write(b"HELLO? \x00\xff garbage\r\n")
                    continue
                if mode == "close":
                    return
                if mode == "slow":
                    time.sleep(sink.delay)
                if recipient.lower() in sink.users:
                    recipients.append(recipient)
                    self.reply("250 2.1.5 Ok")
                else:
                    self.reply(f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown in local recipient table")
            elif verb == b"DATA":
                if sender is None or not recipients:
                    self.reply("554 5.5.1 No valid recipients")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self.read_data()
                if data is None:
                    return
                sink._received(Received(sender, tuple(recipients), data))
                self.reply("250 2.0.0 Ok: queued")
                sender, recipients = None, []
            elif verb == b"RSET":
                sender, recipients = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == b"QUIT":
                # Over before the 221: the client may open its next session as soon as it
                # reads it, before this thread gets to run again (the test counts sessions).
                sink._disconnected(self.request)
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Command not recognised")


class _UserServer(_Server):
    def __init__(self, address: tuple[str, int], sink: Sink) -> None:
        self.sink = sink
        socketserver.ThreadingTCPServer.__init__(self, address, _UserHandler)


class UserSink(Sink):
    """An internal server for recipient verification tests: RCPT to one of
    `users` gets 250, anything else `550 5.1.1`. `rcpt_mode`: "answer"
    (normal), "slow" (answers after `delay` seconds), "mute" (never answers
    RCPT), "garbage" (a line that is not a reply), "close" (hangs up).
    `probe_rcpts` counts RCPTs sent with `MAIL FROM:<>`; `most_at_once`
    the most connections open together."""

    def __init__(self, users: set[str], host: str = "127.0.0.1", port: int = 0, rcpt_mode: str = "answer",
                 delay: float = 0.0, greeting: str = "220 inside.test ESMTP") -> None:
        self.users = {u.lower() for u in users}
        self.rcpt_mode, self.delay, self.greeting = rcpt_mode, delay, greeting
        self.greylist, self.only, self.reject = 0, None, False
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._messages = []
        self._rcpts = {}
        self.probe_rcpts: dict[str, int] = {}
        self._connections = 0
        self._open = set()
        self.most_at_once = 0
        self._probing: set[socket.socket] = set()
        self.most_probes_at_once = 0  # sessions that sent MAIL FROM:<>, open together
        self._server = _UserServer((host, port), self)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _connected(self, sock: socket.socket) -> None:
        super()._connected(sock)
        with self._lock:
            self.most_at_once = max(self.most_at_once, len(self._open))

    def _probe_session(self, sock: socket.socket) -> None:
        with self._lock:
            self._probing.add(sock)
            self.most_probes_at_once = max(self.most_probes_at_once, len(self._probing))

    def _disconnected(self, sock: socket.socket) -> None:
        super()._disconnected(sock)
        with self._lock:
            self._probing.discard(sock)

    def _count_rcpt(self, recipient: str, probe: bool) -> None:
        with self._lock:
            self._rcpts[recipient] = self._rcpts.get(recipient, 0) + 1
            if probe:
                self.probe_rcpts[recipient] = self.probe_rcpts.get(recipient, 0) + 1

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)
