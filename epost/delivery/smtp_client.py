"""The outbound ESMTP client protocol: one connection, one transaction.

Written fresh rather than reusing `twisted.mail.smtp.ESMTPClient` (research
notes §2): that one has no plaintext fallback when STARTTLS is refused,
stuffs dots wrongly, never sends SIZE= or BODY=, and errbacks with only the
last RCPT code. Choosing hosts and connecting belong to the caller.

Promises kept here:
- `done` fires exactly once with a `TransactionResult` holding an `Outcome`
  for every recipient; it never errbacks for SMTP or network failures;
- code None means no answer (timeout, dropped connection, protocol error);
- replies are matched to commands strictly in order, pipelined or not; bytes
  that arrive behind the 220 to STARTTLS are dropped (response injection);
- what a peer can make us hold is bounded: a reply of more than
  MAX_REPLY_LINES lines or MAX_REPLY_BYTES bytes (the line not yet ended
  included) ends the attempt as no answer and aborts the connection, of a
  reply's text only MAX_REPLY_TEXT characters are kept, and each awaited
  reply has a deadline that bytes arriving do not push back;
- content goes out through `DotStuffer` only after a 354 and only when at
  least one recipient was accepted.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTime, ITLSTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epost.delivery.stuffing import DotStuffer
from epost.logs import printable

log = Logger()

STREAM_ABOVE = 256 * 1024  # bytes; bigger messages are sent through a producer

# RFC 5321 §4.5.3.2 timeouts, in seconds, keyed by the reply awaited.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "greeting": 300,
    "ehlo": 300,
    "starttls": 300,
    "mail": 300,
    "rcpt": 300,
    "data_start": 120,
    "data_end": 600,
    "rset": 300,
    "quit": 60,
}
_OUTCOME_STAGE = {"data_start": "data", "data_end": "data", "rset": "mail"}
KEEP_IDLE = 2.0  # seconds an idle connection waits for its next transaction (Postfix: 2 s)
# What a peer may send as one reply before we hang up. RFC 5321 §4.5.3.1.5
# allows 512 octets a line; real multi-line replies (EHLO, a rejection with a
# help URL) are 5-20 lines of under 100 octets. 100 lines of 512 octets fit in
# 64 KiB with room to spare; more is not a mail server's reply.
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024  # line ends and the line not yet ended included
# Of a reply's text we keep this much, as Postfix keeps `line_length_limit`
# (2048) bytes of it: enough for any real reply, EHLO's extensions included.
MAX_REPLY_TEXT = 2048
_SIZE_VALUE = re.compile(r"[0-9]{1,18}")

Handler = Callable[[int, str], None]


@dataclass(frozen=True)
class Outcome:
    """One recipient's result: the reply code (None: no answer), its text
    (enhanced code first when the server sent one) and the stage that gave it:
    greeting, ehlo, helo, starttls, mail, rcpt, data or connect."""

    code: int | None
    text: str
    stage: str


@dataclass(frozen=True)
class TransactionResult:
    """What one session achieved.

    `try_next_host`: nothing was accepted and the failure was temporary or
    no answer (4xx greeting/EHLO/HELO/MAIL, timeout, dropped connection), so
    the caller should try the next MX for recipients without a final answer.
    `tls_failed`: the connection died during or right after the TLS
    handshake; the caller may retry this host in plaintext."""

    recipients: dict[str, Outcome]
    tls: bool
    try_next_host: bool
    tls_failed: bool = False


def parse_extensions(text: str) -> dict[str, str]:
    """EHLO reply text (lines after the first) -> {KEYWORD: parameters}."""
    extensions = {}
    for line in text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def size_limit(extensions: dict[str, str]) -> int | None:
    """The server's fixed SIZE limit; None when absent or 0 (no limit)."""
    value = extensions.get("SIZE", "")
    return int(value) if _SIZE_VALUE.fullmatch(value) and int(value) > 0 else None


