"""The ESMTP server protocol (RFC 5321, 1870, 2920, 3207, 6152, 2034).

Written fresh rather than subclassing `twisted.mail.smtp.ESMTP`, whose
defects (long-line smuggling, STARTTLS injection, out-of-order pipelined
replies, 550 on storage failure, per-line DATA callbacks) sit in the very
methods a subclass would have to replace; see docs/architecture.md.

Promises kept here:
- one command at a time, in order: while a check or a commit is pending the
  transport is paused and later bytes wait in the buffer;
- bounded output: the session is its transport's streaming producer; while
  the client leaves replies unread (the transport's buffer is full) no more
  commands are run, and past INPUT_BOUND of waiting commands none are read;
  a session stuck that way past `command_timeout` is aborted, not closed
  politely;
- deadlines a trickle cannot reset: a whole command line within
  `command_timeout` of the previous reply, and MAIL within `session_deadline`
  of the connection or of the end of the previous message;
- every connection the server ends is reported once to `SessionEvents`
  (a rate-limited log line and a metric);
- only CRLF ends a command line and only CRLF.CRLF ends DATA; once DATA has
  started, nothing but CRLF.CRLF leaves it;
- bytes pipelined behind STARTTLS are dropped and the session restarts;
- `250` after DATA only once the receiver says the message is durable.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Callable

from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer, IReactorTime, ISSLTransport, ITLSTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epost.smtp import events as reasons
from epost.address import Address
from epost.smtp.commands import CommandSyntaxError, parse_mail, parse_rcpt, split_command
from epost.smtp.data import MAX_LINE, DataReader
from epost.smtp.events import SessionEvents
from epost.smtp.screen import DNSBL_REASON, PREGREET, PREGREET_REASON, ClientScreen, Screening
from epost.reply import Reply
from epost.smtp.interfaces import IAccount, IMessageWriter, IReceiver, Rejected, Session
from epost.smtp.throttle import AuthThrottle, client_key

log = Logger()

_NO_SENDER = object()  # MAIL not given yet (None means the null sender <>)
_MAIL_PARAMS = frozenset({"SIZE", "BODY", "AUTH"})
# How a client's turn at a password check ended, besides a login:
_GONE = object()  # the connection closed while it waited: no check
_SHUT_OUT = object()  # its failures reached the cutoff while it waited: no check
_CHECK_BROKE = object()  # the check itself failed (not a wrong password)
# Why the session is not reading from its transport (any of them pauses it):
_BUSY = "busy"  # a check or a commit is pending: the server is waiting
_WRITER = "writer"  # the spool cannot take the message as fast as it comes
_UNREAD = "unread"  # the client leaves our replies unread and more than INPUT_BOUND of commands wait
# Commands read but not run while the client leaves replies unread. Reading
# stops only past this, not at once: Twisted's TLS layer also "pauses" its
# producer while it holds writes until the handshake is done, and a session
# that stopped reading then would never see the rest of the handshake.
INPUT_BOUND = 16 * 1024
CLOSE_GRACE = 15.0  # seconds a closing session may take to send its last replies before it is aborted


@dataclass(frozen=True)
class _Refused:
    delay: float  # seconds before the 535


@dataclass(frozen=True)
class ServerSettings:
    """Per-listener knobs, derived from the Config by the factory."""

    hostname: str
    listener: str = "relay"
    max_message_size: int = 26214400
    max_recipients: int = 100
    command_timeout: float = 300  # a whole command line within this of the previous reply
    session_deadline: float = 300  # MAIL within this of the connection or the previous message's end
    data_timeout: float = 600
    max_bad_commands: int = 20
    require_auth: bool = False  # submission / smtps
    allow_plaintext_auth: bool = False  # AUTH before TLS


def _reply(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text)


OK = _reply(250, "2.0.0", "Ok")
NEED_HELO = _reply(503, "5.5.1", "Error: send HELO/EHLO first")
LINE_TOO_LONG = _reply(500, "5.5.2", "Error: line too long")
BARE_NEWLINE_COMMAND = _reply(500, "5.5.2", "Error: bare <CR> or <LF> in command")
AUTH_INVALID = _reply(535, "5.7.8", "Authentication credentials invalid")
TOO_MANY_AUTH_FAILURES = _reply(421, "4.7.0", "Too many authentication failures, try later")


def tls_version(transport) -> str | None:
    """"TLSv1.3" etc. for an encrypted transport, else None.

    After STARTTLS the OpenSSL connection belongs to the TLS protocol Twisted
    inserted under us (`transport.protocol`), not to the TCP transport."""
    if not ISSLTransport.providedBy(transport):
        return None
    for holder in (transport, getattr(transport, "protocol", None)):
        try:
            version = holder.getHandle().get_protocol_version_name()
        except Exception:  # not every transport exposes an OpenSSL connection
            continue
        if version and version != "Unknown":
            return version
    return "TLS"


@implementer(IPushProducer)
class SMTPServer(Protocol):
    # Set False by a PROXY listener whose header named no client: the peer
    # address is the balancer's, not to be trusted for relaying (Session.client_known).
    client_known = True

    def __init__(
        self,
        receiver: IReceiver,
        settings: ServerSettings,
        clock: IReactorTime,
        tls_context=None,
        on_close: Callable[[], None] | None = None,
        portal=None,
        throttle: AuthThrottle | None = None,
        events: SessionEvents | None = None,
        screening: Screening | None = None,
    ):
        """`portal` (twisted.cred) enables AUTH; `throttle` is shared by
        every session so that failures count, and checks queue, per client;
        `events` (shared too) hears why the server ended a session."""
        self.receiver = receiver
        self.settings = settings
        self.clock = clock
        self.tls_context = tls_context
        self.portal = portal
        self.throttle = throttle or AuthThrottle(clock)
        self.events = events or SessionEvents(clock)
        self.screening = screening  # the relay port's pregreet and DNSBL tests (epost/smtp/screen.py)
        self._screen: ClientScreen | None = None  # until the first command: its DNSBL verdict is pending
        self._greet_timer = None  # the 220 waits greet_wait
        self._on_close = on_close
        self._auth_next: Callable[[str], object] | None = None  # the next line answers a 334
        self._buffer = b""
        self._discard_line = False  # inside an over-long command line
        self._processing = False
        self._closed = False
        self._errors = 0
        self._helo: str | None = None
        self._esmtp = False
        self._tls: str | None = None
        self._user: str | None = None
        self._idle_timer = None  # a whole command line (or, in DATA, some bytes) within command_timeout
        self._data_timer = None
        self._deadline_timer = None  # MAIL within session_deadline
        self._deadline_at: float | None = None
        self._abort_timer = None  # a closing session that does not go away in CLOSE_GRACE
        self._pauses: set[str] = set()
        self._output_full = False  # the transport paused us: replies wait unsent
        self._last_command = "CONNECT"
        self._reader: DataReader | None = None
        self._writer: IMessageWriter | None = None
        self._reset_transaction()

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._tls = tls_version(self.transport)
        peer = self.transport.getPeer()
        self._client_ip = getattr(peer, "host", "")
        self._auth_client = client_key(self._client_ip)  # whom AUTH failures count against
        self._client_port = getattr(peer, "port", 0)
        self.transport.registerProducer(self, True)
        self._arm_command_timer()
        self._deadline_at = self.clock.seconds() + self.settings.session_deadline
        self._arm_deadline()
        if self.screening is not None:
            self._screen = self.screening.for_client(self._client_ip)
        if self._screen is not None and self._screen.greet_wait > 0:
            self._greet_timer = self.clock.callLater(self._screen.greet_wait, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._greet_timer = None
        self._send(_reply(220, "", f"{self.settings.hostname} ESMTP epost"))

    def connectionLost(self, reason: Failure = None) -> None:
        self._closed = True
        if self._screen is not None:
            self._screen.close()
        for timer in (self._idle_timer, self._data_timer, self._deadline_timer, self._abort_timer, self._greet_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._abort_message()
        if self._on_close is not None:
            self._on_close()

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._greet_timer is not None:  # it talks before its turn: a bot (SPEC §5)
            self._greet_timer.cancel()
            self._greet_timer = None
            return self._end(PREGREET_REASON, PREGREET)
        if self._reader is not None and not self._busy:
            self._data_received(data)
        else:
            self._buffer += data
            self._process()

    # -- plumbing -----------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        if not self._closed:
            self.transport.write(reply.encode())

    def _send_lines(self, code: int, lines: list[str]) -> None:
        last = len(lines) - 1
        text = "".join(f"{code}{' ' if i == last else '-'}{line}\r\n" for i, line in enumerate(lines))
        self.transport.write(text.encode())

    def _close(self, reply: Reply) -> None:
        """Send the last reply and hang up once it is out (aborting if it never goes)."""
        self._send(reply)
        self._closed = True
        self._abort_message()
        # A registered producer would keep the transport open after its buffer drains.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._abort_timer = self.clock.callLater(CLOSE_GRACE, self._abort_closing)

    def _end(self, reason: str, reply: Reply) -> None:
        """The server ends the session: say why to the client and to SessionEvents."""
        self.events.ended(self.settings.listener, self._client_ip, self._client_port, reason, reply.encode().decode().strip(), self._last_command)
        self._close(reply)

    def _abort_closing(self) -> None:
        self.events.ended(self.settings.listener, self._client_ip, self._client_port, reasons.OUTPUT_STUCK, "closing: last replies unread", self._last_command)
        self.transport.abortConnection()

    def _error(self, reply: Reply) -> None:
        """Send a failure reply to a command; too many of them ends the session."""
        self._send(reply)
        self._errors += 1
        if self._errors >= self.settings.max_bad_commands and not self._closed:
            self._end(reasons.TOO_MANY_ERRORS, _reply(421, "4.7.0", f"{self.settings.hostname} Error: too many errors"))

    # -- timers -------------------------------------------------------------

    def _arm_command_timer(self) -> None:
        """The client has command_timeout from now for its next whole line (in DATA: its next bytes)."""
        if self._closed:
            return
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.settings.command_timeout)
        else:
            self._idle_timer = self.clock.callLater(self.settings.command_timeout, self._expired, reasons.COMMAND_TIMEOUT)

    def _arm_deadline(self) -> None:
        """Runs while no transaction is open; a transaction given up (RSET) does not buy more time."""
        if self._closed or self._deadline_at is None:
            return
        running = self._deadline_timer is not None and self._deadline_timer.active()
        if running and self._sender is _NO_SENDER:
            return  # already set for _deadline_at, which changes only while it is stopped
        if running:
            self._deadline_timer.cancel()
        self._deadline_timer = None
        if self._sender is _NO_SENDER:
            delay = max(0.0, self._deadline_at - self.clock.seconds())
            self._deadline_timer = self.clock.callLater(delay, self._expired, reasons.DEADLINE)

    def _expired(self, reason: str) -> None:
        """A timer ran out. Never while the server itself is the one waiting
        (a check, a commit, a slow spool): then the client gets a second more."""
        if self._closed or (reason == reasons.DEADLINE and self._sender is not _NO_SENDER):
            return
        if self._pauses & {_BUSY, _WRITER}:
            call = self.clock.callLater(1.0, self._expired, reason)
            if reason == reasons.DEADLINE:
                self._deadline_timer = call
            elif reason == reasons.DATA_TIMEOUT:
                self._data_timer = call
            else:
                self._idle_timer = call
            return
        if self._output_full:
            # The client reads nothing: a polite close would wait forever for the buffer to drain.
            self._closed = True
            self._abort_message()
            self.events.ended(self.settings.listener, self._client_ip, self._client_port, reasons.OUTPUT_STUCK, f"aborted: {reason}, replies unread", self._last_command)
            self.transport.abortConnection()
            return
        text = "Error: session deadline exceeded" if reason == reasons.DEADLINE else "Error: timeout exceeded"
        self._end(reason, _reply(421, "4.4.2", f"{self.settings.hostname} {text}"))

    # -- reading: paused while any reason holds -----------------------------

    def _hold(self, reason: str) -> None:
        if not self._pauses and not self._closed:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def _release(self, reason: str) -> bool:
        """Drops `reason`; True when that resumed reading (the caller then runs what is buffered)."""
        if reason not in self._pauses:
            return False
        self._pauses.discard(reason)
        if not self._pauses and not self._closed:
            self.transport.resumeProducing()
            return True
        return False

    # IPushProducer, registered on the transport: its write buffer is full / drained.
    def pauseProducing(self) -> None:
        self._output_full = True

    def resumeProducing(self) -> None:
        self._output_full = False
        self._release(_UNREAD)
        if not self._pauses:
            self._process()

    def stopProducing(self) -> None:
        pass  # the connection is going away; connectionLost cleans up

    @property
    def _busy(self) -> bool:
        """A check or a commit is pending: its reply must come before the next command runs."""
        return _BUSY in self._pauses

    def _process(self) -> None:
        """Run buffered command lines one at a time, stopping while busy."""
        if self._processing:
            return
        self._processing = True
        try:
            while not (self._busy or self._closed or self._output_full):
                if self.shutting_down and self._close_if_done():
                    break  # the daemon is stopping and this session's transaction is over
                if self._reader is not None:
                    if not self._buffer:
                        break
                    data, self._buffer = self._buffer, b""
                    self._data_received(data)
                    continue
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_LINE - 2:
                        self._buffer = b""
                        if not self._discard_line:
                            self._discard_line = True
                            self._error(LINE_TOO_LONG)
                    break
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                self._arm_command_timer()  # a whole line arrived: the next one has command_timeout from here
                if self._discard_line:
                    self._discard_line = False
                    continue
                if len(line) > MAX_LINE - 2:
                    self._error(LINE_TOO_LONG)
                    continue
                result = self._line(line)
                if isinstance(result, defer.Deferred):
                    self._wait(result)
        finally:
            self._processing = False
        if self._output_full and len(self._buffer) > INPUT_BOUND and not self._closed:
            self._hold(_UNREAD)

    def _wait(self, deferred: defer.Deferred) -> None:
        """Hold back further commands until `deferred` has sent its reply."""
        if self._closed:
            return
        self._hold(_BUSY)
        deferred.addErrback(self._internal_error)
        deferred.addBoth(self._resume)

    def _resume(self, _ignored) -> None:
        if self._closed:
            self._pauses.discard(_BUSY)
            return
        self._arm_command_timer()  # the client's time starts at our reply
        self._release(_BUSY)
        self._process()

    def _internal_error(self, failure: Failure) -> None:
        log.failure("internal error in SMTP session", failure)
        self._send(_reply(451, "4.3.0", "Error: internal error, try again later"))

    def _session(self) -> Session:
        return Session(
            listener=self.settings.listener,
            client_ip=self._client_ip,
            client_port=self._client_port,
            client_name=self._helo or "",
            esmtp=self._esmtp,
            tls=self._tls and (tls_version(self.transport) or self._tls),
            user=self._user,
            client_known=self.client_known,
        )

    def _reset_transaction(self) -> None:
        self._sender = _NO_SENDER
        self._mail_params: dict = {}
        self._recipients: list[tuple[Address, object]] = []
        self._arm_deadline()  # back on, at the same moment: giving up a transaction buys no time

    # -- commands -----------------------------------------------------------

    def _line(self, line: bytes):
        """One complete line: an AUTH response if a 334 is waiting, else a command."""
        if b"\r" in line or b"\n" in line:
            self._auth_next = None
            return self._error(BARE_NEWLINE_COMMAND)
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self._auth_next = None
            return self._error(_reply(500, "5.5.2", "Error: 8-bit characters in command"))
        if self._auth_next is not None:
            answer, self._auth_next = self._auth_next, None
            return answer(text)
        return self._command(text)

    def _command(self, text: str):
        verb, argument = split_command(text)
        handler = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
        self._last_command = verb if handler is not None else "UNKNOWN"
        if self._screen is not None and verb != "QUIT":
            return self._first_command(text)
        if handler is None:
            return self._error(_reply(500, "5.5.2", "Error: command not recognized"))
        try:
            return handler(argument)
        except CommandSyntaxError as error:
            return self._error(_reply(error.code, error.enhanced, error.text))

    def _first_command(self, text: str):
        """The DNSBL verdict applies before the client's first command runs; it may wait
        for lookups still outstanding, at most until the screen's deadline."""
        screen, self._screen = self._screen, None
        verdict = screen.verdict()
        settled: list = []
        verdict.addCallback(settled.append)
        if settled:
            return self._after_verdict(settled[0], text)
        return verdict.addCallback(lambda _: self._after_verdict(settled[0], text))

    def _after_verdict(self, refusal: Reply | None, text: str):
        if self._closed:
            return None
        if refusal is not None:
            return self._end(DNSBL_REASON, refusal)
        return self._command(text)

    def _extensions(self) -> list[str]:
        extensions = ["PIPELINING", f"SIZE {self.settings.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self._can_start_tls():
            extensions.append("STARTTLS")
        if self.portal is not None and self._auth_allowed_now():
            extensions.append("AUTH PLAIN LOGIN")
        return extensions

    def _auth_allowed_now(self) -> bool:
        return self._tls is not None or self.settings.allow_plaintext_auth

    def _can_start_tls(self) -> bool:
        return self.tls_context is not None and self._tls is None and ITLSTransport.providedBy(self.transport)

    def smtp_EHLO(self, argument: str):
        if not argument:
            return self._error(_reply(501, "5.5.4", "Syntax: EHLO hostname"))
        self._helo, self._esmtp = argument, True
        self._reset_transaction()
        self._send_lines(250, [self.settings.hostname, *self._extensions()])

    def smtp_HELO(self, argument: str):
        if not argument:
            return self._error(_reply(501, "5.5.4", "Syntax: HELO hostname"))
        self._helo, self._esmtp = argument, False
        self._reset_transaction()
        self._send_lines(250, [self.settings.hostname])

    def smtp_NOOP(self, argument: str):
        self._send(OK)

    def smtp_RSET(self, argument: str):
        if argument:
            return self._error(_reply(501, "5.5.4", "Syntax: RSET"))
        self._reset_transaction()
        self._send(OK)

    def smtp_QUIT(self, argument: str):
        self._close(_reply(221, "2.0.0", "Bye"))

    def smtp_VRFY(self, argument: str):
        if not argument:
            return self._error(_reply(501, "5.5.4", "Syntax: VRFY address"))
        self._send(_reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def smtp_HELP(self, argument: str):
        self._send(_reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS"))

    # -- AUTH (RFC 4954; PLAIN RFC 4616, LOGIN) ----------------------------

    def smtp_AUTH(self, argument: str):
        if self.portal is None:
            return self._error(_reply(503, "5.5.1", "Error: authentication not enabled"))
        if self._helo is None:
            return self._error(NEED_HELO)
        if self._user is not None:
            return self._error(_reply(503, "5.5.1", "Error: already authenticated"))
        if self._sender is not _NO_SENDER:
            return self._error(_reply(503, "5.5.1", "Error: MAIL transaction in progress"))
        if not self._auth_allowed_now():
            return self._error(_reply(538, "5.7.11", "Encryption required for requested authentication mechanism"))
        if self.throttle.blocked(self._auth_client):
            return self._end(reasons.AUTH_CUTOFF, TOO_MANY_AUTH_FAILURES)
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            return self._error(_reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        if mechanism == "PLAIN":
            if initial:
                return self._auth_plain(initial)
            return self._challenge("", self._auth_plain)
        if mechanism == "LOGIN":
            if initial:
                return self._auth_login_user(initial)
            return self._challenge("VXNlcm5hbWU6", self._auth_login_user)  # "Username:"
        return self._error(_reply(504, "5.5.4", "Unrecognized authentication type"))

    def _challenge(self, text: str, answer: Callable[[str], object]) -> None:
        self._auth_next = answer
        self.transport.write(f"334 {text}\r\n".encode())

    def _decode(self, response: str) -> str | None:
        """A base64 response as text; None (a reply sent) if cancelled or malformed."""
        if response == "*":
            self._error(_reply(501, "5.7.0", "Authentication cancelled"))
            return None
        try:
            return base64.b64decode(response, validate=True).decode("utf-8") if response != "=" else ""
        except (ValueError, UnicodeDecodeError):
            self._error(_reply(501, "5.5.2", "Cannot decode response"))
            return None

    def _auth_plain(self, response: str):
        decoded = self._decode(response)
        if decoded is None:
            return None
        parts = decoded.split("\0")
        if len(parts) != 3 or not parts[1]:
            return self._error(_reply(501, "5.5.2", "Malformed PLAIN response"))
        authzid, user, password = parts
        if authzid and authzid != user:  # acting for someone else is not offered
            return self._auth_failed()
        return self._authenticate(user, password)

    def _auth_login_user(self, response: str):
        user = self._decode(response)
        if user is None:
            return None
        return self._challenge("UGFzc3dvcmQ6", lambda answer: self._auth_login_password(user, answer))  # "Password:"

    def _auth_login_password(self, user: str, response: str):
        password = self._decode(response)
        if password is None:
            return None
        return self._authenticate(user, password)

    def _authenticate(self, user: str, password: str) -> defer.Deferred:
        client = self._auth_client

        def check():
            """The client's turn: its earlier checks are over and counted."""
            if self._closed:
                return _GONE
            if self.throttle.blocked(client):
                return _SHUT_OUT
            d = self.portal.login(credentials.UsernamePassword(user, password), None, IAccount)
            return d.addErrback(self._count_failure)

        return self.throttle.in_turn(client, check).addCallback(self._answer_login)

    def _count_failure(self, failure: Failure):
        """Within the client's turn: a refused password is counted before its next check."""
        if not failure.check(UnauthorizedLogin):
            log.failure("authentication error", failure)
            return _CHECK_BROKE
        return _Refused(self.throttle.failed(self._auth_client))

    def _answer_login(self, result):
        if result is _GONE:
            return None
        if result is _SHUT_OUT:
            return self._end(reasons.AUTH_CUTOFF, TOO_MANY_AUTH_FAILURES)
        if result is _CHECK_BROKE:
            return self._send(_reply(454, "4.7.0", "Temporary authentication failure"))
        if isinstance(result, _Refused):
            return self._answer_failure(result.delay)
        _interface, avatar_id, _logout = result
        self._user = avatar_id
        self._send(_reply(235, "2.7.0", "Authentication successful"))

    def _auth_failed(self):
        """A refusal decided without a password check (e.g. a foreign authzid)."""
        return self._answer_failure(self.throttle.failed(self._auth_client))

    def _answer_failure(self, delay: float):
        """Answer 535 after a delay that grows with the client's failures, or shut it out."""
        if self.throttle.blocked(self._auth_client):
            return self._end(reasons.AUTH_CUTOFF, TOO_MANY_AUTH_FAILURES)
        return task.deferLater(self.clock, delay, self._error, AUTH_INVALID)

    def smtp_STARTTLS(self, argument: str):
        if argument:
            return self._error(_reply(501, "5.5.4", "Syntax: STARTTLS"))
        if self._tls is not None:
            return self._error(_reply(503, "5.5.1", "Error: TLS already active"))
        if not self._can_start_tls():
            return self._error(_reply(454, "4.7.0", "TLS not available"))
        # RFC 3207 §4.2: forget everything learned in plaintext, including
        # anything the client pipelined behind STARTTLS (CVE-2011-0411).
        self._buffer = b""
        self._send(_reply(220, "2.0.0", "Ready to start TLS"))
        self.transport.startTLS(self.tls_context)
        self._tls = "TLS"
        self._helo, self._esmtp, self._user, self._auth_next = None, False, None, None
        self._reset_transaction()

    def smtp_MAIL(self, argument: str):
        if self._helo is None:
            return self._error(NEED_HELO)
        if self._sender is not _NO_SENDER:
            return self._error(_reply(503, "5.5.1", "Error: nested MAIL command"))
        if self.settings.require_auth and self._user is None:
            return self._error(_reply(530, "5.7.0", "Authentication required"))
        command = parse_mail(argument)
        unknown = set(command.params) - _MAIL_PARAMS
        if unknown:
            return self._error(_reply(555, "5.5.4", f"Unsupported option: {sorted(unknown)[0]}"))
        size = command.params.get("SIZE")
        if "SIZE" in command.params:
            if not (size and size.isdigit()):
                return self._error(_reply(501, "5.5.4", "Bad SIZE parameter"))
            if int(size) > self.settings.max_message_size:
                return self._error(_reply(552, "5.3.4", "Message size exceeds fixed limit"))
        body = command.params.get("BODY")
        if "BODY" in command.params and (body or "").upper() not in ("7BIT", "8BITMIME"):
            return self._error(_reply(501, "5.5.4", "Bad BODY parameter"))
        return self._decide(self.receiver.check_sender, (self._session(), command.address, command.params), self._sender_accepted, command)

    def _decide(self, check, check_args: tuple, accepted, *accepted_args):
        """Run a receiver check; a Deferred is returned only if it is still pending."""
        result = defer.maybeDeferred(check, *check_args)
        result.addCallbacks(accepted, self._refused, callbackArgs=accepted_args)
        result.addErrback(self._internal_error)
        return None if result.called else result

    def _sender_accepted(self, _ignored, command) -> None:
        self._sender, self._mail_params = command.address, command.params
        self._arm_deadline()  # stops it: the client is doing what it came for
        self._send(_reply(250, "2.1.0", "Ok"))

    def _refused(self, failure: Failure) -> None:
        failure.trap(Rejected)
        reply = failure.value.reply
        (self._error if reply.code >= 500 else self._send)(reply)

    def smtp_RCPT(self, argument: str):
        if self._sender is _NO_SENDER:
            return self._error(_reply(503, "5.5.1", "Error: need MAIL command"))
        command = parse_rcpt(argument)
        if command.params:
            return self._error(_reply(555, "5.5.4", f"Unsupported option: {next(iter(command.params))}"))
        if len(self._recipients) >= self.settings.max_recipients:
            return self._send(_reply(452, "4.5.3", "Error: too many recipients"))
        return self._decide(self.receiver.check_recipient, (self._session(), self._sender, command.address), self._recipient_accepted, command.address)

    def _recipient_accepted(self, decision, address: Address) -> None:
        self._recipients.append((address, decision))
        self._send(_reply(250, "2.1.5", "Ok"))

    def smtp_DATA(self, argument: str):
        if argument:
            return self._error(_reply(501, "5.5.4", "Syntax: DATA"))
        if self._sender is _NO_SENDER:
            return self._error(_reply(503, "5.5.1", "Error: need MAIL command"))
        if not self._recipients:
            return self._error(_reply(554, "5.5.1", "Error: no valid recipients"))
        try:
            self._writer = self.receiver.open_message(self._session(), self._sender, list(self._recipients), self._mail_params)
        except Rejected as rejected:
            return self._send(rejected.reply)
        self._writer.registerProducer(_PauseFor(self, _WRITER), True)
        self._reader = DataReader(self.settings.max_message_size)
        self._data_timer = self.clock.callLater(self.settings.data_timeout, self._expired, reasons.DATA_TIMEOUT)
        self._send(_reply(354, "", "End data with <CR><LF>.<CR><LF>"))

    # -- DATA ---------------------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        self._arm_command_timer()
        result = self._reader.feed(data)
        if result.content:
            self._writer.write(result.content)
        if not result.done:
            return
        reader, writer = self._reader, self._writer
        self._reader = self._writer = None
        writer.unregisterProducer()
        self._release(_WRITER)  # an unregistered writer cannot hold reading
        if self._data_timer is not None and self._data_timer.active():
            self._data_timer.cancel()
        self._buffer = result.rest + self._buffer
        self._last_command = "END-OF-MESSAGE"
        self._deadline_at = self.clock.seconds() + self.settings.session_deadline  # a message done earns a new one
        self._reset_transaction()
        refusal = self._content_refusal(reader)
        if refusal is not None:
            writer.abort()
            self._send(refusal)
        else:
            self._wait(writer.commit().addCallbacks(self._queued, self._commit_failed))
        self._process()

    @staticmethod
    def _content_refusal(reader: DataReader) -> Reply | None:
        if reader.too_big:
            return _reply(552, "5.3.4", "Error: message file too big")
        if reader.bare_newline:
            return _reply(550, "5.6.0", "Error: bare <CR> or <LF> in message data")
        if reader.line_too_long:
            return _reply(500, "5.5.2", "Error: message line longer than 1000 octets")
        return None

    def _queued(self, queue_id: str) -> None:
        self._send(_reply(250, "2.0.0", f"Ok: queued as {queue_id}"))

    def _commit_failed(self, failure: Failure) -> None:
        if failure.check(Rejected) and failure.value.reply.code == 421:  # the spool workers had stopped
            return self._shut_now("the spool was stopping: message not queued")
        if failure.check(Rejected):
            self._send(failure.value.reply)
        else:
            log.failure("could not store message", failure)
            self._send(_reply(451, "4.3.0", "Error: queue file write error"))

    def _abort_message(self) -> None:
        if self._writer is not None:
            self._writer.unregisterProducer()
            self._pauses.discard(_WRITER)
            self._writer.abort()
            self._writer = self._reader = None

    # -- daemon stop (EpostService.stopService) -------------------------------

    shutting_down = False  # shut_down() was called
    _shutdown_expired = False  # and its grace period is over
    _shutdown_timer = None
    _shutdown_ended: defer.Deferred | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def shut_down(self, grace: float) -> defer.Deferred:
        """End the session because the daemon stops; fires once it is closed.

        Between transactions: `421 4.3.2 <hostname> Service shutting down`
        at once. A transaction under way (MAIL given, DATA streaming) gets
        `grace` seconds to finish; a check or a commit in flight is always
        answered first (a commit's `250` included), then the `421`. Each
        `421` is logged with the client and what it was doing."""
        if self._closed or self.shutting_down:
            return defer.succeed(None)
        self.shutting_down = True
        self._shutdown_ended = defer.Deferred()
        previous = self._on_close

        def closed() -> None:
            if previous is not None:
                previous()
            self._shutdown_over()

        self._on_close = closed
        self._shutdown_timer = self.clock.callLater(grace, self._grace_over)
        ended = self._shutdown_ended
        self._close_if_done()
        return ended

    def _shutdown_over(self) -> None:
        """Our 421 is written (or the connection is gone): nothing of ours runs in this session any more."""
        if self._shutdown_timer is not None and self._shutdown_timer.active():
            self._shutdown_timer.cancel()
        if self._shutdown_ended is not None and not self._shutdown_ended.called:
            self._shutdown_ended.callback(None)

    def _grace_over(self) -> None:
        self._shutdown_expired = True
        self._close_if_done()

    def _close_if_done(self) -> bool:
        """Closes the session with 421 unless its transaction may still finish; True once closed."""
        if self._closed:
            return True
        if self._busy:
            return False  # a check or commit in flight: its answer comes first, then _process calls back
        if self._reader is not None:
            if not self._shutdown_expired:
                return False
            self._shut_now("in DATA: message not queued")
        elif self._sender is not _NO_SENDER:
            if not self._shutdown_expired:
                return False
            self._shut_now("in a transaction before DATA")
        else:
            self._shut_now("between transactions")
        return True

    def _shut_now(self, doing: str) -> None:
        log.info(
            "SMTP session from [{ip}]:{port} closed with 421 4.3.2, the daemon is stopping ({doing})",
            ip=self._client_ip, port=self._client_port, doing=doing,
        )
        self._close(_reply(421, "4.3.2", f"{self.settings.hostname} Service shutting down"))
        self._shutdown_over()  # a client that does not read must not hold up the stop until loseConnection ends

@implementer(IPushProducer)
class _PauseFor:
    """What the DATA writer pauses: one reason among the session's, so the
    writer's resume never restarts reading that another reason still stops."""

    def __init__(self, session: SMTPServer, reason: str):
        self.session, self.reason = session, reason

    def pauseProducing(self) -> None:
        self.session._hold(self.reason)

    def resumeProducing(self) -> None:
        if self.session._release(self.reason):
            self.session._process()

    def stopProducing(self) -> None:
        pass