class SMTPClient(Protocol):
    """Delivers one message to `recipients` over one connection."""

    def __init__(
        self,
        hostname: str,
        sender: str,
        recipients: list[str],
        content: Callable[[], Iterable[bytes]],
        size: int,
        body_8bit: bool,
        clock: IReactorTime,
        tls_context: object | None = None,
        timeouts: dict[str, float] | None = None,
        keep_open: bool = False,
    ) -> None:
        """`keep_open`: after the transaction the connection stays open, idle,
        for `reuse` (a connection cache); it QUITs after KEEP_IDLE seconds."""
        self.hostname = hostname
        self.keep_open = keep_open
        self.idle = False
        self.idle_ended: Callable[[SMTPClient], None] | None = None  # told when an idle connection goes
        self._needs_rset = False
        self._streaming = False  # a content producer is registered
        self.sender = sender
        self.recipients = list(recipients)
        self.content = content
        self.size = size
        self.body_8bit = body_8bit
        self.clock = clock
        self.tls_context = tls_context
        self.timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        self.done: defer.Deferred[TransactionResult] = defer.Deferred()
        self._buffer = b""  # received, not yet a whole line
        self._lines: list[str] = []  # the reply so far, MAX_REPLY_TEXT characters at most
        self._kept = 0  # characters in _lines
        self._reply_lines = 0  # lines of the reply so far, kept or not
        self._reply_bytes = 0
        self._drop_buffered = False  # set by a handler: what was received behind its reply is void
        self._expect: deque[tuple[str, Handler]] = deque()
        self._timer: IDelayedCall | None = None
        self._closed = False
        self._extensions: dict[str, str] = {}
        self._tls = False
        self._tls_pending = False  # startTLS called, no reply over TLS yet
        self._pipelining = False
        self._mail_failed = False
        self._next_host = False
        self._accepted: list[str] = []
        self._outcomes: dict[str, Outcome] = {}

    # --- Twisted hooks -------------------------------------------------

    def connectionMade(self) -> None:
        self._await("greeting", self._on_greeting)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        buffer = self._buffer + data if self._buffer else data
        start = 0
        while not self._closed:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            self._reply_lines += 1
            self._reply_bytes += len(line) + 1
            if self._reply_lines > MAX_REPLY_LINES:
                self._abort(f"peer sent an over-long reply (more than {MAX_REPLY_LINES} lines)", peer_fault=True)
                return
            if self._reply_bytes > MAX_REPLY_BYTES:
                self._abort(f"peer sent an over-long reply (more than {MAX_REPLY_BYTES} bytes)", peer_fault=True)
                return
            if line.endswith(b"\r"):
                line = line[:-1]
            code, mark = line[:3], line[3:4]
            if not (len(code) == 3 and code.isdigit() and mark in (b"", b" ", b"-")):  # ASCII digits only
                shown = printable(line[:100].decode("utf-8", "replace"))
                self._abort(f"peer sent a malformed reply: {shown}", peer_fault=True)
                return
            if self._kept < MAX_REPLY_TEXT:
                text = line[4 : 4 + MAX_REPLY_TEXT - self._kept].decode("utf-8", "replace")
                self._lines.append(text)
                self._kept += len(text) + 1
            if mark != b"-":
                reply = "\n".join(self._lines)
                self._lines, self._kept, self._reply_lines, self._reply_bytes = [], 0, 0, 0
                self._on_reply(int(code), reply)
                if self._drop_buffered:
                    self._drop_buffered = False
                    buffer, start = b"", 0
        if self._closed:
            return
        self._buffer = buffer[start:]
        if self._reply_bytes + len(self._buffer) > MAX_REPLY_BYTES:
            self._abort(f"peer sent an over-long reply (more than {MAX_REPLY_BYTES} bytes)", peer_fault=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._closed:
            self._closed = True
            self._give_up(self._stage(), None, "connection lost", next_host=True)
        self._cancel_timer()
        self._forget_input()

    def _forget_input(self) -> None:
        self._buffer, self._lines, self._kept, self._reply_lines, self._reply_bytes = b"", [], 0, 0, 0

    # --- reply plumbing ------------------------------------------------

    def _on_reply(self, code: int, text: str) -> None:
        if not self._expect:
            self._abort(f"peer sent an unexpected reply {code}", peer_fault=True)
            return
        key, handler = self._expect[0]
        if code // 100 not in (2, 4, 5) and not (code == 354 and key == "data_start"):
            self._abort(f"peer sent an unexpected reply {code} to {key}", peer_fault=True)
            return
        self._expect.popleft()
        handler(code, text)
        self._rearm()

    def _send(self, *commands: tuple[str, str, Handler]) -> None:
        """Write (command, awaited-reply key, handler) in one write."""
        self.transport.write(b"".join(c.encode("utf-8") + b"\r\n" for c, _, _ in commands))
        for _, key, handler in commands:
            self._await(key, handler)

    def _await(self, key: str, handler: Handler) -> None:
        self._expect.append((key, handler))
        if len(self._expect) == 1:
            self._rearm()

    def _rearm(self) -> None:
        if self.idle:
            return  # the idle timer runs
        self._cancel_timer()
        if self._expect and not self._closed:
            key = self._expect[0][0]
            self._timer = self.clock.callLater(self._timeout_for(key), self._on_timeout, key)

    def _timeout_for(self, key: str) -> float:
        """Seconds to wait for the reply `key` names (ProbeClient caps it at its deadline)."""
        return self.timeouts[key]

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _on_timeout(self, key: str) -> None:
        self._timer = None
        if self.done.called:  # only QUIT was outstanding
            self._closed = True
            self.transport.loseConnection()
        else:
            self._abort(f"timed out waiting for the {key} reply")

    def _stage(self) -> str:
        key = self._expect[0][0] if self._expect else "connect"
        return _OUTCOME_STAGE.get(key, key)

    # --- endings ---------------------------------------------------------

    def _give_up(self, stage: str, code: int | None, text: str, next_host: bool) -> None:
        """Every recipient without a final answer gets this one; fire `done`."""
        for recipient in self.recipients:
            self._outcomes.setdefault(recipient, Outcome(code, text, stage))
        self._fire(next_host)

    def _fire(self, next_host: bool) -> None:
        if self.done.called:
            return
        result = TransactionResult(
            recipients={r: self._outcomes[r] for r in self.recipients},
            tls=self._tls,
            try_next_host=next_host and not self._accepted,
            tls_failed=self._tls_pending,
        )
        self.done.callback(result)

    def _quit(self) -> None:
        self._expect.clear()
        self._send(("QUIT", "quit", lambda code, text: self._close()))

    def _close(self) -> None:
        self._closed = True
        self.transport.loseConnection()

    def _abort(self, text: str, peer_fault: bool = False) -> None:
        """No usable answer: drop the connection, report no answer.
        `peer_fault`: the peer broke the protocol, which is worth one warning line."""
        if peer_fault and not self._closed:
            log.warn("SMTP peer {peer}: {text}; connection aborted", peer=self._peer(), text=text)
        self._give_up(self._stage(), None, text, next_host=True)
        self._closed = True
        self._expect.clear()
        self._cancel_timer()
        self._forget_input()
        self.transport.abortConnection()

    def _peer(self) -> str:
        address = self.transport.getPeer()
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        return f"[{host}]:{port}" if host is not None else str(address)

    # --- the dialogue ----------------------------------------------------

    def _on_greeting(self, code: int, text: str) -> None:
        if code == 220:
            self._send((f"EHLO {self.hostname}", "ehlo", self._on_ehlo))
        else:
            self._fail("greeting", code, text)

    def _fail(self, stage: str, code: int, text: str) -> None:
        """A refusal for the whole transaction; 4xx sends us to the next MX."""
        self._give_up(stage, code, text, next_host=code // 100 == 4)
        self._quit()

    def _on_ehlo(self, code: int, text: str) -> None:
        if self._tls_pending:
            self._tls_pending, self._tls = False, True
        if code // 100 == 2:
            self._extensions = parse_extensions(text)
            if self._can_starttls():
                self._send(("STARTTLS", "starttls", self._on_starttls))
            else:
                self._start_transaction()
        elif code // 100 == 5:
            self._send((f"HELO {self.hostname}", "ehlo", self._on_helo))
        else:
            self._fail("ehlo", code, text)

    def _on_helo(self, code: int, text: str) -> None:
        if code // 100 == 2:
            self._extensions = {}
            self._start_transaction()
        else:
            self._fail("helo", code, text)

    def _can_starttls(self) -> bool:
        return (
            not self._tls
            and self.tls_context is not None
            and "STARTTLS" in self._extensions
            and ITLSTransport.providedBy(self.transport)
        )

    def _on_starttls(self, code: int, text: str) -> None:
        if code != 220:  # refused: carry on in plaintext on this connection
            self._start_transaction()
            return
        self._forget_input()  # anything sent before the handshake is injected
        self._drop_buffered = True
        self.transport.startTLS(self.tls_context)
        self._tls_pending = True
        self._send((f"EHLO {self.hostname}", "ehlo", self._on_ehlo))

    def _start_transaction(self) -> None:
        limit = size_limit(self._extensions)
        if limit is not None and self.size > limit:
            text = f"5.3.4 Message size {self.size} exceeds the server's limit of {limit}"
            self._fail("mail", 552, text)
            return
        mail = f"MAIL FROM:<{self.sender}>"
        if "SIZE" in self._extensions:
            mail += f" SIZE={self.size}"
        if self.body_8bit and "8BITMIME" in self._extensions:
            mail += " BODY=8BITMIME"
        self._pipelining = "PIPELINING" in self._extensions
        if self._pipelining:
            rcpts = [self._rcpt_command(r) for r in self.recipients]
            self._send((mail, "mail", self._on_mail), *rcpts, ("DATA", "data_start", self._on_data))
        else:
            self._send((mail, "mail", self._on_mail))

    def _rcpt_command(self, recipient: str) -> tuple[str, str, Handler]:
        return (f"RCPT TO:<{recipient}>", "rcpt", partial(self._on_rcpt, recipient))

    def _on_mail(self, code: int, text: str) -> None:
        if code // 100 == 2:
            if not self._pipelining:
                self._send(self._rcpt_command(self.recipients[0]))
            return
        self._mail_failed = True
        self._next_host = code // 100 == 4
        for recipient in self.recipients:
            self._outcomes[recipient] = Outcome(code, text, "mail")
        if not self._pipelining:
            self._fail("mail", code, text)
        # pipelined: the RCPT and DATA replies are still to come

    def _on_rcpt(self, recipient: str, code: int, text: str) -> None:
        if self._mail_failed:
            return
        if code // 100 == 2:
            self._accepted.append(recipient)
        else:
            self._outcomes[recipient] = Outcome(code, text, "rcpt")
        if self._pipelining:
            return
        index = self.recipients.index(recipient) + 1
        if index < len(self.recipients):
            self._send(self._rcpt_command(self.recipients[index]))
        elif self._accepted:
            self._send(("DATA", "data_start", self._on_data))
        else:
            self._finish(clean=False)

    def _on_data(self, code: int, text: str) -> None:
        if code == 354 and self._accepted:
            self._send_content()
        elif code == 354:  # pipelined, nothing accepted, server erred: send an empty message (RFC 2920 §3.1)
            self.transport.write(b".\r\n")
            self._await("data_end", lambda code, text: self._finish(clean=False))
        elif code // 100 == 2:
            self._abort(f"peer sent a {code} reply to DATA", peer_fault=True)
        else:
            for recipient in self._accepted:
                self._outcomes[recipient] = Outcome(code, text, "data")
            self._finish(clean=False)

    def _send_content(self) -> None:
        """Small messages go out in one go; bigger ones through a pull producer,
        so a 25 MB message never sits whole in the transport's buffer."""
        stuffer = DotStuffer()
        if self.size > STREAM_ABOVE:
            self._await("data_end", self._on_data_end)
            self._streaming = True
            self.transport.registerProducer(_ContentProducer(self, iter(self.content()), stuffer), False)
            return
        for chunk in self.content():
            if self._closed:
                return
            stuffed = stuffer.feed(chunk)
            if stuffed:
                self.transport.write(stuffed)
        self.transport.write(stuffer.end())
        self._await("data_end", self._on_data_end)

    def _on_data_end(self, code: int, text: str) -> None:
        for recipient in self._accepted:
            self._outcomes[recipient] = Outcome(code, text, "data")
        self._finish()

    def _finish(self, clean: bool = True) -> None:
        """The transaction is over; `clean`: the server is ready for the next MAIL without RSET."""
        if self._streaming:  # the server answered before our final dot: not a state to reuse
            self._streaming = False
            self.transport.unregisterProducer()
            self._fire(self._next_host)
            self._abort("reply before the end of the data")
            return
        if self.keep_open and not self._closed:
            # Idle before `done` fires: its callbacks may reuse us at once.
            self._needs_rset = not clean
            self.idle = True
            self._expect.clear()
            self._cancel_timer()
            self._timer = self.clock.callLater(KEEP_IDLE, self._idle_expired)
            self._fire(self._next_host)
        else:
            self._fire(self._next_host)
            self._quit()

    def _idle_expired(self) -> None:
        self._timer = None
        self.close_idle()

    def close_idle(self) -> None:
        """QUIT an idle connection (expiry, or the cache has no room for it)."""
        if self.reusable:
            self._cancel_timer()
            self.idle = False
            self._quit()
            if self.idle_ended is not None:
                self.idle_ended(self)

    @property
    def reusable(self) -> bool:
        return self.idle and not self._closed

    def reuse(
        self, sender: str, recipients: list[str], content: Callable[[], Iterable[bytes]], size: int, body_8bit: bool
    ) -> defer.Deferred[TransactionResult]:
        """The next transaction on this idle connection; same promises as the first."""
        if not self.reusable:
            raise RuntimeError("connection is not idle")
        self._cancel_timer()
        self.idle = False
        self.sender, self.recipients, self.content = sender, list(recipients), content
        self.size, self.body_8bit = size, body_8bit
        self.done = defer.Deferred()
        self._mail_failed = self._next_host = False
        self._accepted, self._outcomes = [], {}
        if self._needs_rset:
            self._needs_rset = False
            self._send(("RSET", "rset", self._on_rset))
        else:
            self._start_transaction()
        return self.done

    def _on_rset(self, code: int, text: str) -> None:
        if code // 100 == 2:
            self._start_transaction()
        else:
            self._fail("mail", code, text)


@implementer(IPullProducer)
class _ContentProducer:
    """Feeds one chunk per call as the transport drains; each chunk restarts the
    data_end timer, so a peer that stops reading times out like a silent one."""

    def __init__(self, client: SMTPClient, chunks: Iterator[bytes], stuffer: DotStuffer) -> None:
        self.client = client
        self.chunks = chunks
        self.stuffer = stuffer

    def resumeProducing(self) -> None:
        transport = self.client.transport
        if self.client._closed or not self.client._streaming:
            return
        for chunk in self.chunks:
            stuffed = self.stuffer.feed(chunk)
            if stuffed:
                transport.write(stuffed)
                self.client._rearm()
                return
        self.client._streaming = False
        transport.unregisterProducer()
        transport.write(self.stuffer.end())

    def stopProducing(self) -> None:
        self.chunks = iter(())
